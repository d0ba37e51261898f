"""``ctx.state``: a key-value store in Redis that outlives sessions, each write applied once.

A strategy's state ops must be as replayable as its questions: a session replayed on another
worker (its holder died, or evicted it) runs its strategy again from the start, so an
``incr`` that simply ran again would count twice, and a ``get`` that read again could see
another value and ask other questions. Every op of an execution is therefore numbered (its
*op id*: the session id and the op's number in the execution), applied at most once per op
id (``state_op.lua``), and its result recorded in the session, which a replay returns.

Schema (namespace ``ns``; these names are built here and nowhere else):

================================  ======  ===================================================
key                               type    holds
================================  ======  ===================================================
``ns:state:{<key>}``              string  the value, no TTL: an integer in the signed 64-bit
                                          range as decimal text (so INCRBY adds to it
                                          atomically), anything else msgpack (whose first
                                          byte is then never a digit or ``-``)
``ns:state:{<key>}:op:<sid>:<n>`` string  op ``n`` of session ``sid`` on ``<key>``:
                                          ``<op>:<status>:<result>`` (``state_op.lua``),
                                          PX retention; same slot as the value
``ns:state:index``                set     the keys written: ``keys()`` lists it
``ns:{<sid>}`` field ``st:<n>``   hash    what op ``n`` of the session returned: msgpack
                                          ``[op, key, status, result]`` (``effect.lua``)
================================  ======  ===================================================

An op first looks for its ``st:<n>``; when found (a replay) it returns that and touches
nothing. Otherwise ``state_op.lua`` applies it unless its marker exists (a worker died after
applying it, before recording it), the index is brought up to date, and the result is
recorded. The marker lives for the retention period: a session whose interrupted op is
replayed later than that (no worker for over an hour) applies it again.

**The index** is a separate key, in another Cluster slot than the values, so no script can
write both. What ``keys()`` guarantees, on every topology: it lists each key whose writing op
has returned, and never one that does not exist. Writes add to the index after the value is
written; a delete removes its key from the index, then looks at the value again and adds the
key back if it exists by then (a racing write's own addition may have come first). ``keys()``
checks every listed key against its value and forgets those gone (with the same re-check).
A worker that dies between an op and its index update leaves the key unlisted until the
session is replayed, which redoes the update.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from coordinator.codec import check_json_able, pack, pack_checked, unpack
from coordinator.errors import CorruptState, InvalidInput, NonDeterminism
from coordinator.scripts import Scripts
from coordinator.transport import Transport, checked

#: Keys (and prefixes, and side-effect names) are 1 to 200 of these characters: never a
#: brace (Cluster hash tags), whitespace, glob or '#' (``fx:<name>#<n>``).
KEY_PATTERN = re.compile(r"[A-Za-z0-9_.:/@+=-]{1,200}")
MAX_KEY_CHARS = 200
#: Most keys one ``keys()`` returns: its answer is recorded in the session like any other.
MAX_LISTED = 10_000
_INT64 = (-(2**63), 2**63 - 1)


def check_key(key: object, *, what: str = "ctx.state key") -> str:
    """``key`` if it may name a state key; ``InvalidInput`` saying what is allowed if not."""
    if not isinstance(key, str) or not KEY_PATTERN.fullmatch(key):
        shown = repr(key) if len(repr(key)) <= 60 else repr(key)[:57] + "..."
        raise InvalidInput(f"{what} {shown} is not allowed: use 1 to {MAX_KEY_CHARS} "
                           "characters from A-Z a-z 0-9 _ . : / @ + = -")
    return key


def encode_value(key: str, value: Any, *, limit: int) -> bytes:
    """A value as the store keeps it (see the schema)."""
    what = f"the value of ctx.state key {key!r}"
    check_json_able(value, what=what, limit=limit)
    if type(value) is int and _INT64[0] <= value <= _INT64[1]:
        return str(value).encode()
    return pack_checked(value, what=what)


def decode_value(raw: bytes, *, key: str) -> Any:
    if raw[:1] in (b"-", b"0", b"1", b"2", b"3", b"4", b"5", b"6", b"7", b"8", b"9"):
        try:
            return int(raw)
        except ValueError:
            raise CorruptState(f"ctx.state key {key!r} holds {raw[:40]!r}, which this "
                               "coordinator did not write") from None
    return unpack(raw, what=f"the value of ctx.state key {key!r}")


@dataclass(frozen=True, slots=True)
class StateKeys:
    """The state store's names in namespace ``namespace`` (the schema above)."""

    namespace: str

    def value(self, key: str) -> str:
        return f"{self.namespace}:state:{{{key}}}"

    def marker(self, key: str, op_id: str) -> str:
        return f"{self.namespace}:state:{{{key}}}:op:{op_id}"

    @property
    def index(self) -> str:
        return f"{self.namespace}:state:index"


