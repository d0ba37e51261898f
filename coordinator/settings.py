"""All knobs in one place, with units in their names."""

from __future__ import annotations

import os
from dataclasses import dataclass, fields, replace
from typing import Any

MIB = 1024 * 1024


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

    @classmethod
    def from_url(cls, url: str | None = None, **overrides: Any) -> Settings:
        """Settings for ``url`` (default: ``REDIS_URL``; None means embedded).

        Every field can also be set from the environment as ``ALC_<FIELD>`` (for example
        ``ALC_NAMESPACE``, ``ALC_LEASE_MS``), so a deployment configures workers without
        flags; explicit ``overrides`` (None values ignored) win over the environment.
        """
        values: dict[str, Any] = {}
        for f in fields(cls):
            env = os.environ.get(f"ALC_{f.name.upper()}")
            if env is not None and f.name != "url":
                values[f.name] = _convert(f.name, env, type(getattr(cls(), f.name)))
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


def _convert(name: str, raw: str, kind: type) -> Any:
    try:
        return kind(raw)
    except ValueError:
        raise ValueError(f"ALC_{name.upper()}={raw!r} is not a valid {kind.__name__}") from None
