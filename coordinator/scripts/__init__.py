"""The Lua scripts, loaded once from their ``.lua`` files and called by SHA.

Each script's header comment documents its KEYS and ARGV. The wrappers here are the only
callers: they put the keys in the order the header gives and turn the scripts' return codes
into our exceptions, so no other module knows a script's calling convention.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from typing import Any

from redis.asyncio import Redis
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError

from ..errors import (
    AlreadyResponded,
    InvalidTransition,
    NotFound,
    SessionError,
    UnknownQuery,
)
from ..keys import Keys
from ..wire import Wire

_NAMES = (
    "create", "feed", "commit_step", "terminate", "lock_acquire", "lock_release",
    "step_begin", "retire_consumers",
)


def source(name: str) -> str:
    return resources.files(__package__).joinpath(f"{name}.lua").read_text(encoding="utf-8")


@dataclass(frozen=True, slots=True)
class Reply:
    """A script's reply: a status code and its arguments, bytes decoded where textual."""

    code: str
    args: tuple[Any, ...]


def parse(raw: Any) -> Reply:
    code = raw[0].decode() if isinstance(raw[0], bytes) else str(raw[0])
    return Reply(code, tuple(raw[1:]))


def raise_for(reply: Reply, *, session_id: str, query_id: str | None = None) -> None:
    """Map the error codes shared by the session scripts to the exception tree."""
    code = reply.code
    if code == "NOT_FOUND":
        raise NotFound(
            f"session {session_id} not found: it never existed, or it finished and its "
            "retention period ran out",
            session_id=session_id,
        )
    if code == "UNKNOWN_QUERY":
        raise UnknownQuery(
            f"query {query_id!r} is not pending in session {session_id}; "
            "list the pending ids with `status --pending meta`",
            session_id=session_id,
            query_id=query_id,
        )
    if code == "ALREADY_RESPONDED":
        raise AlreadyResponded(
            f"query {query_id!r} of session {session_id} has an answer already",
            session_id=session_id,
            query_id=query_id,
        )
    if code == "INVALID_TRANSITION":
        phase = _text(reply.args[0])
        hint = {
            "running": "it is running, not waiting for answers; wait for its next event",
        }.get(phase, "it has finished")
        raise InvalidTransition(
            f"session {session_id} is {phase}: {hint}",
            session_id=session_id,
            query_id=query_id,
            state=phase,
        )
    if code != "OK":
        raise SessionError(f"unexpected script reply {code} for session {session_id}",
                           session_id=session_id)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class Terminate:
    """Typed front of ``terminate.lua``: the ways a session ends from outside its strategy."""

    def __init__(self, scripts: Scripts, keys: Keys, group: str, retention_ms: int) -> None:
        self._scripts = scripts
        self._keys = keys
        self._group = group
        self._retention_ms = retention_ms

    async def _run(self, sid: str, mode: str, *, now_ms: int | None = None, error: str = "",
                   dead_letter: str = "") -> Reply:
        return await self._scripts.call(
            "terminate", self._keys.script_keys(sid),
            [sid, mode, self._group, self._keys.session(sid).channel, self._retention_ms,
             "" if now_ms is None else now_ms, error, dead_letter],
        )

    async def cancel(self, sid: str) -> Reply:
        return await self._run(sid, "cancel")

    async def expire(self, sid: str, *, now_ms: int | None, error: str) -> Reply:
        """Expire ``sid`` if it is still idle past its deadline (re-checked atomically)."""
        return await self._run(sid, "expire", now_ms=now_ms, error=error)

    async def fail(self, sid: str, error: str, *, dead_letter: str = "") -> Reply:
        """Fail ``sid`` with ``error``; with ``dead_letter`` (the reason), also record its job
        in the dead-letter stream."""
        return await self._run(sid, "fail", error=error, dead_letter=dead_letter)


class JobGroup:
    """Typed front of ``retire_consumers.lua``: the job group's consumers, one per worker
    process that ever read a job."""

    def __init__(self, scripts: Scripts, keys: Keys, group: str) -> None:
        self._scripts = scripts
        self._keys = keys
        self._group = group

    async def retire(self, names: list[str]) -> list[str]:
        """Drop those of ``names`` that hold no pending job; returns the ones dropped."""
        if not names:
            return []
        raw = await self._scripts.call_raw("retire_consumers", [self._keys.jobs],
                                           [self._group, *names])
        return [_text(x) for x in raw]


class Scripts:
    """One client's registered scripts, called by SHA (and loaded again on NOSCRIPT, after a
    restart or a SCRIPT FLUSH). On a real Redis they travel over a ``Wire``; on fakeredis
    through redis-py's ``Script`` objects."""

    def __init__(self, client: Redis) -> None:
        self._by_name: dict[str, AsyncScript] = {
            name: client.register_script(source(name)) for name in _NAMES
        }
        self.wire = Wire.for_client(client)

    async def call(self, name: str, keys: list[str], args: list[Any]) -> Reply:
        return parse(await self.call_raw(name, keys, args))

    async def call_raw(self, name: str, keys: list[str], args: list[Any]) -> Any:
        if self.wire is None:
            return await self._by_name[name](keys=keys, args=args)
        script = self._by_name[name]
        try:
            return await self.wire.execute("EVALSHA", script.sha, len(keys), *keys, *args)
        except NoScriptError:
            await self.wire.execute("SCRIPT", "LOAD", script.script)
            return await self.wire.execute("EVALSHA", script.sha, len(keys), *keys, *args)

    async def aclose(self) -> None:
        if self.wire is not None:
            await self.wire.aclose()
