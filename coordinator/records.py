"""Decoding what the scripts stored: one session hash into one typed record.

Registry and workers both read sessions; decoding lives here once so a corrupt field is
reported the same way everywhere (``CorruptState`` naming the session and the field).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from .codec import unpack
from .errors import CorruptState
from .models import Finished, LlmQuery, Paused
from .states import Phase

_METRICS = (
    "llm_calls", "pauses", "rounds", "prompt_chars", "response_chars",
    "prompt_tokens", "response_tokens",
)


def as_hash(reply: Any) -> dict[bytes, bytes]:
    """HGETALL as a server gives it (a flat list) or fakeredis (a dict)."""
    if isinstance(reply, dict):
        return reply
    it = iter(reply)
    return dict(zip(it, it, strict=True))


def now_ms() -> int:
    return time.time_ns() // 1_000_000


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
    cfence: int = 0
    last_error: str | None = None
    finished_at: int | None = None
    input: Any = None
    budget: dict[str, Any] | None = None
    result: Any = None
    error: str | None = None
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
                cfence=int(h.get("cfence", b"0")),
                last_error=h["last_error"].decode() if "last_error" in h else None,
                finished_at=int(h["finished_at"]) if "finished_at" in h else None,
                error=h["error"].decode() if "error" in h else None,
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
        if "qids" in h:
            rec.qids = list(unpack(h["qids"], what="query ids", session_id=sid))
        return rec

    @property
    def elapsed_ms(self) -> int:
        end = self.finished_at if self.finished_at is not None else now_ms()
        return max(0, end - self.started_at)

    def tokens(self) -> dict[str, int]:
        p, r = self.counters["prompt_tokens"], self.counters["response_tokens"]
        return {"prompt_total": p, "response_total": r, "total": p + r}

    def budget_remaining(self) -> dict[str, int] | None:
        if not self.budget:
            return None
        return budget_left(self.budget, self.counters["llm_calls"], self.tokens()["total"],
                           self.elapsed_ms)

    def stats(self) -> dict[str, Any]:
        """algocline's ``stats`` object for terminal results."""
        c = self.counters
        tok = self.tokens()
        out: dict[str, Any] = {
            "elapsed_ms": self.elapsed_ms,
            "llm_calls": c["llm_calls"],
            "pauses": c["pauses"],
            "rounds": c["rounds"],
            "total_prompt_chars": c["prompt_chars"],
            "total_response_chars": c["response_chars"],
            "prompt_tokens": tok["prompt_total"],
            "response_tokens": tok["response_total"],
            "total_tokens": tok["total"],
        }
        if self.budget:
            out["budget"] = dict(self.budget)
        return out

    def finished(self) -> Finished:
        return Finished(self.phase, self.result, self.error, self.stats())


def budget_left(
    budget: dict[str, Any], llm_calls: int, tokens: int, elapsed_ms: int
) -> dict[str, int]:
    used = {"llm_calls": llm_calls, "tokens": tokens, "elapsed_ms": elapsed_ms}
    return {k: max(0, int(v) - used[k]) for k, v in budget.items() if k in used}


def decode_queries(
    rec: SessionRecord, pending: dict[bytes, bytes], answered: set[bytes] | None = None
) -> list[LlmQuery]:
    """The round's queries in their original order, minus those already answered."""
    out: list[LlmQuery] = []
    for qid in rec.qids:
        key = qid.encode()
        if answered is not None and key in answered:
            continue
        raw = pending.get(key)
        if raw is None:
            continue
        out.append(LlmQuery.from_record(unpack(raw, what="query", session_id=rec.sid)))
    return out


def settled_event(
    rec: SessionRecord, pending: dict[bytes, bytes], answered: set[bytes]
) -> Paused | Finished | None:
    """The event a waiter may return now, or None while the session runs."""
    if rec.phase.terminal:
        return rec.finished()
    if rec.phase is Phase.PAUSED:
        return Paused(tuple(decode_queries(rec, pending, answered)))
    return None
