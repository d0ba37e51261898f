"""``Context``: everything a strategy may do. Asking pauses the session; the rest is recorded.

A strategy must be deterministic given its answers: any worker may rebuild a paused session
by replaying it from its journal, and a replay that asks different questions fails the
session with ``NonDeterminism``. So: no clocks, randomness or I/O deciding what to ask
(``ctx.side_effect`` is the way to do I/O: its result is journaled and replayed).

What a session counts (its calls, tokens, logs, progress and custom metrics) lives in one
``Tally``, shared by the strategy's context and by the contexts of the strategies it runs
with ``ctx.fork``: children draw on the parent's budget, as upstream's do.
"""

from __future__ import annotations

import asyncio
import copy
import math
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol

from coordinator.codec import check_json_able, check_text, estimate_tokens
from coordinator.errors import BudgetExceeded, InvalidInput
from coordinator.models import LlmQuery, QueryId
from coordinator.records import server_now_ms
from coordinator.settings import MIB

from .text import json_extract

if TYPE_CHECKING:
    from .compose import ForkEntry

_LEVELS = ("debug", "info", "warn", "warning", "error")
#: Longest log or progress message: they are kept in Redis and shown by ``status``, and a
#: strategy logging a whole document by mistake should hear so, not fill the store.
MAX_MESSAGE_BYTES = 64 * 1024
#: Largest ``max_tokens`` (and progress count) taken: far beyond any model's, and what
#: every reader of the stored query (msgpack, JSON hosts) carries exactly.
MAX_COUNT = 2**31 - 1
#: Longest a query's deadline may be (30 days): past any human's answer, and a bound that
#: keeps ``deadline_at`` an exact integer everywhere it is read.
MAX_DEADLINE_S = 30 * 24 * 3600
#: The whole ``ctx.custom`` dict is written with every commit: keep it a summary.
MAX_CUSTOM_BYTES = 256 * 1024
MAX_METRIC_KEY_CHARS = 200
#: How much of a non-JSON answer ``llm_json``'s retry quotes back to the model.
MAX_QUOTED_CHARS = 16_000
#: The log entry's ``source``, as upstream names a strategy's own log lines.
LOG_SOURCE = "ctx.log"
#: Upstream's budget keys (stored so by the registry); ours map onto them.
BUDGET_KEYS = {"llm_calls": "max_llm_calls", "tokens": "max_tokens",
               "elapsed_ms": "max_elapsed_ms"}
_QUERY_FIELDS = frozenset({"prompt", "system", "max_tokens", "grounded", "underspecified",
                           "deadline_s", "on_timeout"})
_JSON_SYSTEM = "Output ONLY valid JSON. No markdown fences, no explanation."

Asker = Callable[[list[LlmQuery]], Awaitable[list[str]]]
Spawner = Callable[[Coroutine[Any, Any, Any]], "asyncio.Task[Any]"]


class Effects(Protocol):
    """What a worker gives a strategy for I/O that must not repeat on replay
    (``workers/effects.py``): ``side_effect`` runs ``fn`` once and journals its result;
    ``state`` is the key-value store that outlives sessions."""

    state: Any

    async def side_effect(self, name: str, fn: Callable[[], Any]) -> Any: ...


def normalise_budget(budget: dict[str, Any] | None) -> dict[str, int] | None:
    """A budget in upstream's keys (``max_llm_calls``, ``max_tokens``, ``max_elapsed_ms``),
    whichever of the two spellings it came in; None when no limit is set."""
    if not budget:
        return None
    out: dict[str, int] = {}
    for key, value in budget.items():
        name = BUDGET_KEYS.get(key, key)
        if name in BUDGET_KEYS.values() and value is not None:
            out[name] = int(value)
    return out or None


