"""Decoding what the scripts stored: one session hash into one typed record.

Registry and workers both read sessions; decoding lives here once so a corrupt field is
reported the same way everywhere (``CorruptState`` naming the session and the field).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .codec import unpack
from .errors import CorruptState
from .models import Finished, LlmQuery, Paused
from .states import Phase

_METRICS = (
    "llm_calls", "pauses", "rounds", "prompt_chars", "response_chars",
    "prompt_tokens", "response_tokens",
    # answers fed, and how many of them came with the host's own prompt / completion count
    "fed", "ptok_prov", "rtok_prov",
)

#: A budget's limits as stored (algocline's keys) -> what each measures.
BUDGET_KEYS = {"max_llm_calls": "llm_calls", "max_tokens": "tokens",
               "max_elapsed_ms": "elapsed_ms"}
#: The keys our API took before it spoke algocline's (still taken, and read from old sessions).
_OLD_BUDGET_KEYS = {"llm_calls": "max_llm_calls", "tokens": "max_tokens",
                    "elapsed_ms": "max_elapsed_ms"}


def normalise_budget(budget: dict[str, Any]) -> dict[str, int]:
    """A budget in algocline's keys (``max_llm_calls``, ``max_tokens``, ``max_elapsed_ms``),
    from either those or our former ones (``llm_calls``, ``tokens``, ``elapsed_ms``)."""
    return {_OLD_BUDGET_KEYS.get(k, k): int(v) for k, v in budget.items()
            if _OLD_BUDGET_KEYS.get(k, k) in BUDGET_KEYS and v is not None}


def as_hash(reply: Any) -> dict[bytes, bytes]:
    """HGETALL as a server gives it (a flat list) or fakeredis (a dict)."""
    if isinstance(reply, dict):
        return reply
    it = iter(reply)
    return dict(zip(it, it, strict=True))


# -- one clock: Redis's --------------------------------------------------------------------
# The scripts stamp sessions with Redis ``TIME`` (started_at, deadlines, finished_at), so any
# elapsed time or budget measured against this machine's clock is off by however far the two
# disagree: a worker 2 h fast failed a 10-minute budget at once. Each process learns the offset
# from ``TIME`` replies that ride along with commands it sends anyway (a worker's heartbeat,
# a listing's first batch) and reads the server's time as its own clock plus that offset.


def local_now_ms() -> int:
    """This machine's wall clock, Unix ms. Only ``server_now_ms`` and the clock's learning
    read it; module-level so a test can move this process's clock (``monkeypatch``)."""
    return time.time_ns() // 1_000_000


def parse_time(reply: Any) -> int:
    """A ``TIME`` reply ([seconds, microseconds], as bytes or ints) in Unix ms."""
    try:
        if not isinstance(reply, list | tuple):
            raise TypeError(type(reply).__name__)
        sec, usec = reply
        return int(sec) * 1000 + int(usec) // 1000
    except (TypeError, ValueError) as exc:
        raise CorruptState(f"redis TIME replied {reply!r:.80}, not [seconds, "
                           "microseconds]") from exc


class ServerClock:
    """How far Redis's clock is ahead of this process's (``offset_ms``, negative when behind),
    from the last ``TIME`` reply; 0 until one came, which is right for a well-synced host."""

    __slots__ = ("offset_ms",)

    def __init__(self) -> None:
        self.offset_ms = 0

    def learn(self, reply: Any, sent_ms: int, received_ms: int) -> int:
        """Take the offset from a ``TIME`` ``reply`` to a command sent at ``sent_ms`` and
        answered at ``received_ms`` (local clock). Redis read its clock somewhere between
        the two, so the midpoint is off by at most half the round trip. Returns the server's
        time as the reply gave it."""
        server = parse_time(reply)
        self.offset_ms = server - (sent_ms + received_ms) // 2
        return server


#: This process's view of Redis's clock (one per process: its Redis servers share a clock as
#: far as it matters, and a failover is re-learned at the next lesson).
SERVER_CLOCK = ServerClock()


def clock_lesson() -> Callable[[Any], int]:
    """Call right before sending a ``TIME`` command, then call what it returns with the
    reply: this process's clock learns the offset (and the server's time is returned).
    Both readings of the local clock happen here, through this module, so a test that moves
    the local clock moves them too."""
    sent = local_now_ms()

    def learn(reply: Any) -> int:
        return SERVER_CLOCK.learn(reply, sent, local_now_ms())

    return learn


