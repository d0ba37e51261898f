"""The Lua scripts: loaded once from their ``.lua`` files, called by SHA, one typed method each.

Each script's header names its KEYS and ARGV in order (``-- KEYS: session pending ...`` and
``-- ARGV: sid query_id ...``; a last name starting with ``*`` takes a list). That header is
the only statement of a script's calling convention: ``Script.bind`` orders the named keys
and arguments by it and refuses a call that names others, so no list of KEYS or ARGV is built
by hand anywhere. The methods of ``Scripts`` are the only callers; they return typed replies
and leave the mapping of error codes to exceptions to ``raise_for``.
"""

from __future__ import annotations

import functools
import hashlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any

from ..errors import (
    AlreadyResponded,
    CorruptState,
    InvalidInput,
    InvalidTransition,
    NotFound,
    SessionError,
    StaleRound,
    UnknownQuery,
)
from ..keys import JOB_GROUP, Keys
from ..records import as_hash
from ..shards import ShardMap
from ..transport import Transport

NAMES = (
    "create", "feed", "commit_step", "terminate", "lock_acquire", "lock_release",
    "lock_extend", "step_begin", "retire_consumers", "effect", "state_op",
)
_SECTION = re.compile(r"^-- (KEYS|ARGV):(.*)$")
_MORE = re.compile(r"^--\s{2,}(\S.*)$")


def _file(name: str) -> str:
    return resources.files(__package__).joinpath(f"{name}.lua").read_text(encoding="utf-8")


def source(name: str) -> str:
    """What runs: the script with ``_prelude.lua``'s helpers spliced in after its header
    comments (Redis scripts cannot load one another, and copying the helpers into each
    file would let them drift apart)."""
    lines = _file(name).splitlines(keepends=True)
    head = next((n for n, line in enumerate(lines) if not line.startswith("--")), len(lines))
    return "".join(lines[:head]) + _file("_prelude") + "".join(lines[head:])


def header(text: str) -> dict[str, tuple[str, ...]]:
    """The ``KEYS`` and ``ARGV`` names a script's header declares, in order."""
    out: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in text.splitlines():
        if not line.startswith("--"):
            break
        if m := _SECTION.match(line):
            current = out.setdefault(m.group(1), [])
            current.extend(m.group(2).split())
        elif current is not None and (m := _MORE.match(line)):
            current.extend(m.group(1).split())
        else:
            current = None
    return {k: tuple(v) for k, v in out.items()}


@dataclass(frozen=True, slots=True)
class Script:
    name: str
    source: str
    sha: str
    keys: tuple[str, ...]
    argv: tuple[str, ...]

    @classmethod
    def load(cls, name: str) -> Script:
        text = source(name)
        decl = header(_file(name))
        if "KEYS" not in decl or "ARGV" not in decl:
            raise RuntimeError(f"{name}.lua declares no KEYS/ARGV header")
        return cls(name, text, hashlib.sha1(text.encode()).hexdigest(), decl["KEYS"],
                   decl["ARGV"])

    def bind(self, keys: Mapping[str, str], argv: Mapping[str, Any]) -> tuple[list[str],
                                                                             list[Any]]:
        """KEYS and ARGV in header order; a name missing or unknown is a bug, said here."""
        if len(keys) != len(self.keys) or len(argv) != len(self.argv):
            raise TypeError(f"{self.name}.lua takes KEYS {self.keys} and ARGV {self.argv}; "
                            f"got {tuple(keys)} and {tuple(argv)}")
        key_list = [keys[k] for k in self.keys]
        if not self.argv or not self.argv[-1].startswith("*"):
            return key_list, [argv[name] for name in self.argv]
        args = [argv[name] for name in self.argv[:-1]]  # the hot path: no per-name tests
        args.extend(argv[self.argv[-1]])
        return key_list, args


_SCRIPTS = {name: Script.load(name) for name in NAMES}
#: The scripts whose state changes a caller is told about: with ``wait_replicas`` set, each
#: waits for the replicas' acknowledgement before its caller hears of it.
_TOLD = frozenset({"create", "feed", "commit_step", "terminate", "effect", "state_op"})


@dataclass(frozen=True, slots=True)
class Reply:
    """A script's reply: a status code and its arguments."""

    code: str
    args: tuple[Any, ...] = ()


def _parse(raw: Any) -> Reply:
    code = raw[0].decode() if isinstance(raw[0], bytes) else str(raw[0])
    return Reply(code, tuple(raw[1:]))


@dataclass(frozen=True, slots=True)
class FeedReply:
    """``ready``: this answer completed the round (``asked`` is the round); else
    ``remaining`` answers are still missing."""

    ready: bool
    remaining: int = 0
    asked: int = 0