@dataclass(slots=True)
class Tally:
    """What a session counts, shared by a strategy and the children it forks."""

    budget: dict[str, int] | None = None
    started_at_ms: int = 0
    #: True while a worker replays answered rounds (see ``Context.replaying``).
    replaying: bool = False
    llm_calls: int = 0
    prompt_tokens: int = 0
    response_tokens: int = 0
    logs: list[dict[str, Any]] = field(default_factory=list)
    last_progress: dict[str, Any] | None = None
    custom: dict[str, Any] = field(default_factory=dict)

    def charge(self, queries: list[LlmQuery]) -> None:
        """Count ``queries`` against the budget, or raise ``BudgetExceeded`` (counting
        nothing). Calls and tokens are checked on replay too: they are replayed exactly, so
        a replay raises where the first run did, and a strategy that caught it goes the same
        way. Elapsed time is checked live only: a replay runs later, by design."""
        if self.budget:
            self._check(len(queries))
        self.llm_calls += len(queries)
        self.prompt_tokens += sum(query_tokens(q) for q in queries)

    def _check(self, asking: int) -> None:
        assert self.budget is not None
        calls = self.budget.get("max_llm_calls")
        if calls is not None and self.llm_calls + asking > calls:
            if self.llm_calls >= calls:
                raise BudgetExceeded(f"budget_exceeded: max_llm_calls ({calls}) reached "
                                     f"({self.llm_calls} used)")
            raise BudgetExceeded(f"budget_exceeded: max_llm_calls ({calls}) would be passed "
                                 f"({self.llm_calls} used, {asking} more asked at once)")
        tokens = self.budget.get("max_tokens")
        if tokens is not None and self.tokens >= tokens:
            raise BudgetExceeded(f"budget_exceeded: max_tokens ({tokens}) reached "
                                 f"({self.tokens} used)")
        ms = self.budget.get("max_elapsed_ms")
        if ms is not None and not self.replaying:
            elapsed = self.elapsed_ms()
            if elapsed >= ms:
                raise BudgetExceeded(f"budget_exceeded: max_elapsed_ms ({ms}ms) reached "
                                     f"({elapsed}ms elapsed)")

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.response_tokens

    def elapsed_ms(self) -> int:
        # started_at is Redis TIME (create.lua): measured on that clock, not this host's.
        return max(0, server_now_ms() - self.started_at_ms)


def query_tokens(q: LlmQuery) -> int:
    """A query's prompt tokens as upstream estimates them: its prompt and its system text,
    each estimated on its own."""
    return estimate_tokens(q.prompt) + (estimate_tokens(q.system) if q.system else 0)


