"""``Context``: everything a strategy may do. Asking pauses the session; the rest is recorded.

A strategy must be deterministic given its answers: any worker may rebuild a paused session
by replaying it from its journal, and a replay that asks different questions fails the
session with ``NonDeterminism``. So: no clocks, randomness or I/O deciding what to ask.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from coordinator.codec import check_text, estimate_tokens
from coordinator.errors import BudgetExceeded, InvalidInput
from coordinator.models import LlmQuery, QueryId
from coordinator.records import server_now_ms
from coordinator.settings import MIB

_LEVELS = ("debug", "info", "warn", "warning", "error")
#: Longest log or progress message: they are kept in Redis and shown by ``status``, and a
#: strategy logging a whole document by mistake should hear so, not fill the store.
MAX_MESSAGE_BYTES = 64 * 1024
#: Largest ``max_tokens`` (and progress count) taken: far beyond any model's, and what
#: every reader of the stored query (msgpack, JSON hosts) carries exactly.
MAX_COUNT = 2**31 - 1

Asker = Callable[[list[LlmQuery]], Awaitable[list[str]]]


class Context:
    def __init__(
        self,
        ask: Asker,
        *,
        budget: dict[str, int] | None = None,
        started_at_ms: int = 0,
        max_prompt_bytes: int = MIB,
    ) -> None:
        self._ask = ask
        self._budget = dict(budget) if budget else None
        self._started_at_ms = started_at_ms
        self._max_prompt_bytes = max_prompt_bytes
        #: True while a worker replays answered rounds: budgets were checked then already.
        self.replaying = False
        self.llm_calls = 0
        self.prompt_tokens = 0
        self.response_tokens = 0
        self.logs: list[dict[str, Any]] = []
        self.last_progress: dict[str, Any] | None = None

    async def llm(
        self,
        prompt: str,
        *,
        system: str | None = None,
        max_tokens: int = 1024,
        grounded: bool = False,
        underspecified: bool = False,
    ) -> str:
        """Ask one question; the session pauses until the host answers ``q-0``."""
        item = {"prompt": prompt, "system": system, "max_tokens": max_tokens,
                "grounded": grounded, "underspecified": underspecified}
        return (await self.llm_batch([item]))[0]

    async def llm_batch(self, items: Sequence[str | dict[str, Any]]) -> list[str]:
        """Ask N questions in one round (``q-0``..``q-N-1``); answers come back in this
        order whatever order the host fed them in."""
        if isinstance(items, str | bytes | dict) or not isinstance(items, Sequence) \
                or not items:
            raise InvalidInput("llm_batch takes a non-empty list of prompts or dicts")
        queries = [self._query(i, item) for i, item in enumerate(items)]
        self._charge(queries)
        answers = await self._ask(queries)
        self.response_tokens += sum(estimate_tokens(len(a)) for a in answers)
        return answers

    def _query(self, index: int, item: str | dict[str, Any]) -> LlmQuery:
        if not isinstance(item, str | dict):
            raise InvalidInput(
                f"llm_batch item {index} must be a prompt string or a dict with 'prompt', "
                f"not {type(item).__name__}"
            )
        spec: dict[str, Any] = {"prompt": item} if isinstance(item, str) else dict(item)
        unknown = set(spec) - {"prompt", "system", "max_tokens", "grounded", "underspecified"}
        if unknown:
            raise InvalidInput(f"unknown query fields {sorted(unknown)} in item {index}")
        prompt = check_text(spec.get("prompt"), what=f"prompt {index}",
                            limit=self._max_prompt_bytes)
        system = spec.get("system")
        if system is not None:
            system = check_text(system, what=f"system {index}", limit=self._max_prompt_bytes)
        max_tokens = spec.get("max_tokens", 1024)
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) \
                or not 0 < max_tokens <= MAX_COUNT:
            raise InvalidInput(f"max_tokens must be a positive integer up to 2**31-1, got "
                               f"{_clip(max_tokens)}")
        return LlmQuery(
            id=QueryId.batch(index), prompt=prompt, system=system, max_tokens=max_tokens,
            grounded=bool(spec.get("grounded", False)),
            underspecified=bool(spec.get("underspecified", False)),
        )

    def _charge(self, queries: list[LlmQuery]) -> None:
        tokens = sum(estimate_tokens(len(q.prompt)) for q in queries)
        if self._budget and not self.replaying:
            left = self.budget_remaining() or {}
            if "llm_calls" in left and len(queries) > left["llm_calls"]:
                raise BudgetExceeded(
                    f"budget exceeded: {len(queries)} more llm call(s) would pass the limit of "
                    f"{self._budget['llm_calls']}"
                )
            if "tokens" in left and left["tokens"] <= 0:
                raise BudgetExceeded(f"budget exceeded: token limit {self._budget['tokens']}")
            if "elapsed_ms" in left and left["elapsed_ms"] <= 0:
                raise BudgetExceeded(
                    f"budget exceeded: time limit {self._budget['elapsed_ms']} ms"
                )
        self.llm_calls += len(queries)
        self.prompt_tokens += tokens

    def budget_remaining(self) -> dict[str, int] | None:
        """What is left of each budget limit, or None when no budget was set."""
        if not self._budget:
            return None
        used = {
            "llm_calls": self.llm_calls,
            "tokens": self.prompt_tokens + self.response_tokens,
            # started_at is Redis TIME (create.lua): measured on that clock, not this host's.
            "elapsed_ms": server_now_ms() - self._started_at_ms,
        }
        return {k: max(0, v - used[k]) for k, v in self._budget.items() if k in used}

    def log(self, level: str, msg: str) -> None:
        """Record a log line. Checked here, in the strategy, because a line that cannot be
        stored (a lone surrogate, say) would otherwise fail the step's commit, and the step
        would be retried as a worker error until dead-lettered."""
        if not isinstance(level, str) or level not in _LEVELS:
            raise InvalidInput(f"log level must be one of {', '.join(_LEVELS)}")
        text = check_text(str(msg), what="log message", limit=MAX_MESSAGE_BYTES)
        if not self.replaying:
            self.logs.append({"ts": server_now_ms(), "level": level, "msg": text})

    def progress(self, step: int, total: int, msg: str | None = None) -> None:
        """Report progress (``step`` of ``total``); checked here for the reason ``log`` is."""
        for name, value in (("step", step), ("total", total)):
            if not isinstance(value, int) or isinstance(value, bool) \
                    or not 0 <= value <= MAX_COUNT:
                raise InvalidInput(f"progress {name} must be an integer from 0 to 2**31-1, "
                                   f"got {_clip(value)}")
        if msg is not None:
            msg = check_text(msg, what="progress message", limit=MAX_MESSAGE_BYTES)
        if not self.replaying:
            self.last_progress = {"step": step, "total": total, "message": msg}


def _clip(value: object) -> str:
    """A strategy's bad value for a message, kept short."""
    if isinstance(value, int) and abs(value) >= 10**30:
        return f"an integer of {value.bit_length()} bits"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."

