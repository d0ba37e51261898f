"""msgpack in, msgpack out, and the JSON-ability checks that guard what we store.

msgpack (never pickle): nothing read from Redis can run code when decoded. Values are checked
to be JSON-able on the way in, because hosts read them back as JSON.
"""

from __future__ import annotations

import json
from typing import Any

import msgpack

from .errors import CorruptState, InvalidInput, PayloadTooLarge

_packer_opts: dict[str, Any] = {"use_bin_type": True}


def pack(value: Any) -> bytes:
    return msgpack.packb(value, **_packer_opts)  # type: ignore[no-any-return]


def unpack(data: bytes, *, what: str = "value", session_id: str | None = None) -> Any:
    try:
        return msgpack.unpackb(data, raw=False, strict_map_key=False)
    except Exception as exc:
        raise CorruptState(
            f"cannot decode the stored {what} ({exc.__class__.__name__}); "
            "the key was not written by this coordinator or is corrupt",
            session_id=session_id,
        ) from exc


def check_json_able(value: Any, *, what: str, limit: int | None = None) -> int:
    """Reject what a JSON host could not read back, or Redis could not store; returns the
    encoded size in bytes."""
    try:
        text = json.dumps(value, allow_nan=False, ensure_ascii=False)
    except RecursionError:
        raise InvalidInput(f"{what} is nested too deeply to encode as JSON") from None
    except (TypeError, ValueError) as exc:
        raise InvalidInput(f"{what} must be JSON-able (str, int, float, bool, None, list, "
                           f"dict with str keys): {exc}") from exc
    _check_storable(value, what)  # after dumps, which has ruled out cycles
    try:
        size = len(text.encode("utf-8"))
    except UnicodeEncodeError:  # _check_storable found none: a str subclass hid it
        raise InvalidInput(f"{what} holds a lone surrogate and is not valid Unicode") from None
    if limit is not None and size > limit:
        raise PayloadTooLarge(f"{what} is {size} bytes, over the limit of {limit} bytes")
    return size


def pack_checked(value: Any, *, what: str) -> bytes:
    """``pack``, with whatever msgpack refuses said as ``InvalidInput`` naming ``what``
    rather than raised as msgpack's own error from deep inside a commit."""
    try:
        return pack(value)
    except UnicodeEncodeError:
        raise InvalidInput(f"{what} holds a lone surrogate and is not valid Unicode") from None
    except (TypeError, ValueError, OverflowError) as exc:  # msgpack: type, depth, int size
        raise InvalidInput(f"{what} cannot be stored: {exc}") from None


_INT_MIN, _INT_MAX = -(2**63), 2**64 - 1  # what msgpack can carry
MAX_DEPTH = 256  # msgpack refuses deeper nesting; say so before it does


def _check_storable(value: Any, what: str) -> None:
    """A value must survive the round trip: json.dumps would turn key 1 into "1" silently,
    msgpack cannot carry integers beyond 64 bits, and neither JSON readers nor msgpack
    (which encodes str as UTF-8) take a lone surrogate, which Python strings may hold.
    Each entry's place is kept as a (parent, key) link, made into a path only for the
    message, so a large value costs no string building."""
    stack: list[tuple[Any, int, _Path]] = [(value, 0, None)]
    while stack:
        item, depth, path = stack.pop()
        if depth > MAX_DEPTH:
            raise InvalidInput(f"{what} is nested deeper than {MAX_DEPTH} levels")
        if isinstance(item, str):
            _check_unicode(item, what, path)
        elif isinstance(item, int) and not isinstance(item, bool) \
                and not _INT_MIN <= item <= _INT_MAX:
            raise InvalidInput(f"{_where(what, path)} holds an integer outside the 64-bit "
                               f"range ({len(str(abs(item)))} digits) that cannot be stored; "
                               "send it as a string")
        elif isinstance(item, dict):
            for key, inner in item.items():
                if not isinstance(key, str):
                    raise InvalidInput(f"{what} has a non-string key {key!r}; JSON object keys "
                                       "must be strings")
                _check_unicode(key, f"a key of {what}", path)
                stack.append((inner, depth + 1, (path, key)))
        elif isinstance(item, list | tuple):
            stack.extend((inner, depth + 1, (path, n)) for n, inner in enumerate(item))


#: Where an entry sits in a value: None at the top, else (its parent's path, its key).
_Path = tuple[Any, str | int] | None


def _where(what: str, path: _Path) -> str:
    keys: list[str | int] = []
    while path is not None:
        path, key = path
        keys.append(key)
    return what + "".join(f"[{k!r}]" for k in reversed(keys))


def _check_unicode(text: str, what: str, path: _Path) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        bad = ascii(text[exc.start:exc.end])
        raise InvalidInput(f"{_where(what, path)} holds a lone surrogate ({bad}) and is not "
                           "valid Unicode") from None


def check_text(value: Any, *, what: str, limit: int) -> str:
    """A response or prompt: str (or UTF-8 bytes), valid Unicode, within ``limit`` bytes."""
    if isinstance(value, bytes | bytearray):
        try:
            value = bytes(value).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InvalidInput(f"{what} is not valid UTF-8: {exc}") from exc
    if not isinstance(value, str):
        raise InvalidInput(f"{what} must be a string, not {type(value).__name__}")
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError as exc:
        raise InvalidInput(f"{what} holds a lone surrogate and is not valid Unicode") from exc
    if size > limit:
        raise PayloadTooLarge(f"{what} is {size} bytes, over the limit of {limit} bytes")
    return value


def text(value: Any) -> str:
    """A Redis reply (bytes with this client) as str."""
    return value.decode() if isinstance(value, bytes | bytearray) else str(value)


def estimate_tokens(text: str) -> int:
    """algocline's estimate when the host gives no usage: four ASCII characters a token, and
    one and a half of any other (CJK text runs about that dense), each part rounded up."""
    ascii_chars = len(text) if text.isascii() else len(text.encode("ascii", "ignore"))
    other = len(text) - ascii_chars
    return -(-ascii_chars // 4) + -(-(other * 2) // 3)