@dataclass(frozen=True, slots=True)
class Lease:
    """What a lock acquisition got: ``fence`` > 0 when taken, else the holder's ``pttl``.
    Taken with ``pttl`` -1: from a holder whose connection to Redis was gone."""

    fence: int
    pttl: int


@dataclass(frozen=True, slots=True)
class StepBegin:
    """``step_begin``: the lease, and when taken, the session as the step needs it."""

    lease: Lease
    session: dict[bytes, bytes]
    pending: dict[bytes, bytes]
    answers: dict[bytes, bytes]
    journal: list[bytes] | None


def raise_for(reply: Reply, *, session_id: str, query_id: str | None = None) -> None:
    """Map the error codes shared by the session scripts to the exception tree."""
    _raise_refusal(reply, session_id)
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


def _raise_refusal(reply: Reply, session_id: str) -> None:
    """A script that refused its call before writing anything: ``BAD_ARG`` (an argument out
    of its range: a caller's value, or a bug in ours) or ``CORRUPT`` (a number in the session
    that is not one). Raised by every typed method, so no caller mistakes a refusal for an
    ordinary outcome such as a stale step."""
    if reply.code == "BAD_ARG":
        name = _text(reply.args[0]) if reply.args else "?"
        raise InvalidInput(
            f"session {session_id}: argument {name} was refused by the script (out of range, "
            "not a whole number, empty or missing); nothing was written",
            session_id=session_id,
        )
    if reply.code == "CORRUPT":
        name = _text(reply.args[0]) if reply.args else "?"
        raise CorruptState(
            f"session {session_id}: its field {name!r} is not a number this coordinator "
            "wrote; nothing was written",
            session_id=session_id,
        )


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class Scripts:
    """One typed method per script. ``keys`` names every key, so callers pass a session id
    and the values; nothing else knows which keys a script touches."""

    def __init__(self, transport: Transport, shards: ShardMap, *, wait_replicas: int = 0,
                 wait_replicas_timeout_ms: int = 1000) -> None:
        self._transport = transport
        self._shards = shards
        self._replicas = wait_replicas
        self._wait_ms = wait_replicas_timeout_ms

    async def _run(self, name: str, keys: Mapping[str, str], argv: Mapping[str, Any],
                   timeout: float | None = None) -> Any:
        script = _SCRIPTS[name]
        key_list, args = script.bind(keys, argv)
        if self._replicas and name in _TOLD:
            return await self._transport.evalsha_replicated(
                script.sha, script.source, key_list, args, replicas=self._replicas,
                wait_ms=self._wait_ms, timeout=timeout)
        return await self._transport.evalsha(script.sha, script.source, key_list, args,
                                             timeout=timeout)

    def _session(self, sid: str, script: str) -> dict[str, str]:
        return _session_keys(self._shards.of(sid), sid, script)

    async def create(self, sid: str, *, strategy: str, input: bytes, budget: bytes,
                     ttl_ms: int, backstop_ms: int) -> Reply:
        """``OK`` (job id); raises ``InvalidInput`` for an argument the script refused."""
        reply = _parse(await self._run("create", self._session(sid, "create"), {
            "sid": sid, "strategy": strategy, "input": input, "budget": budget,
            "ttl_ms": ttl_ms, "backstop_ms": backstop_ms,
            "wake_channel": self._shards.of(sid).jobs_wake,
            "activity": self._shards.of(sid).activity}))
        _raise_refusal(reply, sid)
        return reply

    async def feed(self, sid: str, query_id: str, *, answer: bytes, response_chars: int,
                   response_tokens: int, backstop_ms: int, token: str, lease_ms: int,
                   round: int = 0, exact: bool = True, prompt_delta: int = 0,
                   provided: str = "", timeout: float | None = None) -> FeedReply:
        """Raises the session errors (``raise_for``) for a refused answer; ``StaleRound``
        when ``round`` (0: not checked) is not the round the session is at (``exact``), or
        is past it (not ``exact``: the session went back, as after a failover)."""
        shard = self._shards.of(sid)
        reply = _parse(await self._run("feed", self._session(sid, "feed"), {
            "sid": sid, "query_id": query_id, "answer": answer,
            "response_chars": response_chars, "response_tokens": response_tokens,
            "backstop_ms": backstop_ms, "wake_channel": shard.jobs_wake,
            "token": token,
            "lease_ms": lease_ms, "round": round, "exact": "1" if exact else "0",
            "channel": shard.session(sid).channel, "prompt_delta": prompt_delta,
            "provided": provided, "activity": shard.activity},
            timeout))
        if reply.code == "ACCEPTED":
            return FeedReply(False, remaining=int(reply.args[0]))
        if reply.code == "READY":
            return FeedReply(True, asked=int(reply.args[0]))
        if reply.code == "STALE_ROUND":
            at = int(reply.args[0])
            raise StaleRound(
                f"query {query_id!r} was answered for round {round} of session {sid}, but the "
                f"session is at round {at} (another caller answered meanwhile, or a Redis "
                "failover took it back to an earlier pause); nothing was written: re-read it "
                "(wait_event) and answer the queries it shows",
                session_id=sid, query_id=query_id, state=f"round {at}")
        raise_for(reply, session_id=sid, query_id=query_id)
        raise AssertionError("unreachable")

    async def commit_step(self, sid: str, *, fence: int, asked: int, token: str | bytes,
                          holder: str, holder_channel: str, backstop_ms: int,
                          retention_ms: int, journal_entry: bytes, progress: bytes,
                          llm_calls: int, prompt_chars: int, prompt_tokens: int, outcome: str,
                          event: bytes, rest: Sequence[Any], custom: bytes = b"",
                          query_deadline: int | None = None) -> Reply:
        """``OK`` | ``NOT_FOUND`` | ``FENCED`` (fence) | ``STALE`` (asked) |
        ``INVALID_TRANSITION`` (phase); ``rest`` as the script's header describes. Raises
        ``InvalidInput`` / ``CorruptState`` for a call the script refused before writing."""
        shard = self._shards.of(sid)
        sk = shard.session(sid)
        reply = _parse(await self._run("commit_step", self._session(sid, "commit_step"), {
            "sid": sid, "fence": fence, "asked": asked, "token": token, "group": JOB_GROUP,
            "channel": sk.channel, "released_channel": Keys.lock_released(sk.lock),
            "holder": holder, "holder_channel": holder_channel, "backstop_ms": backstop_ms,
            "retention_ms": retention_ms, "journal_entry": journal_entry,
            "progress": progress, "custom": custom,
            "query_deadline": "" if query_deadline is None else query_deadline,
            "llm_calls": llm_calls,
            "prompt_chars": prompt_chars,
            "prompt_tokens": prompt_tokens, "outcome": outcome, "event": event,
            "activity": shard.activity, "*rest": rest}))
        _raise_refusal(reply, sid)
        return reply

    async def terminate(self, sid: str, mode: str, *, retention_ms: int,
                        now_ms: int | None = None, error: str = "",
                        dead_letter: str = "", error_type: str = "",
                        traceback: str = "") -> Reply:
        """``OK`` | ``NOT_FOUND`` | ``INVALID_TRANSITION`` (phase) | ``ALIVE`` (deadline) |
        ``BUSY`` (``expire`` of a running session: not idle). Raises ``InvalidInput`` /
        ``CorruptState`` for a call the script refused before writing."""
        shard = self._shards.of(sid)
        reply = _parse(await self._run("terminate", self._session(sid, "terminate"), {
            "sid": sid, "mode": mode, "group": JOB_GROUP,
            "channel": shard.session(sid).channel, "retention_ms": retention_ms,
            "now_ms": "" if now_ms is None else now_ms, "error": error,
            "dead_letter": dead_letter, "error_type": error_type, "traceback": traceback,
            "activity": shard.activity}))
        _raise_refusal(reply, sid)
        return reply

    async def lock_acquire(self, lock: str, fence_key: str, *, token: str | bytes,
                           lease_ms: int, fence_field: str, shard: Keys | None = None) -> Lease:
        """``shard``: the shard the lock lives in (its holders' liveness channels are
        there); None: the first (unsharded, the only one)."""
        live = (shard or self._shards.all[0]).process_channel("")
        return _lease(await self._run("lock_acquire", {"lock": lock, "fence": fence_key},
                                      {"token": token, "lease_ms": lease_ms,
                                       "fence_field": fence_field, "live_prefix": live}))

    async def lock_release(self, lock: str, *, token: bytes, released_channel: str) -> bool:
        return bool(await self._run("lock_release", {"lock": lock},
                                    {"token": token, "released_channel": released_channel}))

    async def lock_extend(self, lock: str, *, token: bytes, lease_ms: int) -> bool:
        return bool(await self._run("lock_extend", {"lock": lock},
                                    {"token": token, "lease_ms": lease_ms}))

    async def step_begin(self, sid: str, *, token: str, lease_ms: int,
                         with_journal: bool) -> StepBegin:
        keys = self._shards.of(sid)
        sk = keys.session(sid)
        raw = await self._run("step_begin", {
            "lock": sk.lock, "session": sk.session, "pending": sk.pending,
            "answers": sk.answers, "journal": sk.journal},
            {"token": token, "lease_ms": lease_ms, "with_journal": "1" if with_journal else "0",
             "live_prefix": keys.process_channel("")})
        lease = _lease(raw[:2])
        if lease.fence <= 0:
            return StepBegin(lease, {}, {}, {}, None)
        return StepBegin(lease, as_hash(raw[2]), as_hash(raw[3]), as_hash(raw[4]),
                         raw[5] if isinstance(raw[5], list) else None)

    async def retire_consumers(self, shard: Keys, names: Sequence[str]) -> list[str]:
        """Drop those of ``names`` that hold no pending job in ``shard``'s job group;
        returns the ones dropped."""
        if not names:
            return []
        raw = await self._run("retire_consumers", {"jobs": shard.jobs},
                              {"group": JOB_GROUP, "*names": names})
        return [_text(x) for x in raw]

    async def effect(self, sid: str, field: str, value: bytes) -> Reply:
        """Record ``value`` under ``field`` of session ``sid`` unless a value is recorded
        there already: ``OK`` (value) when this call recorded it, ``RECORDED`` (value) with
        the value kept; raises ``NotFound`` / ``InvalidTransition`` (a session gone, or no
        longer running: nothing is recorded for it) and ``InvalidInput`` for a refused call."""
        reply = _parse(await self._run("effect", {"session": self._shards.of(sid).session(
            sid).session}, {"field": field, "value": value}))
        if reply.code not in ("OK", "RECORDED"):
            raise_for(reply, session_id=sid)
        return reply

    async def state_op(self, value_key: str, marker_key: str, *, op: str, arg: bytes | str,
                       retention_ms: int) -> Reply:
        """Apply ``op`` to a ctx.state key once per op id (its marker): ``APPLIED`` or
        ``RECORDED`` (marker), ``OTHER_OP`` (marker) when the op id was used by another op;
        raises ``InvalidInput`` for a call the script refused."""
        reply = _parse(await self._run("state_op", {"value": value_key, "marker": marker_key},
                                       {"op": op, "arg": arg, "retention_ms": retention_ms}))
        if reply.code == "BAD_ARG":
            raise InvalidInput(f"ctx.state: argument {_text(reply.args[0])} of {op!r} on "
                               f"{value_key!r} was refused by state_op.lua; nothing was "
                               "written")
        return reply


