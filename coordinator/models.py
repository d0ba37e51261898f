"""The values hosts see: queries, the result of a feed, and the JSON shapes of algocline.

``to_json`` gives exactly the shapes of algocline's ``alc_continue`` so a host written for
the original parses ours unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from .states import Phase

PREVIEW_CHARS = 200


class QueryId(str):
    """``q-<n>`` within a round (ids restart each round); ``f-<child>-<seq>`` for forks."""

    __slots__ = ()

    @classmethod
    def single(cls) -> QueryId:
        return cls("q-0")

    @classmethod
    def batch(cls, index: int) -> QueryId:
        return cls(f"q-{index}")

    @classmethod
    def fork(cls, child: int, seq: int) -> QueryId:
        return cls(f"f-{child}-{seq}")


@dataclass(frozen=True, slots=True)
class LlmQuery:
    id: str
    prompt: str
    system: str | None = None
    max_tokens: int = 1024
    grounded: bool = False
    underspecified: bool = False

    def to_record(self) -> dict[str, Any]:
        """Compact form stored in Redis (flags only when set)."""
        rec: dict[str, Any] = {"id": self.id, "prompt": self.prompt, "max_tokens": self.max_tokens}
        if self.system is not None:
            rec["system"] = self.system
        if self.grounded:
            rec["grounded"] = True
        if self.underspecified:
            rec["underspecified"] = True
        return rec

    @classmethod
    def from_record(cls, rec: dict[str, Any]) -> LlmQuery:
        return cls(
            id=str(rec["id"]),
            prompt=str(rec["prompt"]),
            system=rec.get("system"),
            max_tokens=int(rec.get("max_tokens", 1024)),
            grounded=bool(rec.get("grounded", False)),
            underspecified=bool(rec.get("underspecified", False)),
        )

    def to_wire(self, id_key: str = "id") -> dict[str, Any]:
        """algocline's query JSON: flags appear only when true."""
        out: dict[str, Any] = {
            id_key: self.id,
            "prompt": self.prompt,
            "system": self.system,
            "max_tokens": self.max_tokens,
        }
        if self.grounded:
            out["grounded"] = True
        if self.underspecified:
            out["underspecified"] = True
        return out


class PendingFilter(StrEnum):
    """How much of each pending query a snapshot shows."""

    META = "meta"
    PREVIEW = "preview"
    FULL = "full"

    def project(self, q: LlmQuery) -> dict[str, Any]:
        if self is PendingFilter.FULL:
            return {
                "query_id": q.id,
                "max_tokens": q.max_tokens,
                "system": q.system,
                "grounded": q.grounded,
                "underspecified": q.underspecified,
                "prompt": q.prompt,
            }
        out: dict[str, Any] = {"query_id": q.id, "max_tokens": q.max_tokens}
        if self is PendingFilter.PREVIEW:
            # str slicing counts code points, so a character is never split.
            out["prompt_preview"] = q.prompt[:PREVIEW_CHARS]
        return out


class FeedResult:
    """What a start or a feed returns: ``Accepted``, ``Paused`` or ``Finished``."""

    __slots__ = ()

    def to_json(self, session_id: str) -> dict[str, Any]:
        raise NotImplementedError


@dataclass(frozen=True, slots=True)
class Accepted(FeedResult):
    remaining: int

    def to_json(self, session_id: str) -> dict[str, Any]:
        return {"status": "accepted", "remaining": self.remaining}


@dataclass(frozen=True, slots=True)
class Paused(FeedResult):
    queries: tuple[LlmQuery, ...]
    #: The round these queries belong to (1 for the first pause; 0 when not known). Query
    #: ids restart every round, so a feed names its round to never answer another one's.
    round: int = field(default=0, compare=False)

    def to_json(self, session_id: str) -> dict[str, Any]:
        if len(self.queries) == 1:
            return {
                "status": "needs_response",
                "session_id": session_id,
                **self.queries[0].to_wire(id_key="query_id"),
            }
        return {
            "status": "needs_response",
            "session_id": session_id,
            "queries": [q.to_wire() for q in self.queries],
        }


@dataclass(frozen=True, slots=True)
class Finished(FeedResult):
    state: Phase
    result: Any = None
    error: str | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    #: A failure's kind (``errors.FAILURE_TYPES``: strategy_error, budget_exceeded, ...), so
    #: a budget failure and a crash are told apart without parsing ``error``.
    error_type: str | None = None
    #: The strategy's traceback, for a crash of strategy code (status shows it; the wire
    #: event leaves it out, as algocline's does).
    traceback: str | None = None

    def to_json(self, session_id: str) -> dict[str, Any]:
        if self.state is Phase.COMPLETED:
            return {"status": "completed", "result": self.result, "stats": self.metrics}
        if self.state is Phase.CANCELLED:
            return {"status": "cancelled", "stats": self.metrics}
        return {"status": "error", "error": self.error,
                "type": self.error_type or "strategy_error"}


class Submitted(str):
    """A queued session's id (``SessionRegistry.submit``), which also says how many live
    workers offer its strategy: 0 means nobody can run it yet, and it waits in the queue for
    a worker that does."""

    __slots__ = ("live_workers",)
    live_workers: int

    def __new__(cls, sid: str, live_workers: int) -> Submitted:
        obj = super().__new__(cls, sid)
        obj.live_workers = live_workers
        return obj


@dataclass(frozen=True, slots=True)
class SessionPage:
    """One page of ``SessionRegistry.list_sessions``: snapshots, newest activity first, and
    the cursor of the next page (None after the last)."""

    sessions: list[dict[str, Any]]
    next_cursor: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"sessions": self.sessions, "next_cursor": self.next_cursor}


FeedResult.Accepted = Accepted  # type: ignore[attr-defined]
FeedResult.Paused = Paused  # type: ignore[attr-defined]
FeedResult.Finished = Finished  # type: ignore[attr-defined]