class Store:
    """The store as every execution of one worker reaches it (one per worker)."""

    def __init__(self, transport: Transport, scripts: Scripts, *, namespace: str,
                 retention_ms: int, max_value_bytes: int) -> None:
        self._redis = transport
        self._scripts = scripts
        self.keys = StateKeys(namespace)
        self._retention_ms = retention_ms
        self.max_value_bytes = max_value_bytes

    async def apply(self, op: str, key: str, arg: bytes, op_id: str) -> tuple[str, Any]:
        """Apply op ``op_id`` once (``state_op.lua``) and keep the index in step; its
        status and decoded result, the same whoever applied it."""
        reply = await self._scripts.state_op(
            self.keys.value(key), self.keys.marker(key, op_id), op=op, arg=arg,
            retention_ms=self._retention_ms)
        marker = bytes(reply.args[0])
        if reply.code == "OTHER_OP":
            raise NonDeterminism(
                f"non-determinism: ctx.state op {op_id} was {marker.split(b':', 1)[0]!r} on "
                f"{key!r} when first run, and is {op!r} on replay; strategies must make the "
                "same state calls given the same answers")
        _, status, payload = marker.split(b":", 2)
        result = _RESULTS[op](payload, key) if status == b"ok" else None
        await self._index(op, key, status, result)
        return status.decode(), result

    async def _index(self, op: str, key: str, status: bytes, result: Any) -> None:
        if status != b"ok" or op == "get" or (op == "set_nx" and not result):
            return
        if op == "delete":
            await self._unindex([key])
        else:
            await self._redis.execute("SADD", self.keys.index, key)

    async def _unindex(self, names: list[str]) -> None:
        """Drop ``names`` from the index, then add back those whose value exists by now: a
        write racing this one may have added its key before this removal."""
        await self._redis.execute("SREM", self.keys.index, *names)
        exists = checked(await self._redis.execute_many(
            [("EXISTS", self.keys.value(n)) for n in names]))
        back = [n for n, e in zip(names, exists, strict=True) if e]
        if back:
            await self._redis.execute("SADD", self.keys.index, *back)

    async def list(self, prefix: str) -> list[str]:
        """The existing keys starting with ``prefix``, sorted; index entries of keys gone
        are forgotten on the way."""
        members = await self._redis.execute("SMEMBERS", self.keys.index)
        names = sorted(n for n in (m.decode() for m in members) if n.startswith(prefix))
        if not names:
            return []
        exists = checked(await self._redis.execute_many(
            [("EXISTS", self.keys.value(n)) for n in names]))
        gone = [n for n, e in zip(names, exists, strict=True) if not e]
        if gone:
            await self._unindex(gone)
        live = [n for n, e in zip(names, exists, strict=True) if e]
        if len(live) > MAX_LISTED:
            raise InvalidInput(f"ctx.state.keys({prefix!r}) matches {len(live)} keys, over "
                               f"{MAX_LISTED}: pass a longer prefix")
        return live


_RESULTS: dict[str, Callable[[bytes, str], Any]] = {
    "get": lambda raw, key: decode_value(raw, key=key),
    "set": lambda raw, key: None,
    "set_nx": lambda raw, key: raw == b"1",
    "incr": lambda raw, key: int(raw),
    "delete": lambda raw, key: raw == b"1",
}


