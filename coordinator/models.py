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
    #: When the host's answer is due (Unix ms, Redis's clock), or None: past it, the GC
    #: answers with ``on_timeout`` or, when that is None, fails the session (``deadline``).
    deadline_at: int | None = None
    on_timeout: str | None = None

    def to_record(self) -> dict[str, Any]:
        """Compact form stored in Redis (flags only when set)."""
        rec: dict[str, Any] = {"id": self.id, "prompt": self.prompt, "max_tokens": self.max_tokens}
        if self.system is not None:
            rec["system"] = self.system
        if self.grounded:
            rec["grounded"] = True
        if self.underspecified:
            rec["underspecified"] = True
        if self.deadline_at is not None:
            rec["dl"] = self.deadline_at
            if self.on_timeout is not None:
                rec["to"] = self.on_timeout
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
            deadline_at=int(rec["dl"]) if rec.get("dl") is not None else None,
            on_timeout=str(rec["to"]) if rec.get("to") is not None else None,
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
        if self.deadline_at is not None:
            out["deadline_at"] = self.deadline_at
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


_VIEW_FLAGS = ("query_id", "max_tokens", "system", "grounded", "underspecified")
_PROMPT_MODES = ("off", "preview", "full")
#: Longest prompt preview a filter may ask for (a preview of more is the prompt itself).
MAX_PREVIEW_CHARS = 1_000_000


@dataclass(frozen=True, slots=True)
class PendingView:
    """Which fields of each pending query a snapshot shows: algocline's object
    ``pending_filter`` (``{query_id, max_tokens, system, grounded, underspecified: bool,
    prompt: {mode: "off" | "preview" | "full", chars}}``); the presets are three of these."""

    query_id: bool = True
    max_tokens: bool = True
    system: bool = False
    grounded: bool = False
    underspecified: bool = False
    prompt: str = "off"
    chars: int = PREVIEW_CHARS

    @classmethod
    def preset(cls, name: PendingFilter, preview_chars: int = PREVIEW_CHARS) -> PendingView:
        if name is PendingFilter.FULL:
            return cls(system=True, grounded=True, underspecified=True, prompt="full")
        return cls(prompt="preview" if name is PendingFilter.PREVIEW else "off",
                   chars=preview_chars)

    @classmethod
    def parse(cls, spec: dict[str, Any], preview_chars: int = PREVIEW_CHARS) -> PendingView:
        """The object form; anything else in it is a mistake said at once (``ValueError``
        with a message naming the field)."""
        unknown = set(spec) - {*_VIEW_FLAGS, "prompt"}
        if unknown:
            raise ValueError(f"unknown pending_filter field(s) {sorted(unknown)}; it takes "
                             f"{', '.join(_VIEW_FLAGS)} (true/false) and prompt")
        flags: dict[str, bool] = {}
        for name in _VIEW_FLAGS:
            value = spec.get(name, name in ("query_id", "max_tokens"))
            if not isinstance(value, bool):
                raise ValueError(f"pending_filter.{name} must be true or false")
            flags[name] = value
        prompt = spec.get("prompt", {"mode": "off"})
        if isinstance(prompt, str):
            prompt = {"mode": prompt}
        if not isinstance(prompt, dict) or set(prompt) - {"mode", "chars"} \
                or prompt.get("mode", "off") not in _PROMPT_MODES:
            raise ValueError('pending_filter.prompt must be {"mode": "off" | "preview" | '
                             '"full", "chars": n}')
        chars = prompt.get("chars", preview_chars)
        if isinstance(chars, bool) or not isinstance(chars, int) \
                or not 0 <= chars <= MAX_PREVIEW_CHARS:
            raise ValueError(f"pending_filter.prompt.chars must be an integer from 0 to "
                             f"{MAX_PREVIEW_CHARS}")
        return cls(**flags, prompt=str(prompt.get("mode", "off")), chars=chars)

    def project(self, q: LlmQuery) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name in _VIEW_FLAGS:
            if getattr(self, name):
                out[name] = q.id if name == "query_id" else getattr(q, name)
        if self.prompt == "preview":
            # str slicing counts code points, so a character is never split.
            out["prompt_preview"] = q.prompt[: self.chars]
        elif self.prompt == "full":
            out["prompt"] = q.prompt
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