class Context:
    def __init__(
        self,
        ask: Asker,
        *,
        budget: dict[str, Any] | None = None,
        started_at_ms: int = 0,
        max_prompt_bytes: int = MIB,
        effects: Effects | None = None,
        spawn: Spawner | None = None,
        tally: Tally | None = None,
    ) -> None:
        self._ask = ask
        self._max_prompt_bytes = max_prompt_bytes
        self._effects = effects
        #: How child strategies (``fork``) are started: the worker's clocked tasks.
        self._spawn: Spawner = spawn or asyncio.ensure_future
        self._tally = tally if tally is not None else Tally(normalise_budget(budget),
                                                            started_at_ms)
        #: Whether this context counts its own asks; a fork's children do not: the fork
        #: counts their questions itself, child by child in a fixed order (``compose.py``).
        self._charges = tally is None

    def _child(self, ask: Asker) -> Context:
        """A context for a strategy this one forks: the same session, tally and effects,
        its questions asked through ``ask``."""
        child = Context(ask, max_prompt_bytes=self._max_prompt_bytes, effects=self._effects,
                        spawn=self._spawn, tally=self._tally)
        return child

    # -- what the worker reads ----------------------------------------------------------------

    @property
    def replaying(self) -> bool:
        """True while a worker replays answered rounds: logs and progress were recorded
        then already, and elapsed time is not what it was."""
        return self._tally.replaying

    @replaying.setter
    def replaying(self, value: bool) -> None:
        self._tally.replaying = value

    @property
    def llm_calls(self) -> int:
        return self._tally.llm_calls

    @property
    def prompt_tokens(self) -> int:
        return self._tally.prompt_tokens

    @property
    def response_tokens(self) -> int:
        return self._tally.response_tokens

    @property
    def logs(self) -> list[dict[str, Any]]:
        return self._tally.logs

    @property
    def last_progress(self) -> dict[str, Any] | None:
        return self._tally.last_progress

    @last_progress.setter
    def last_progress(self, value: dict[str, Any] | None) -> None:
        self._tally.last_progress = value

    @property
    def custom(self) -> dict[str, Any]:
        """The custom metrics recorded with ``metric`` (``stats.custom``)."""
        return self._tally.custom

    # -- asking ----------------------------------------------------------------------------

    async def llm(
        self,
        prompt: str,
        *,
        system: str | None = None,
        max_tokens: int = 1024,
        grounded: bool = False,
        underspecified: bool = False,
        deadline_s: float | None = None,
        on_timeout: str | None = None,
    ) -> str:
        """Ask one question; the session pauses until the host answers ``q-0``.

        ``deadline_s``: the host has that long to answer; past it the session resumes with
        ``on_timeout`` as the answer, or, when that is None, fails (error type
        ``deadline``)."""
        item: dict[str, Any] = {"prompt": prompt, "system": system, "max_tokens": max_tokens,
                                "grounded": grounded, "underspecified": underspecified}
        if deadline_s is not None or on_timeout is not None:
            item.update(deadline_s=deadline_s, on_timeout=on_timeout)
        return (await self.llm_batch([item]))[0]

    async def llm_batch(self, items: Sequence[str | dict[str, Any]]) -> list[str]:
        """Ask N questions in one round (``q-0``..``q-N-1``); answers come back in this
        order whatever order the host fed them in. A dict item takes ``llm``'s keywords."""
        if isinstance(items, str | bytes | dict) or not isinstance(items, Sequence) \
                or not items:
            raise InvalidInput("llm_batch takes a non-empty list of prompts or dicts")
        queries = [self._query(i, item) for i, item in enumerate(items)]
        if self._charges:
            self._tally.charge(queries)
        answers = await self._ask(queries)
        self._tally.response_tokens += sum(estimate_tokens(a) for a in answers)
        return answers

    async def llm_json(self, prompt: str, **opts: Any) -> Any:
        """Ask for JSON and return it parsed (an object or an array, ``text.json_extract``).
        An answer that holds none is asked for once more, quoting it back, as upstream's
        ``alc.llm_json`` does; a second miss raises ``InvalidInput``. ``opts`` are
        ``llm``'s keywords."""
        raw = await self.llm(prompt, **opts)
        parsed = json_extract(raw)
        if parsed is not None:
            return parsed
        self.log("warn", "llm_json: the answer held no JSON; asking once more")
        quoted = raw if len(raw) <= MAX_QUOTED_CHARS else raw[:MAX_QUOTED_CHARS] + "\n..."
        retry = ("The previous response was not valid JSON.\n\nPrevious output:\n"
                 f"{quoted}\n\nFix the JSON and return ONLY valid JSON.\n\n"
                 f"Original request:\n{prompt}")
        raw = await self.llm(retry, **{**opts, "system": _JSON_SYSTEM})
        parsed = json_extract(raw)
        if parsed is None:
            raise InvalidInput("llm_json: the answer held no JSON object or array, even "
                               f"when asked again; it began {raw[:200]!r}")
        return parsed

    def _query(self, index: int, item: str | dict[str, Any]) -> LlmQuery:
        if not isinstance(item, str | dict):
            raise InvalidInput(
                f"llm_batch item {index} must be a prompt string or a dict with 'prompt', "
                f"not {type(item).__name__}"
            )
        spec: dict[str, Any] = {"prompt": item} if isinstance(item, str) else dict(item)
        unknown = set(spec) - _QUERY_FIELDS
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
        deadline_at, on_timeout = self._deadline(index, spec.get("deadline_s"),
                                                 spec.get("on_timeout"))
        return LlmQuery(
            id=QueryId.batch(index), prompt=prompt, system=system, max_tokens=max_tokens,
            grounded=bool(spec.get("grounded", False)),
            underspecified=bool(spec.get("underspecified", False)),
            deadline_at=deadline_at, on_timeout=on_timeout,
        )

    def _deadline(self, index: int, deadline_s: Any, on_timeout: Any) -> tuple[int | None,
                                                                                str | None]:
        """A query's deadline as the GC reads it: Unix ms on Redis's clock. A replay
        computes another one, which is why the journal's digest leaves it out."""
        if deadline_s is None:
            if on_timeout is not None:
                raise InvalidInput(f"on_timeout of query {index} needs a deadline_s: it is "
                                   "the answer given when the deadline passes")
            return None, None
        if isinstance(deadline_s, bool) or not isinstance(deadline_s, int | float) \
                or not math.isfinite(deadline_s) or not 0 < deadline_s <= MAX_DEADLINE_S:
            raise InvalidInput(f"deadline_s of query {index} must be a number of seconds "
                               f"above 0 and up to {MAX_DEADLINE_S} (30 days), got "
                               f"{_clip(deadline_s)}")
        if on_timeout is not None:
            on_timeout = check_text(on_timeout, what=f"on_timeout of query {index}",
                                    limit=self._max_prompt_bytes)
        return server_now_ms() + max(1, math.ceil(deadline_s * 1000)), on_timeout

    def budget_remaining(self) -> dict[str, int | None] | None:
        """What is left of each limit, as upstream's ``alc.budget_remaining``:
        ``{"llm_calls", "tokens", "elapsed_ms"}``, None for a limit not set; None when no
        budget was set at all."""
        t = self._tally
        if not t.budget:
            return None
        used = {"llm_calls": t.llm_calls, "tokens": t.tokens, "elapsed_ms": t.elapsed_ms()}
        out: dict[str, int | None] = {}
        for key, name in BUDGET_KEYS.items():
            limit = t.budget.get(name)
            out[key] = None if limit is None else max(0, limit - used[key])
        return out

    # -- composition (compose.py) -------------------------------------------------------------

    async def fork(
        self, strategies: list[str], input: dict[str, Any] | None = None, *,
        on_error: Literal["skip", "fail"] = "skip",
    ) -> list[ForkEntry]:
        """Run ``strategies`` side by side, each on its own copy of ``input``: every round,
        the questions of all children still running are asked together, as ``f-<child>-<n>``
        (upstream's ids), and their budget is this session's. Returns one entry per
        strategy, in order: ``{"strategy", "result", "ok": True}`` or, when it raised,
        ``{"strategy", "error", "ok": False}``; with ``on_error="fail"`` the first child to
        fail (by position) fails this call with its error instead."""
        from .compose import fork

        return await fork(self, strategies, input, on_error=on_error)

    async def run(self, name: str, input: dict[str, Any] | None = None) -> Any:
        """Run the registered strategy ``name`` inline: its questions are this strategy's,
        its result is returned and its errors raised."""
        from .compose import run

        return await run(self, name, input)

    async def pipe(
        self, strategies: list[str], input: dict[str, Any] | None = None, *,
        on_error: Literal["fail", "skip"] = "fail",
    ) -> dict[str, Any]:
        """Run ``strategies`` one after another, each stage's result becoming the next
        stage's ``task`` (JSON text when it is not a string), as upstream's ``alc.pipe``.
        Returns the pipeline's input with ``task`` (what the last stage got), ``result``
        (the last stage's) and ``pipe_history`` (``[{"strategy", "result"}...]``)."""
        from .compose import pipe

        return await pipe(self, strategies, input, on_error=on_error)

    # -- recording ---------------------------------------------------------------------------

    def metric(self, key: str, value: Any) -> None:
        """Record a custom metric (``stats.custom[key]``, as upstream's
        ``alc.stats.record``). Kept on replay too: the replay rebuilds the same dict, which
        is written whole with each step."""
        if not isinstance(key, str) or not key or len(key) > MAX_METRIC_KEY_CHARS:
            raise InvalidInput(f"metric key must be a non-empty string of at most "
                               f"{MAX_METRIC_KEY_CHARS} characters, got {_clip(key)}")
        check_text(key, what="metric key", limit=MAX_METRIC_KEY_CHARS * 4)
        check_json_able(value, what=f"metric {key!r}", limit=MAX_CUSTOM_BYTES)
        custom = self._tally.custom
        before = custom.get(key, _MISSING)
        custom[key] = copy.deepcopy(value)
        try:
            check_json_able(custom, what="the custom metrics", limit=MAX_CUSTOM_BYTES)
        except InvalidInput:
            if before is _MISSING:
                del custom[key]
            else:
                custom[key] = before
            raise

    def log(self, level: str, msg: str) -> None:
        """Record a log line. Checked here, in the strategy, because a line that cannot be
        stored (a lone surrogate, say) would otherwise fail the step's commit, and the step
        would be retried as a worker error until dead-lettered."""
        if not isinstance(level, str) or level not in _LEVELS:
            raise InvalidInput(f"log level must be one of {', '.join(_LEVELS)}")
        text = check_text(str(msg), what="log message", limit=MAX_MESSAGE_BYTES)
        if not self.replaying:
            self._tally.logs.append({"ts": server_now_ms(), "level": level,
                                     "source": LOG_SOURCE, "message": text})

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
            self._tally.last_progress = {"step": step, "total": total, "message": msg}

    # -- effects (workers/effects.py) --------------------------------------------------------

    async def side_effect(self, name: str, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` once for this session and return its result; a replay returns the
        recorded result instead of running it again."""
        return await self._need_effects().side_effect(name, fn)

    @property
    def state(self) -> Any:
        """The key-value store that outlives sessions (``get/set/set_nx/incr/delete/keys``)."""
        return self._need_effects().state

    def _need_effects(self) -> Effects:
        if self._effects is None:
            raise InvalidInput("side effects and state need a worker: this context was made "
                               "without one (run the strategy through a worker)")
        return self._effects


_MISSING = object()


def _clip(value: object) -> str:
    """A strategy's bad value for a message, kept short."""
    if isinstance(value, int) and abs(value) >= 10**30:
        return f"an integer of {value.bit_length()} bits"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
