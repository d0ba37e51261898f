"""Per-query deadlines: a question the host did not answer in time gets its default answer,
or fails the session (``ctx.llm(..., deadline_s=..., on_timeout=...)``).

The worker that pauses a session stores each query's deadline in its record and the round's
earliest one in the session hash (``qdl``), and files the session in the deadline index at
that time when it comes before the idle deadline (``commit_step.lua``; ``feed.lua`` keeps it
so). The GC sweep finds it due there as it finds idle sessions, and ``terminate.lua``'s expire
answers ``DUE`` instead of expiring it; the sweep then calls ``fire`` under the session's
lock A (order C then A, as for every expiry).

Exactly once: a default answer goes through ``feed.lua`` like a host's (for the round it was
asked in, so an answer that raced it wins and the default is refused, and the last answer
queues the resume job as a host's would); a failure goes through ``terminate.lua``, which
ends a session once. The host sees either its own answer or the default, never both.
"""

from __future__ import annotations

import logging
import secrets
from typing import Any

from .codec import estimate_tokens, pack
from .errors import SessionError
from .keys import Keys
from .records import SessionRecord, as_hash, decode_queries
from .scripts import Scripts, Terminate
from .settings import Settings
from .states import Phase
from .transport import Transport, checked

log = logging.getLogger(__name__)


async def fire(transport: Transport, keys: Keys, scripts: Scripts, terminate: Terminate,
               settings: Settings, sid: str, now: int) -> str:
    """Apply the deadlines of ``sid``'s round that passed by ``now`` (Unix ms); says what it
    did: ``defaulted``, ``failed``, or ``nothing`` (answered meanwhile, or no longer paused)."""
    sk = keys.session(sid)
    raw, pending, answered = checked(await transport.execute_many([
        ("HGETALL", sk.session), ("HGETALL", sk.pending), ("HKEYS", sk.answers)]))
    session = as_hash(raw)
    if not session:
        return "nothing"
    rec = SessionRecord.from_hash(sid, session)
    if rec.phase is not Phase.PAUSED:
        return "nothing"
    open_queries = decode_queries(rec, as_hash(pending), set(answered))
    due = [q for q in open_queries if q.deadline_at is not None and q.deadline_at <= now]
    if not due:
        await _refile(transport, keys, sid, open_queries)
        return "nothing"
    failing = [q for q in due if q.on_timeout is None]
    if failing:
        ids = ", ".join(q.id for q in failing)
        await terminate.fail(sid, f"deadline passed: query {ids} of round {rec.asked} was not "
                             "answered in time and has no default answer (on_timeout)",
                             error_type="deadline")
        log.info("session %s: query %s passed its deadline unanswered; session failed",
                 sid, ids, extra={"session_id": sid})
        return "failed"
    reply: Any = None
    for q in due:
        default = q.on_timeout or ""
        try:
            reply = await scripts.feed(
                sid, q.id, answer=pack({"r": default, "deadline": True}),
                response_chars=len(default), response_tokens=estimate_tokens(default),
                backstop_ms=settings.backstop_ms, token=secrets.token_hex(16),
                lease_ms=settings.lease_ms, round=rec.asked, exact=True)
        except SessionError as exc:  # answered, or the round moved on: the host's won
            log.info("session %s: default for %s not applied (%s)", sid, q.id, exc.code,
                     extra={"session_id": sid})
            continue
        log.info("session %s: query %s passed its deadline; answered with its default",
                 sid, q.id, extra={"session_id": sid})
    if reply is not None and not reply.ready:
        rest = [q for q in open_queries if q not in due]
        await _refile(transport, keys, sid, rest)
    return "defaulted"


async def _refile(transport: Transport, keys: Keys, sid: str, queries: list[Any]) -> None:
    """Point the round's deadline (``qdl``) at the earliest one still open, or drop it, so
    the sweep does not find the session due again for deadlines already applied."""
    left = [q.deadline_at for q in queries if q.deadline_at is not None]
    sk = keys.session(sid)
    if left:
        await transport.execute("HSET", sk.session, "qdl", min(left))
    else:
        await transport.execute("HDEL", sk.session, "qdl")