def server_now_ms() -> int:
    """Redis's time now as best this process knows it (Unix ms): what budgets, elapsed
    times and heartbeats are measured with, as the scripts measure with ``TIME``."""
    return local_now_ms() + SERVER_CLOCK.offset_ms


#: The name the rest of the code base reads the time by: the server's, like the scripts.
now_ms = server_now_ms


@dataclass(slots=True)
class SessionRecord:
    sid: str
    phase: Phase
    asked: int
    remaining: int
    fence: int
    strategy: str
    started_at: int
    last_activity_at: int
    ttl_ms: int
    holder: str | None = None
    job: str | None = None
    #: tries at the current step since it last committed (each takes lock A once)
    tries: int = 0
    last_error: str | None = None
    finished_at: int | None = None
    #: When the current round paused (Unix ms): what its queries have waited since.
    paused_at: int | None = None
    input: Any = None
    budget: dict[str, Any] | None = None
    result: Any = None
    #: What the strategy recorded with ``ctx.metric`` (``stats.custom``).
    custom: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    #: A failed session's kind of failure (``errors.FAILURE_TYPES``) and, for a crash of
    #: strategy code, its traceback.
    error_type: str | None = None
    traceback: str | None = None
    progress: dict[str, Any] | None = None
    qids: list[str] = field(default_factory=list)
    current_query_tokens: int = 0
    counters: dict[str, int] = field(default_factory=dict)

    @classmethod
    def from_hash(cls, sid: str, raw: dict[bytes, bytes]) -> SessionRecord:
        h = {k.decode(): v for k, v in raw.items()}
        try:
            phase = Phase(h["phase"].decode())
            rec = cls(
                sid=sid,
                phase=phase,
                asked=int(h.get("asked", b"0")),
                remaining=int(h.get("remaining", b"0")),
                fence=int(h.get("fence", b"0")),
                strategy=h["strategy"].decode(),
                started_at=int(h["started_at"]),
                last_activity_at=int(h["last_activity_at"]),
                ttl_ms=int(h["ttl_ms"]),
                holder=h["holder"].decode() if "holder" in h else None,
                job=h["job"].decode() if "job" in h else None,
                tries=int(h.get("tries", b"0")),
                last_error=h["last_error"].decode() if "last_error" in h else None,
                finished_at=int(h["finished_at"]) if "finished_at" in h else None,
                paused_at=int(h["paused_at"]) if "paused_at" in h else None,
                error=h["error"].decode() if "error" in h else None,
                error_type=h["error_type"].decode() if "error_type" in h else None,
                traceback=h["traceback"].decode() if "traceback" in h else None,
                current_query_tokens=int(h.get("cq_tokens", b"0")),
                counters={m: int(h.get(f"m:{m}", b"0")) for m in _METRICS},
            )
        except (KeyError, ValueError, UnicodeDecodeError) as exc:
            raise CorruptState(
                f"session {sid} has a corrupt or incomplete hash ({exc!r}); "
                "it was not written by this coordinator",
                session_id=sid,
            ) from exc
        if "input" in h:
            rec.input = unpack(h["input"], what="input", session_id=sid)
        if "budget" in h:
            rec.budget = unpack(h["budget"], what="budget", session_id=sid)
        if "result" in h:
            rec.result = unpack(h["result"], what="result", session_id=sid)
        if "progress" in h:
            rec.progress = unpack(h["progress"], what="progress", session_id=sid)
        if "custom" in h:
            custom = unpack(h["custom"], what="custom metrics", session_id=sid)
            rec.custom = custom if isinstance(custom, dict) else {}
        if "qids" in h:
            qids = unpack(h["qids"], what="query ids", session_id=sid)
            # Every answer is matched to its question by these ids: anything but distinct
            # strings would pair answers with the wrong questions, or with none.
            if not isinstance(qids, list) or not all(isinstance(q, str) for q in qids) \
                    or len(set(qids)) != len(qids):
                raise CorruptState(f"session {sid} has corrupt query ids {qids!r:.200}",
                                   session_id=sid)
            rec.qids = qids
        return rec

    @property
    def elapsed_ms(self) -> int:
        end = self.finished_at if self.finished_at is not None else server_now_ms()
        return max(0, end - self.started_at)

    def tokens(self) -> dict[str, int]:
        p, r = self.counters["prompt_tokens"], self.counters["response_tokens"]
        return {"prompt_total": p, "response_total": r, "total": p + r}

    def budget_remaining(self) -> dict[str, int | None] | None:
        if not self.budget:
            return None
        return budget_left(self.budget, self.counters["llm_calls"], self.tokens()["total"],
                           self.elapsed_ms)

    def token_sources(self) -> tuple[str, str]:
        """Where the prompt and the response token counts come from, as algocline says it:
        ``provided`` when the host reported every count, else ``estimated`` (the weakest
        source of the parts)."""
        c = self.counters
        prompt = "provided" if c["llm_calls"] and c["ptok_prov"] >= c["llm_calls"] else \
            "estimated"
        response = "provided" if c["fed"] and c["rtok_prov"] >= c["fed"] else "estimated"
        return prompt, response

    def stats(self) -> dict[str, Any]:
        """algocline's ``stats`` object: ``auto`` (what the engine measured, tokens with
        their source) and ``custom`` (what the strategy recorded with ``ctx.metric``)."""
        c = self.counters
        tok = self.tokens()
        prompt_src, response_src = self.token_sources()
        total_src = "provided" if prompt_src == response_src == "provided" else "estimated"
        auto: dict[str, Any] = {
            "elapsed_ms": self.elapsed_ms,
            "llm_calls": c["llm_calls"],
            "pauses": c["pauses"],
            "rounds": c["rounds"],
            "total_prompt_chars": c["prompt_chars"],
            "total_response_chars": c["response_chars"],
            "prompt_tokens": {"tokens": tok["prompt_total"], "source": prompt_src},
            "response_tokens": {"tokens": tok["response_total"], "source": response_src},
            "total_tokens": {"tokens": tok["total"], "source": total_src},
        }
        if self.budget:
            auto["budget"] = normalise_budget(self.budget)
        return {"auto": auto, "custom": dict(self.custom)}

    def finished(self) -> Finished:
        return Finished(self.phase, self.result, self.error, self.stats(),
                        error_type=self.error_type, traceback=self.traceback)