class Records(Protocol):
    """Where an execution keeps what its durable calls returned (its session hash)."""

    async def recorded(self, field: str) -> bytes | None:
        """The value recorded under ``field``, or None (then the session still runs)."""

    async def record(self, field: str, value: bytes) -> bytes:
        """Record ``value`` under ``field`` unless recorded; the value kept."""


class State:
    """``ctx.state`` for one execution: every op numbered, applied once, its result
    recorded in the session so a replay sees what the first run saw."""

    def __init__(self, store: Store, records: Records, *, session_id: str) -> None:
        self._store = store
        self._records = records
        self._sid = session_id
        self._seq = 0

    async def get(self, key: str, default: Any = None) -> Any:
        """The value of ``key``, or ``default`` when it has none."""
        status, value = await self._op("get", check_key(key), b"")
        return default if status == "none" else value

    async def set(self, key: str, value: Any) -> None:
        check_key(key)
        await self._op("set", key, encode_value(key, value, limit=self._store.max_value_bytes))

    async def set_nx(self, key: str, value: Any) -> bool:
        """Set ``key`` only if it has no value; True when this call set it."""
        check_key(key)
        encoded = encode_value(key, value, limit=self._store.max_value_bytes)
        return bool((await self._op("set_nx", key, encoded))[1])

    async def incr(self, key: str, by: int = 1) -> int:
        """Add ``by`` to the integer at ``key`` (0 when it has none); the new value."""
        check_key(key)
        if type(by) is not int or not _INT64[0] <= by <= _INT64[1]:
            raise InvalidInput(f"ctx.state.incr({key!r}, by=...) takes an integer in the "
                               f"signed 64-bit range, not {by!r:.60}")
        status, value = await self._op("incr", key, str(by).encode())
        if status == "not_int":
            raise InvalidInput(f"ctx.state.incr({key!r}): the key holds a value that is not "
                               "an integer; incr adds only to integers")
        if status == "overflow":
            raise InvalidInput(f"ctx.state.incr({key!r}, {by}): the result would leave the "
                               "signed 64-bit range; nothing was added")
        return int(value)

    async def delete(self, key: str) -> bool:
        """Remove ``key``; True when it had a value."""
        return bool((await self._op("delete", check_key(key), b""))[1])

    async def keys(self, prefix: str = "") -> list[str]:
        """The keys that have a value and start with ``prefix``, sorted (at most
        ``MAX_LISTED``). Recorded like every op; a replay after a crash between the
        listing and its record lists again."""
        if prefix != "":
            check_key(prefix, what="ctx.state.keys prefix")
        seq = self._next()
        raw = await self._records.recorded(f"st:{seq}")
        if raw is None:
            names = await self._store.list(prefix)
            raw = await self._records.record(f"st:{seq}", pack(["keys", prefix, "ok", names]))
        return list(self._replayed(raw, seq, "keys", prefix)[1])

    def _next(self) -> int:
        self._seq += 1
        return self._seq

    async def _op(self, op: str, key: str, arg: bytes) -> tuple[str, Any]:
        seq = self._next()
        field = f"st:{seq}"
        raw = await self._records.recorded(field)
        if raw is None:
            status, result = await self._store.apply(op, key, arg, f"{self._sid}:{seq}")
            raw = await self._records.record(field, pack([op, key, status, result]))
        return self._replayed(raw, seq, op, key)

    def _replayed(self, raw: bytes, seq: int, op: str, key: str) -> tuple[str, Any]:
        """The recorded ``(status, result)`` of op ``seq``, which must be this op."""
        entry = unpack(raw, what=f"ctx.state op {seq}", session_id=self._sid)
        if not isinstance(entry, list) or len(entry) != 4 or not isinstance(entry[2], str):
            raise CorruptState(f"session {self._sid}: ctx.state op {seq} is recorded as "
                               f"{entry!r:.100}", session_id=self._sid)
        if entry[0] != op or entry[1] != key:
            raise NonDeterminism(
                f"non-determinism: ctx.state op {seq} was {entry[0]}({entry[1]!r}) when "
                f"first run, and is {op}({key!r}) on replay; strategies must make the same "
                "state calls given the same answers", session_id=self._sid)
        return entry[2], entry[3]
