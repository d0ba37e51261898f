"""Snapshots: what observers (``list_snapshots``, ``status``) see of a session.

Reads are plain pipelined reads with no lock at all: a snapshot is a consistent-enough view
for observation, and never taking a lock is what keeps observers from ever slowing a feed
(the original's ``list_snapshots`` held the registry lock and blocked every feed).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from redis.asyncio import Redis

from .codec import unpack
from .errors import CorruptState
from .keys import Keys
from .models import PendingFilter
from .records import SessionRecord, decode_queries

HISTORY_EXCHANGES = 10
CHUNK = 500


def build(
    rec: SessionRecord,
    *,
    pending: dict[bytes, bytes],
    answered: set[bytes],
    logs: list[bytes],
    journal_tail: list[bytes] | None,
    pending_filter: PendingFilter | None,
) -> dict[str, Any]:
    metrics: dict[str, Any] = {
        "elapsed_ms": rec.elapsed_ms,
        "llm_calls": rec.counters["llm_calls"],
        "rounds": rec.counters["rounds"],
        "tokens": {**rec.tokens(), "current_query": rec.current_query_tokens},
        "recent_logs": [unpack(x, what="log entry", session_id=rec.sid) for x in logs],
    }
    if rec.progress is not None:
        metrics["progress"] = rec.progress
    remaining = rec.budget_remaining()
    if remaining is not None:
        metrics["budget_remaining"] = remaining
    snap: dict[str, Any] = {
        "state": rec.phase.state,
        "phase": rec.phase.value,
        "started_at": rec.started_at,
        "last_activity_at": rec.last_activity_at,
        "strategy": rec.strategy,
        "metrics": metrics,
    }
    if not rec.phase.terminal:
        snap["pending_queries"] = rec.remaining if rec.phase.value == "paused" else 0
    if pending_filter is not None:
        queries = decode_queries(rec, pending, answered)
        snap["pending"] = [pending_filter.project(q) for q in queries]
    if journal_tail is not None:
        snap["conversation_history"] = history(rec.sid, journal_tail)
    return snap


def history(sid: str, journal_tail: list[bytes]) -> list[dict[str, Any]]:
    exchanges: list[dict[str, Any]] = []
    for raw in journal_tail:
        entry = unpack(raw, what="journal entry", session_id=sid)
        for qid, prompt, response in entry[1]:
            exchanges.append({"query_id": qid, "prompt": prompt, "response": response})
    return exchanges[-HISTORY_EXCHANGES:]


async def read_many(
    client: Redis,
    keys: Keys,
    sids: Iterable[str],
    *,
    pending_filter: PendingFilter | None,
    include_history: bool,
) -> dict[str, dict[str, Any]]:
    """Snapshots of ``sids``, one pipelined round trip per chunk; vanished ones are left out.

    A session whose hash does not decode is shown with phase ``corrupt`` rather than
    failing the whole listing: one bad session must not blind the observer to the rest.
    """
    out: dict[str, dict[str, Any]] = {}
    batch = list(sids)
    per = 2 + (2 if pending_filter is not None else 0) + (1 if include_history else 0)
    for start in range(0, len(batch), CHUNK):
        chunk = batch[start : start + CHUNK]
        pipe = client.pipeline(transaction=False)
        for sid in chunk:
            sk = keys.session(sid)
            pipe.hgetall(sk.session)
            pipe.lrange(sk.logs, 0, -1)
            if pending_filter is not None:
                pipe.hgetall(sk.pending)
                pipe.hkeys(sk.answers)
            if include_history:
                pipe.lrange(sk.journal, -HISTORY_EXCHANGES, -1)
        replies = await pipe.execute()
        for n, sid in enumerate(chunk):
            r = replies[n * per : (n + 1) * per]
            if not r[0]:
                continue
            pos = 2
            pending: dict[bytes, bytes] = {}
            answered: set[bytes] = set()
            if pending_filter is not None:
                pending, answered, pos = r[2], set(r[3]), 4
            tail = r[pos] if include_history else None
            try:
                rec = SessionRecord.from_hash(sid, r[0])
                out[sid] = build(rec, pending=pending, answered=answered, logs=r[1],
                                 journal_tail=tail, pending_filter=pending_filter)
            except CorruptState as exc:
                out[sid] = {"state": "terminal", "phase": "corrupt", "error": exc.message}
    return out
