"""Snapshots: what observers (``list_snapshots``, ``status``) see of a session.

Observers take no lock at all: a snapshot is a consistent-enough view for observation, and
never taking a lock is what keeps observers from ever slowing a feed (the original's
``list_snapshots`` held the registry lock and blocked every feed). Sessions are read with
plain commands (HMGET of the fields a snapshot shows, LRANGE of the recent logs), pipelined
in batches over the process's command connection (``coordinator.transport``), the next
batch in flight while the last one is built.
Plain commands rather than one script per batch: Redis serves other clients between the
commands of a pipeline (every 16 KiB it reads), but never inside a script, so a feed waits
behind a few commands, not behind a whole batch; and native commands cost Redis a third of
what the same reads cost from Lua.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import gc
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import msgpack

from .codec import unpack
from .errors import CorruptState
from .keys import SUFFIX, Keys
from .models import LlmQuery, PendingView
from .records import as_hash, budget_left, clock_lesson, server_now_ms
from .states import Phase

HISTORY_EXCHANGES = 10
BATCH = 200
AHEAD = 2  # batches in flight

#: Runs a batch of commands, replies in order (errors as exception objects).
Batcher = Callable[[list[tuple[Any, ...]]], Awaitable[list[Any]]]

#: The session hash fields a snapshot reads, in the order ``_build`` unpacks them.
FIELDS = (
    "phase", "strategy", "started_at", "last_activity_at", "remaining", "finished_at",
    "budget", "progress", "cq_tokens", "qids", "m:llm_calls", "m:rounds", "m:prompt_tokens",
    "m:response_tokens", "asked", "m:logs", "error_type", "custom", "paused_at",
)
#: phase bytes -> (state, phase, terminal); looked up once per session, no enum work.
_PHASES = {p.value.encode(): (p.state, p.value, p.terminal) for p in Phase}


def _build(sid: str, fields: list[Any], logs: list[bytes], pending: Any, answered: Any,
           journal: JournalTail | None, pf: PendingView | None, now: int) -> dict[str, Any]:
    (phase_b, strategy, started, last, remaining, finished, budget, progress, cq, qids,
     calls, rounds, ptok, rtok, asked, nlogs, error_type, custom, paused_at) = fields
    known = _PHASES.get(phase_b)
    if known is None or started is None or last is None or strategy is None:
        raise CorruptState(f"session {sid} has a corrupt or incomplete hash", session_id=sid)
    state, phase, terminal = known
    start_ms = int(started)
    elapsed = (int(finished) if finished else now) - start_ms
    prompt_total = int(ptok) if ptok else 0
    response_total = int(rtok) if rtok else 0
    metrics: dict[str, Any] = {
        "elapsed_ms": elapsed if elapsed > 0 else 0,
        "llm_calls": int(calls) if calls else 0,
        "rounds": int(rounds) if rounds else 0,
        "tokens": {"prompt_total": prompt_total, "response_total": response_total,
                   "total": prompt_total + response_total,
                   "current_query": _current_query(sid, phase, qids, cq, paused_at, last)},
        "recent_logs": _numbered(logs, int(nlogs) if nlogs else len(logs)) if logs else [],
    }
    if progress:
        metrics["progress"] = unpack(progress, what="progress", session_id=sid)
    if custom:
        metrics["custom"] = unpack(custom, what="custom metrics", session_id=sid)
    if budget:
        metrics["budget_remaining"] = budget_left(
            unpack(budget, what="budget", session_id=sid), metrics["llm_calls"],
            prompt_total + response_total, metrics["elapsed_ms"])
    snap: dict[str, Any] = {
        "state": state,
        "phase": phase,
        "started_at": start_ms,
        "last_activity_at": int(last),
        "strategy": strategy.decode(),
        "round": int(asked) if asked else 0,
        "metrics": metrics,
    }
    if error_type is not None:
        snap["error_type"] = error_type.decode()
    if not terminal:
        snap["pending_queries"] = int(remaining) if remaining and phase == "paused" else 0
    if pf is not None:
        snap["pending"] = [pf.project(q) for q in _pending(sid, qids, pending, answered)]
    if journal is not None:
        metrics["conversation_history"] = history(sid, journal.entries, journal.first_round)
    return snap


def _current_query(sid: str, phase: str, qids: bytes | None, cq: bytes | None,
                   paused_at: bytes | None, last: bytes) -> dict[str, Any] | None:
    """algocline's ``current_query``: what the host is being waited on (the round's first
    query, its prompt tokens and since when), or None while nothing is."""
    if phase != "paused" or not qids:
        return None
    ids = unpack(qids, what="query ids", session_id=sid)
    return {"query_id": ids[0] if ids else None, "prompt_tokens": int(cq) if cq else 0,
            "started_waiting_at": int(paused_at if paused_at is not None else last)}


def _numbered(logs: list[bytes], total: int) -> list[dict[str, Any]]:
    """The kept log entries (algocline's ``{ts, level, source, message}``), each with its
    ``seq``: its number among every entry the session ever logged (the list keeps the last
    few), so a reader that saw up to N knows what is new. ``total`` counts them all
    (``m:logs``)."""
    first = total - len(logs) + 1
    out = []
    for n, raw in enumerate(logs):
        entry = msgpack.unpackb(raw)
        if isinstance(entry, dict):
            if "msg" in entry and "message" not in entry:  # written before algocline's shape
                entry = {"ts": entry.get("ts"), "level": entry.get("level"),
                         "source": "ctx.log", "message": entry["msg"]}
            entry["seq"] = first + n
        out.append(entry)
    return out


def _pending(sid: str, qids: bytes | None, flat: list[bytes] | dict[bytes, bytes] | None,
             answered: list[bytes] | None) -> list[LlmQuery]:
    if not qids or not flat:
        return []
    by_id = as_hash(flat)
    done = set(answered or ())
    out = []
    for qid in unpack(qids, what="query ids", session_id=sid):
        key = qid.encode()
        if key not in done and key in by_id:
            out.append(LlmQuery.from_record(unpack(by_id[key], what="query", session_id=sid)))
    return out


def history(sid: str, journal_tail: list[bytes], first_round: int = 1) -> list[dict[str, Any]]:
    """The last exchanges as algocline's ``conversation_history`` has them: text, tokens and
    times (null where a round journaled before they were kept), and ours: the ``round`` each
    belongs to (1-based, the snapshot's ``round`` when it was asked), ``first_round`` being
    the round of the tail's first entry."""
    exchanges: list[dict[str, Any]] = []
    for n, raw in enumerate(journal_tail, start=first_round):
        entry = unpack(raw, what="journal entry", session_id=sid)
        for row in entry[1]:
            qid, prompt, response = row[:3]
            facts = row[3] if len(row) > 3 and isinstance(row[3], dict) else {}
            exchanges.append({"query_id": qid, "prompt": prompt, "response": response,
                              "prompt_tokens": facts.get("pt"),
                              "response_tokens": facts.get("rt"),
                              "started_at": facts.get("s"), "completed_at": facts.get("c"),
                              "round": n})
    return exchanges[-HISTORY_EXCHANGES:]


@dataclass(frozen=True)
class JournalTail:
    """The journal's last entries and the round of the first of them.

    The journal holds one entry per answered round, appended in order and never trimmed
    (it is the replay source), so entry i (from 1) is round i, and the tail of a journal of
    n entries starts at round n - len(tail) + 1. The pipeline reads the length on both sides
    of the tail (LLEN, LRANGE, LLEN): equal lengths mean no round was appended between them,
    so the numbering is exact. Redis runs a pipeline's commands back to back except where a
    read of its input buffer ends, so they differ only when a step commits right at such a
    boundary (long listings); then ``racing`` is the length first read, and ``read_many``
    reads the tail again by absolute index, which no later append can move.
    """

    entries: list[bytes]
    first_round: int
    racing: int | None = None

    @classmethod
    def of(cls, before: Any, entries: list[bytes], after: Any) -> JournalTail:
        return cls(entries, int(before) - len(entries) + 1,
                   None if before == after else int(before))


_gc_pauses = [0, False]  # listings in progress; whether the GC was on before the first


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """Counted, so overlapping listings in one process restore the GC exactly once."""
    if _gc_pauses[0] == 0:
        _gc_pauses[1] = gc.isenabled()
        gc.disable()
    _gc_pauses[0] += 1
    try:
        yield
    finally:
        _gc_pauses[0] -= 1
        if _gc_pauses[0] == 0 and _gc_pauses[1]:
            gc.enable()


def _commands(keys: Keys, pf: PendingView | None,
              include_history: bool) -> Callable[[list[str]], list[tuple[Any, ...]]]:
    head, tail = keys.session_template()
    logs, pending, answers, journal = (SUFFIX[k] for k in ("logs", "pending", "answers",
                                                            "journal"))

    def commands(chunk: list[str]) -> list[tuple[Any, ...]]:
        cmds: list[tuple[Any, ...]] = []
        for sid in chunk:
            key = f"{head}{sid}{tail}"
            cmds.append(("HMGET", key, *FIELDS))
            cmds.append(("LRANGE", key + logs, 0, -1))
            if pf is not None:
                cmds.append(("HGETALL", key + pending))
                cmds.append(("HKEYS", key + answers))
            if include_history:  # the tail, with the length on both sides: see JournalTail
                cmds.append(("LLEN", key + journal))
                cmds.append(("LRANGE", key + journal, -HISTORY_EXCHANGES, -1))
                cmds.append(("LLEN", key + journal))
        return cmds

    return commands


def _build_chunk(chunk: list[str], replies: list[Any], pf: PendingView | None,
                 include_history: bool, out: dict[str, dict[str, Any]], now: int,
                 racing: dict[str, int]) -> None:
    it = iter(replies)
    for sid in chunk:
        fields, logs = next(it), next(it)
        pending = answered = None
        journal: tuple[Any, ...] = ()
        if pf is not None:
            pending, answered = next(it), next(it)
        if include_history:
            journal = (next(it), next(it), next(it))
        if type(fields) is list and fields[0] is None:
            continue  # gone
        try:
            for part in (fields, logs, pending, answered, *journal):
                if isinstance(part, Exception):
                    raise CorruptState(f"unreadable key: {part}", session_id=sid)
            tail = JournalTail.of(*journal) if journal else None
            out[sid] = _build(sid, fields, logs, pending, answered, tail, pf, now)
            if tail is not None and tail.racing is not None:
                racing[sid] = tail.racing
        except (CorruptState, ValueError, TypeError, msgpack.UnpackException) as exc:
            out[sid] = {"state": "terminal", "phase": "corrupt",
                        "error": f"session {sid} cannot be read: {exc}"}


async def read_many(
    run: Batcher,
    keys: Keys,
    sids: Iterable[str],
    *,
    pending_filter: PendingView | None,
    include_history: bool,
) -> dict[str, dict[str, Any]]:
    """Snapshots of ``sids``; vanished ones are left out.

    A session whose hash does not decode is shown with phase ``corrupt`` rather than failing
    the whole listing: one bad session must not blind the observer to the rest.
    """
    # Tens of thousands of small containers (replies, dicts) would trip the cyclic GC again and
    # again, each full pass scanning the whole heap; none of them can form a cycle, so the
    # collector waits until the listing is built (it runs as usual right after).
    with _gc_paused():
        out: dict[str, dict[str, Any]] = {}
        racing: dict[str, int] = {}  # sid -> journal length, where a round was appended
        batch = list(sids)
        chunks = [batch[i : i + BATCH] for i in range(0, len(batch), BATCH)]
        commands = _commands(keys, pending_filter, include_history)
        # Redis works on the next batches while this one is built: AHEAD in flight, so
        # neither side waits for the other's jitter.
        # The first batch asks Redis the time as well: elapsed times and budgets are shown on
        # the clock the sessions were stamped with (TIME), whatever this host's clock says.
        learn = clock_lesson()
        ahead = collections.deque(
            asyncio.ensure_future(run([("TIME",), *commands(c)] if n == 0 else commands(c)))
            for n, c in enumerate(chunks[:AHEAD]))
        now = 0
        for n, chunk in enumerate(chunks):
            replies = await ahead.popleft()
            if n == 0:
                now = _server_time(replies[0], learn)
                replies = replies[1:]
            if n + AHEAD < len(chunks):
                ahead.append(asyncio.ensure_future(run(commands(chunks[n + AHEAD]))))
            _build_chunk(chunk, replies, pending_filter, include_history, out, now, racing)
        if racing:
            await _reread_history(run, keys, racing, out)
        return out


async def _reread_history(run: Batcher, keys: Keys, racing: dict[str, int],
                          out: dict[str, dict[str, Any]]) -> None:
    """The history of sessions that appended a round while their tail was read: the
    ``HISTORY_EXCHANGES`` entries before the length first read, by absolute index (the
    journal only grows), so the rounds are numbered exactly and match the snapshot's other
    fields, read before that length."""
    head, tail = keys.session_template()
    suffix = SUFFIX["journal"]
    sids = list(racing)
    starts = [max(0, racing[sid] - HISTORY_EXCHANGES) for sid in sids]
    replies = await run([("LRANGE", f"{head}{sid}{tail}{suffix}", start, racing[sid] - 1)
                         for sid, start in zip(sids, starts, strict=True)])
    for sid, start, entries in zip(sids, starts, replies, strict=True):
        snap = out.get(sid)
        if snap is None or isinstance(entries, Exception) or "metrics" not in snap:
            continue
        try:
            snap["metrics"]["conversation_history"] = history(sid, entries, start + 1)
        except (CorruptState, ValueError, TypeError, msgpack.UnpackException) as exc:
            out[sid] = {"state": "terminal", "phase": "corrupt",
                        "error": f"session {sid} cannot be read: {exc}"}


def _server_time(reply: Any, learn: Callable[[Any], int]) -> int:
    """Redis's time from the listing's ``TIME`` reply, also taught to this process's clock
    (a registry learns it this way, at no round trip of its own); the learned clock if the
    reply is an error."""
    if isinstance(reply, Exception):
        return server_now_ms()
    try:
        return learn(reply)
    except CorruptState:
        return server_now_ms()