def budget_left(
    budget: dict[str, Any], llm_calls: int, tokens: int, elapsed_ms: int
) -> dict[str, int | None]:
    """What is left of every limit (algocline's ``budget_remaining``): None for a limit that
    is not set."""
    used = {"llm_calls": llm_calls, "tokens": tokens, "elapsed_ms": elapsed_ms}
    limits = normalise_budget(budget)
    return {name: None if key not in limits else max(0, limits[key] - used[name])
            for key, name in BUDGET_KEYS.items()}


def decode_queries(
    rec: SessionRecord, pending: dict[bytes, bytes], answered: set[bytes] | None = None
) -> list[LlmQuery]:
    """The round's queries in their original order, minus those already ``answered``.

    Every question of the round must be there and decode as the query it names: a round
    with one missing (its pending hash lost, a field deleted) raises ``CorruptState`` rather
    than shrinking, since answers are matched to questions by position and a strategy handed
    fewer answers than it asked for would carry on with the wrong ones, and a host shown a
    pause without its questions could never answer it."""
    out: list[LlmQuery] = []
    for qid in rec.qids:
        key = qid.encode()
        raw = pending.get(key)
        if raw is None:
            raise CorruptState(
                f"session {rec.sid}: query {qid} of round {rec.asked} is missing from its "
                f"pending queries ({len(pending)} stored, {len(rec.qids)} asked); the round "
                "can be neither answered nor resumed",
                session_id=rec.sid, query_id=qid)
        if answered is not None and key in answered:
            continue
        record = unpack(raw, what="query", session_id=rec.sid)
        try:
            query = LlmQuery.from_record(record)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise CorruptState(f"session {rec.sid}: query {qid} of round {rec.asked} is not "
                               f"a query ({exc!r})", session_id=rec.sid, query_id=qid) from exc
        if query.id != qid:
            raise CorruptState(f"session {rec.sid}: query {qid} of round {rec.asked} is "
                               f"stored as {query.id!r}", session_id=rec.sid, query_id=qid)
        out.append(query)
    return out


def settled_event(
    rec: SessionRecord, pending: dict[bytes, bytes], answered: set[bytes]
) -> Paused | Finished | None:
    """The event a waiter may return now, or None while the session runs."""
    if rec.phase.terminal:
        return rec.finished()
    if rec.phase is Phase.PAUSED:
        queries = decode_queries(rec, pending, answered)
        if not queries:
            # The answer completing a round turns the session to running in the same script,
            # so a pause with nothing left to answer is state nobody wrote: the host could
            # only wait on it for ever.
            raise CorruptState(
                f"session {rec.sid} is paused in round {rec.asked} with no question left to "
                f"answer ({len(rec.qids)} asked, {len(answered)} answered)",
                session_id=rec.sid)
        return Paused(tuple(queries), round=rec.asked)
    return None
