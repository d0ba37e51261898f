"""All knobs in one place, with units in their names.

Every field is checked when a ``Settings`` is made (directly, by ``from_url`` from the
environment, or by ``with_``): a typo in ``ALC_LEASE_MS`` or a negative wait is refused at
start-up, naming the setting and what it takes, rather than surfacing later as a hang, a
Redis error or a session that expires at once.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, fields, replace
from typing import Any

from .errors import InvalidInput

MIB = 1024 * 1024
#: Longest idle time a session may be given (its own ``ttl`` or ``session_ttl_s``): ten
#: years. Redis keeps expiries in ms and Lua counts in doubles, so far beyond this the
#: numbers stop round-tripping; nobody means a session to idle longer.
MAX_TTL_S = 10 * 365 * 86_400.0
_DAY_S = 86_400.0
_DAY_MS = 86_400_000
#: Redis refuses strings over 512 MiB, so no payload limit may be higher.
_MAX_BYTES = 512 * MIB


class InvalidSetting(InvalidInput, ValueError):
    """A setting of the wrong type or out of range. The fronts report it as the
    ``InvalidInput`` it is; it is a ``ValueError`` too because that is what a bad setting
    raised before settings were range-checked, and callers catching that still should."""


@dataclass(frozen=True, slots=True)
class _Range:
    """What one numeric setting takes: ``kind`` int or float, within [low, high]
    (``low`` excluded when ``open_low``), in ``unit``."""

    kind: type
    low: float
    high: float
    unit: str
    open_low: bool = False

    def describe(self) -> str:
        what = "an integer number of" if self.kind is int else "a number of"
        low = f"> {_num(self.low)}" if self.open_low else f">= {_num(self.low)}"
        return f"{what} {self.unit} {low} and <= {_num(self.high)}"

    def accepts(self, value: Any) -> bool:
        if isinstance(value, bool) or not isinstance(value, int | float):
            return False
        if self.kind is int and not isinstance(value, int):
            return False
        if not math.isfinite(value):
            return False
        return (value > self.low if self.open_low else value >= self.low) and value <= self.high


def _num(x: float) -> str:
    return str(int(x)) if x == int(x) else f"{x:g}"


def _seconds(high: float, *, zero_ok: bool = False) -> _Range:
    return _Range(float, 0.0, high, "seconds", open_low=not zero_ok)


def _ms(low: int = 1, high: int = _DAY_MS) -> _Range:
    return _Range(int, low, high, "milliseconds")


@dataclass(frozen=True, slots=True)
class Settings:
    url: str | None = None
    namespace: str = "alc"
    #: Longest any one Redis call may take, connecting and retries included; then it raises
    #: ``Unavailable``. Calls that wait on a session add their own ``timeout`` to this.
    redis_timeout_s: float = 5.0
    #: Lease of lock A and lock C; a stalled holder loses its lock after this.
    lease_ms: int = 10_000
    #: How long a caller waits for a lock before ``LockTimeout``.
    lock_wait_s: float = 15.0
    #: Default bound on waits for a session's next event (``WaitTimeout`` after it).
    wait_timeout_s: float = 300.0
    #: Longest a waiter trusts pub/sub before re-reading the state in Redis.
    wait_slice_s: float = 1.0
    #: Idle time after which GC expires a live session.
    session_ttl_s: float = 3600.0
    #: How long a finished session's result stays readable.
    retention_s: float = 3600.0
    max_response_bytes: int = MIB
    max_input_bytes: int = MIB
    #: Largest HTTP request body ``serve`` reads (a batch of answers included); a bigger one
    #: is refused (413) before it is read in full.
    max_request_bytes: int = 8 * MIB
    #: Characters of each pending prompt a ``preview`` pending filter shows (algocline's
    #: ``ALC_PROMPT_PREVIEW_CHARS``).
    prompt_preview_chars: int = 200
    #: GC sweep period (the original runs it every 60 s).
    gc_interval_s: float = 60.0
    #: Worker heartbeat key TTL; a worker whose key expired is dead for takeover purposes.
    heartbeat_ttl_ms: int = 6_000
    #: A job pending this long on a consumer is claimed by another worker.
    claim_idle_ms: int = 5_000
    #: Longest one strategy step (between two asks) may run.
    step_timeout_s: float = 300.0
    #: A step that fails (or whose worker dies) this many times in a row is dead-lettered and
    #: its session failed, so a poison job cannot loop forever.
    max_attempts: int = 5
    #: On SIGTERM a worker stops taking work and gives in-flight steps this long to finish;
    #: steps still running then are cut, and their jobs are claimed by other workers.
    shutdown_grace_s: float = 10.0
    #: Most paused executions a worker keeps alive in memory; older ones are replayed if needed.
    max_live_executions: int = 10_000
    #: Durability: every state change a caller is told about (create, feed, step commit,
    #: cancel/expire/fail) waits until this many replicas acknowledged it (``WAIT``), or
    #: raises ``NotReplicated`` after ``wait_replicas_timeout_ms``. 0: asynchronous
    #: replication, a failover may lose the last acknowledged writes.
    wait_replicas: int = 0
    wait_replicas_timeout_ms: int = 1000
    #: Accept a Redis whose ``maxmemory-policy`` evicts keys (refused by default: an evicted
    #: session key breaks its session silently). ``ALC_ALLOW_EVICTION=1``.
    allow_eviction: bool = False
    #: Shards of the namespace (``coordinator.shards``), fixed when the namespace is first
    #: used and stored in Redis. 0: the stored count, or for a new namespace 1 on a single
    #: Redis (Sentinel included) and 4 per primary on a Cluster. ``ALC_SHARDS``.
    shards: int = 0

    def __post_init__(self) -> None:
        """Refuse a bad value when the settings are made, whoever made them."""
        if self.url is not None and not isinstance(self.url, str):
            raise _invalid("url", self.url, "a Redis URL string (or None for embedded)")
        _check_namespace(self.namespace)
        if not isinstance(self.allow_eviction, bool):
            raise _invalid("allow_eviction", self.allow_eviction, "true or false")
        for name, allowed in _RANGES.items():
            value = getattr(self, name)
            if not allowed.accepts(value):
                raise _invalid(name, value, allowed.describe())

    @classmethod
    def from_url(cls, url: str | None = None, **overrides: Any) -> Settings:
        """Settings for ``url`` (default: ``REDIS_URL``; None means embedded).

        Every field can also be set from the environment as ``ALC_<FIELD>`` (for example
        ``ALC_NAMESPACE``, ``ALC_LEASE_MS``), so a deployment configures workers without
        flags; explicit ``overrides`` (None values ignored) win over the environment.
        A value that does not parse, or is out of range, is ``InvalidSetting`` naming it.
        """
        values: dict[str, Any] = {}
        for f in fields(cls):
            env = os.environ.get(f"ALC_{f.name.upper()}")
            if env is not None and f.name != "url":
                values[f.name] = _convert(f.name, env)
        values.update({k: v for k, v in overrides.items() if v is not None})
        values["url"] = url if url is not None else (os.environ.get("REDIS_URL") or None)
        return cls(**values)

    def with_(self, **changes: Any) -> Settings:
        return replace(self, **changes)

    @property
    def backstop_ms(self) -> int:
        """Redis key expiry on live session keys: GC should act first; this catches leaks."""
        return int((self.session_ttl_s + self.retention_s) * 1000) + self.lease_ms

    @property
    def retention_ms(self) -> int:
        return int(self.retention_s * 1000)


#: Every numeric field and what it takes. Durations must be positive (a zero lease, wait
#: slice or step timeout would spin or fail every step), except the two that mean "do not
#: wait" at zero; upper bounds keep each one where Redis and Lua still carry it exactly and
#: where a value is more likely a unit mistake (ms given as s) than a wish.
_RANGES: dict[str, _Range] = {
    "redis_timeout_s": _seconds(_DAY_S),
    "lease_ms": _ms(),
    "lock_wait_s": _seconds(_DAY_S, zero_ok=True),
    "wait_timeout_s": _seconds(365 * _DAY_S),
    "wait_slice_s": _seconds(3600.0),
    "session_ttl_s": _seconds(MAX_TTL_S),
    "retention_s": _seconds(MAX_TTL_S),
    "max_response_bytes": _Range(int, 1, _MAX_BYTES, "bytes"),
    "max_input_bytes": _Range(int, 1, _MAX_BYTES, "bytes"),
    "max_request_bytes": _Range(int, 1024, _MAX_BYTES, "bytes"),
    "prompt_preview_chars": _Range(int, 0, 1_000_000, "characters"),
    "gc_interval_s": _seconds(_DAY_S),
    "heartbeat_ttl_ms": _ms(),
    "claim_idle_ms": _ms(),
    "step_timeout_s": _seconds(365 * _DAY_S),
    "max_attempts": _Range(int, 1, 1000, "attempts"),
    "shutdown_grace_s": _seconds(_DAY_S, zero_ok=True),
    "max_live_executions": _Range(int, 0, 10_000_000, "executions"),
    "wait_replicas": _Range(int, 0, 64, "replicas"),
    "wait_replicas_timeout_ms": _ms(1, 60_000),
    "shards": _Range(int, 0, 256, "shards"),
}


def _invalid(name: str, value: Any, expected: str) -> InvalidSetting:
    return InvalidSetting(f"setting {name} (ALC_{name.upper()}) must be {expected}, "
                          f"got {value!r}")


def _check_namespace(ns: Any) -> None:
    """The rule of ``Keys`` (no ':' that would reach into another namespace's keys, no
    hash-tag braces, no whitespace), checked here too so it is refused as a setting."""
    if not isinstance(ns, str) or not ns or len(ns) > 128 or not ns.isprintable() \
            or any(c in ns for c in "{}: ") or not _encodable(ns):
        raise _invalid("namespace", ns, "1 to 128 printable characters without '{', '}', "
                       "':' or whitespace")


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


_FLAGS = {"1": True, "true": True, "yes": True, "on": True,
          "0": False, "false": False, "no": False, "off": False}


def _convert(name: str, raw: str) -> Any:
    """An environment value as its field's type; the range is checked by ``Settings``."""
    if name == "allow_eviction":
        flag = raw.strip().lower()
        if flag not in _FLAGS:
            raise _invalid(name, raw, "1/true/yes or 0/false/no")
        return _FLAGS[flag]
    allowed = _RANGES.get(name)
    if allowed is None:
        return raw  # a string field (namespace)
    try:
        return allowed.kind(raw.strip())
    except ValueError:
        raise _invalid(name, raw, allowed.describe()) from None
