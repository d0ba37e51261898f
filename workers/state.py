"""A session's stored state, turned into what a strategy needs: the round's answers, and an
execution rebuilt from the journal when the worker holds none in memory.

Apart from the step because none of it touches Redis or lock A: it decodes what the step
read and re-runs a strategy, so it can be checked on its own. Replay is what lets any worker
take over any session (its holder died, or evicted it to bound memory), and it must land
exactly where the session is: a strategy that asks anything else on the way, or at the end,
fails the session as non-deterministic rather than resume from a state nobody answered.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from coordinator.codec import unpack
from coordinator.errors import CorruptState, NotFound, SessionError
from coordinator.records import SessionRecord, decode_queries

from . import catalog
from .effects import Durable
from .runtime import (
    Ask,
    Crash,
    Execution,
    JournalRound,
    Outcome,
    digest,
    exchange_facts,
    journal_entry,
)


@dataclass(slots=True)
class Loaded:
    """The session as a step read it; ``journal`` None when not read, [] when empty."""

    rec: SessionRecord
    pending: dict[bytes, bytes]
    answers: dict[bytes, bytes]
    journal: list[bytes] | None = None

    @classmethod
    def parse(
        cls, sid: str, session: dict[bytes, bytes], pending: dict[bytes, bytes],
        answers: dict[bytes, bytes], journal: list[bytes] | None,
    ) -> Loaded:
        if not session:
            raise NotFound(f"session {sid} vanished", session_id=sid)
        return cls(SessionRecord.from_hash(sid, session), pending, answers, journal)


def round_answers(data: Loaded) -> tuple[list[str] | None, bytes]:
    """The answered round in query order, and its journal entry (none for a start).

    One answer per question, or ``CorruptState``: the strategy is resumed with these by
    position, so a round whose questions or answers cannot all be read must fail the
    session, never resume it with fewer (or other) answers than it asked for."""
    rec = data.rec
    if rec.asked == 0:
        return None, b""
    queries = decode_queries(rec, data.pending)
    if not queries:
        raise CorruptState(f"session {rec.sid} is running round {rec.asked} but no question "
                           "of it is recorded", session_id=rec.sid)
    records = [_record(rec, q.id, data.answers.get(q.id.encode())) for q in queries]
    answers = [str(r["r"]) for r in records]  # as a handoff's answers are read (step.py)
    facts = exchange_facts(queries, answers, records, rec.paused_at)
    return answers, journal_entry(queries, answers, facts)


def _record(rec: SessionRecord, qid: str, raw: bytes | None) -> dict[str, Any]:
    """One stored answer (``{"r": text, "u": usage?, "t": time}`` as ``feed`` packs it)."""
    if raw is None:
        raise CorruptState(f"session {rec.sid} is running round {rec.asked} but "
                           f"query {qid} has no answer", session_id=rec.sid, query_id=qid)
    record = unpack(raw, what="answer", session_id=rec.sid)
    if not isinstance(record, dict) or "r" not in record:
        raise CorruptState(f"session {rec.sid}: the answer to query {qid} of round "
                           f"{rec.asked} is not an answer ({record!r:.200})",
                           session_id=rec.sid, query_id=qid)
    return record


def new_execution(rec: SessionRecord, *, max_result_bytes: int,
                  durable: Durable | None = None) -> Execution | Crash:
    """A new execution of the session's strategy; a Crash when no such strategy is here.
    ``durable``: the worker's way to record side effects and state ops (``effects.py``);
    each execution gets effects of its own, counting its calls from its start, as a replay
    counts them again."""
    try:
        fn = catalog.get(rec.strategy)
    except SessionError as exc:
        return Crash.of(exc)
    return Execution(fn, rec.input or {}, budget=rec.budget, started_at_ms=rec.started_at,
                     max_result_bytes=max_result_bytes, session_id=rec.sid,
                     effects=durable.for_session(rec.sid) if durable is not None else None)


def read_journal(data: Loaded) -> list[JournalRound]:
    """The journal's rounds as ``journal_entry`` wrote them."""
    rounds = []
    for n, raw in enumerate(data.journal or [], start=1):
        entry = unpack(raw, what="journal entry", session_id=data.rec.sid)
        try:
            d, triples = entry
            answers = [t[2] for t in triples]
        except (TypeError, ValueError, IndexError, KeyError) as exc:
            raise CorruptState(f"session {data.rec.sid}: journal round {n} is not a round "
                               f"({exc!r})", session_id=data.rec.sid) from exc
        if not isinstance(d, bytes) or not all(isinstance(a, str) for a in answers):
            raise CorruptState(f"session {data.rec.sid}: journal round {n} is not a round",
                               session_id=data.rec.sid)
        rounds.append(JournalRound(d, answers))
    return rounds


async def replay(
    ex: Execution, data: Loaded, journal: list[JournalRound], answers: list[str],
    timeout_s: float,
) -> tuple[Execution | None, Outcome]:
    """Run the new ``ex`` through ``journal``, check that it asks the session's pending
    questions again, and resume it with their ``answers``."""
    rec = data.rec
    try:
        out = await ex.replay(journal, timeout_s)
        current = decode_queries(rec, data.pending)
        if not isinstance(out, Ask) or digest(out.queries) != digest(current):
            ex.close()
            return None, Crash(
                f"non-determinism: on replay, round {rec.asked} did not ask the questions "
                "that were answered; strategies must ask the same questions given the "
                "same answers", "non_determinism")
        return ex, await ex.step(answers, timeout_s)
    except SessionError as exc:
        ex.close()
        return None, Crash.of(exc)
