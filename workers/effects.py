"""Durable side effects (``ctx.side_effect``) and the state store (``ctx.state``) of one
execution, recorded in its session so a replay on any worker returns what the first run got.

A strategy is re-run from its start whenever a worker without it in memory resumes its
session (see ``workers/state.py``); everything it asked comes back from the journal, but an
email it sent, a payment it made or a ticket it opened would happen again. So
``side_effect(name, fn)`` runs ``fn`` at most once per (session, name, occurrence ``n`` of
that name in the execution) and records its result right away in the session hash, field
``fx:<name>#<n>`` (``n`` from 0), through ``effect.lua``: the first recorder wins and every
caller, a racing stale worker included, gets the recorded value. A recorded value is
returned without running ``fn``.

**The one at-least-once window**: a worker that dies after ``fn`` returned and before its
result was written (the microseconds of one Redis round trip) leaves nothing recorded, and
the replay runs ``fn`` again. An effect that must never repeat should carry its own
idempotency key (the session id and the effect's name make one). An ``fn`` that raises
records nothing: the replay runs it again.

The recorded values ride in the session hash, which a step reads whole: keep results small
(they are bounded by ``max_input_bytes``, 1 MiB by default).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from coordinator.codec import check_json_able, pack_checked, unpack
from coordinator.errors import InvalidInput, InvalidTransition, NotFound
from coordinator.scripts import Scripts
from coordinator.services import Services
from coordinator.transport import Transport

from .kv import State, Store, check_key


class Durable:
    """What the durable calls of every execution on one worker go through (one per
    worker): its transport, scripts and settings."""

    def __init__(self, services: Services) -> None:
        settings = services.settings
        self.transport = services.transport
        self.scripts = services.scripts
        self.shards = services.shards
        self.max_bytes = settings.max_input_bytes
        self.store = Store(services.transport, services.scripts,
                           namespace=settings.namespace, retention_ms=settings.retention_ms,
                           max_value_bytes=settings.max_input_bytes)

    def for_session(self, sid: str) -> Effects:
        """The effects object of one new execution of session ``sid``."""
        return Effects(self, sid)


class SessionRecords:
    """The session hash's ``fx:`` / ``st:`` fields: read, and written once (``effect.lua``)."""

    def __init__(self, transport: Transport, scripts: Scripts, sid: str, key: str) -> None:
        self._redis = transport
        self._scripts = scripts
        self._sid = sid
        self._key = key

    async def recorded(self, field: str) -> bytes | None:
        """The recorded value; None when there is none and the session runs. A session gone
        or no longer running raises: nothing should be done for it any more."""
        phase, value = await self._redis.execute("HMGET", self._key, "phase", field)
        if value is not None:
            return bytes(value)
        if phase is None:
            raise NotFound(f"session {self._sid} is gone: nothing more is recorded for it",
                           session_id=self._sid)
        if phase != b"running":
            raise InvalidTransition(
                f"session {self._sid} is {phase.decode()}, no longer running: its strategy "
                "may record nothing more", session_id=self._sid, state=phase.decode())
        return None

    async def record(self, field: str, value: bytes) -> bytes:
        reply = await self._scripts.effect(self._sid, field, value)
        return bytes(reply.args[0])


class Effects:
    """``ctx.side_effect`` and ``ctx.state`` of one execution (``Context`` delegates to it).
    Occurrences and op numbers count from the execution's start, so a replay, which runs
    the strategy from its start too, names each call as the first run did."""

    def __init__(self, durable: Durable, sid: str) -> None:
        self._durable = durable
        self._sid = sid
        session_key = durable.shards.of(sid).session(sid).session
        self._records = SessionRecords(durable.transport, durable.scripts, sid, session_key)
        self._occurrences: dict[str, int] = {}
        #: ``ctx.state``: the namespace's key-value store, ops applied once (``kv.py``).
        self.state = State(durable.store, self._records, session_id=sid)

    async def side_effect(self, name: str, fn: Callable[[], Any]) -> Any:
        """``fn()``'s result (awaited when it is awaitable), run at most once for this
        occurrence of ``name`` in the session and recorded; the recorded value when there
        is one (always as read back: lists for tuples)."""
        check_key(name, what="ctx.side_effect name")
        if not callable(fn):
            raise InvalidInput(f"ctx.side_effect({name!r}, fn): fn must be a function "
                               f"taking no arguments, not {type(fn).__name__}")
        n = self._occurrences.get(name, 0)
        self._occurrences[name] = n + 1
        field = f"fx:{name}#{n}"
        raw = await self._records.recorded(field)
        if raw is None:
            result = fn()
            if inspect.isawaitable(result):
                result = await result
            what = f"the result of ctx.side_effect({name!r})"
            check_json_able(result, what=what, limit=self._durable.max_bytes)
            raw = await self._records.record(field, pack_checked(result, what=what))
        return unpack(raw, what=f"side effect {field}", session_id=self._sid)