@functools.lru_cache(maxsize=16384)
def _session_keys(keys: Keys, sid: str, script: str) -> dict[str, str]:
    """The named keys ``script`` (a session script) declares, for ``sid``. Cached (a host
    and a worker name the same few thousand sessions every step) and never mutated:
    ``Script.bind`` only reads it."""
    sk = keys.session(sid)
    every = {"session": sk.session, "pending": sk.pending, "answers": sk.answers,
             "journal": sk.journal, "logs": sk.logs, "registry": keys.registry,
             "deadlines": keys.deadlines, "jobs": keys.jobs, "dead": keys.dead_letters,
             "lock": sk.lock, "fed": sk.fed, "fed_prev": sk.fed_prev,
             "running": keys.running, "completed": keys.done("completed"),
             "failed": keys.done("failed"), "cancelled": keys.done("cancelled")}
    return {name: every[name] for name in _SCRIPTS[script].keys}


def _lease(raw: Any) -> Lease:
    """-1: nothing to lock (the session is gone); -2: its fence is not a number (corrupt);
    0: held by another (``pttl`` says for how long); above 0: taken, with that fence (and
    ``pttl`` -1 when taken from a holder whose connection was gone)."""
    return Lease(int(raw[0]), int(raw[1]))



class Terminate:
    """The ways a session ends from outside its strategy (``terminate.lua``)."""

    def __init__(self, scripts: Scripts, retention_ms: int) -> None:
        self._scripts = scripts
        self._retention_ms = retention_ms

    async def cancel(self, sid: str) -> Reply:
        return await self._scripts.terminate(sid, "cancel", retention_ms=self._retention_ms)

    async def expire(self, sid: str, *, now_ms: int | None, error: str) -> Reply:
        """Expire ``sid`` if it is idle (paused, waiting for its host) past its deadline,
        re-checked atomically: ``BUSY`` when it runs (queued for a worker or mid-step),
        ``ALIVE`` when an answer moved its deadline on; ``CorruptState`` when its clock
        fields are not numbers."""
        return await self._scripts.terminate(sid, "expire", retention_ms=self._retention_ms,
                                             now_ms=now_ms, error=error)

    async def fail(self, sid: str, error: str, *, error_type: str = "worker_error",
                   traceback: str = "", dead_letter: str = "") -> Reply:
        """Fail ``sid`` with ``error`` of ``error_type`` (``errors.FAILURE_TYPES``); with
        ``dead_letter`` (the reason), also record its job in the dead-letter stream. A
        ``traceback`` is kept with the error (the session shows it)."""
        return await self._scripts.terminate(sid, "fail", retention_ms=self._retention_ms,
                                             error=error, dead_letter=dead_letter,
                                             error_type=error_type, traceback=traceback)
