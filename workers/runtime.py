"""``Execution``: drives one strategy coroutine from one ask to the next.

The strategy runs as an asyncio task. ``ctx.llm`` hands its queries to the driver through a
future and suspends on another; ``step(answers)`` resolves that one and waits until the
strategy asks again, returns, raises, or overruns the step timeout (a strategy holding the
worker's loop past it is interrupted by ``watchdog.py``). A worker keeps a paused
``Execution`` in memory (the live path) and, when it does not have one, rebuilds it by
``replay`` from the session's journal (the replay path).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import traceback as tb_module
from collections.abc import Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from coordinator.codec import check_json_able, estimate_tokens, pack, pack_checked
from coordinator.errors import (
    FAILURE_TYPES,
    CorruptState,
    InvalidTransition,
    NonDeterminism,
    SessionError,
    StepTimeout,
)
from coordinator.models import LlmQuery

from .catalog import StrategyFn
from .context import Context, Effects
from .watchdog import StepClock


@dataclass(frozen=True, slots=True)
class Ask:
    queries: list[LlmQuery]


@dataclass(frozen=True, slots=True)
class Done:
    result: Any


@dataclass(frozen=True, slots=True)
class Crash:
    """The session fails: ``error`` for its host, ``kind`` one of ``errors.FAILURE_TYPES``,
    and, when the strategy's own code raised, its ``traceback`` (text, for the session's
    status) and ``exc`` (the exception, for the worker's log)."""

    error: str
    kind: str = "strategy_error"
    traceback: str | None = None
    exc: BaseException | None = field(default=None, repr=False, compare=False)

    @classmethod
    def of(cls, exc: SessionError) -> Crash:
        """A failure the machinery found (no strategy frame to show)."""
        return cls(exc.message, failure_type(exc))

    @classmethod
    def raised(cls, exc: BaseException) -> Crash:
        """The strategy raised ``exc``: its type, and its traceback from the strategy's
        first frame on (the runtime's own frames above it tell an operator nothing)."""
        exc = exc.with_traceback(_strategy_frames(exc.__traceback__))
        message = exc.message if isinstance(exc, SessionError) else f"{type(exc).__name__}: {exc}"
        kind = failure_type(exc) if isinstance(exc, SessionError) else "strategy_error"
        return cls(message, kind, format_traceback(exc), exc)


Outcome = Ask | Done | Crash

#: Longest traceback kept with a failed session (its end, where the error is, is kept).
MAX_TRACEBACK_CHARS = 8 * 1024
#: The runtime's files, whose frames lead into every strategy's traceback.
_RUNTIME_FILES = frozenset(str(Path(__file__).with_name(n)) for n in ("runtime.py", "watchdog.py"))


def failure_type(exc: SessionError) -> str:
    """The ``FAILURE_TYPES`` entry an error raised in a step stands for (a
    ``PayloadTooLarge`` is an ``invalid_input``); errors with no type of their own (a
    strategy raising ``InvalidTransition``, say) are the strategy's: ``strategy_error``."""
    for cls in type(exc).__mro__:
        code = getattr(cls, "code", None)
        if code in FAILURE_TYPES:
            return str(code)
    return "strategy_error"


def _strategy_frames(tb: TracebackType | None) -> TracebackType | None:
    while tb is not None and tb.tb_frame.f_code.co_filename in _RUNTIME_FILES:
        tb = tb.tb_next
    return tb


def format_traceback(exc: BaseException) -> str:
    """``exc``'s traceback as Python prints it, its chained causes included, cut to its
    last ``MAX_TRACEBACK_CHARS``."""
    text = "".join(tb_module.format_exception(exc))
    if len(text) <= MAX_TRACEBACK_CHARS:
        return text
    return "... (traceback cut)\n" + text[-MAX_TRACEBACK_CHARS:]

#: What a step's outbox holds when the strategy ended instead of asking.
_ENDED: list[LlmQuery] = []


def digest(queries: list[LlmQuery]) -> bytes:
    """What a round asked, in 8 bytes: enough to notice a replay that asks otherwise. A
    query's deadline (``dl``, an instant computed when it is asked) is left out: a replay
    asks the same question at another time. Its default answer (``to``) is in."""
    records = [{k: v for k, v in q.to_record().items() if k != "dl"} for q in queries]
    return hashlib.blake2b(pack(records), digest_size=8).digest()


def journal_entry(queries: list[LlmQuery], answers: list[str],
                  facts: list[dict[str, Any]] | None = None) -> bytes:
    """One answered round as the journal keeps it: its digest, then (id, prompt, answer,
    facts) per exchange; ``facts`` (``exchange_facts``) is what the conversation history
    shows besides the text: tokens and times."""
    rows: list[list[Any]] = [[q.id, q.prompt, a]
                             for q, a in zip(queries, answers, strict=True)]
    if facts is not None:
        for row, fact in zip(rows, facts, strict=True):
            row.append(fact)
    return pack([digest(queries), rows])


def exchange_facts(queries: list[LlmQuery], answers: list[str],
                   records: list[dict[str, Any]], paused_at: int | None
                   ) -> list[dict[str, Any]]:
    """Each exchange's tokens (the host's counts when it gave them, else the estimates) and
    times (asked: the round's pause; answered: the feed), as algocline's history has them.
    ``records``: the round's answer records as ``feed`` stored them (decoded once, by the
    caller that read the answers from them), in query order."""
    out = []
    for q, answer, rec in zip(queries, answers, records, strict=True):
        found = rec.get("u")
        usage: dict[str, Any] = found if isinstance(found, dict) else {}
        prompt = usage.get("prompt_tokens")
        completion = usage.get("completion_tokens")
        out.append({
            "pt": prompt if isinstance(prompt, int) else
            estimate_tokens(q.prompt) + (estimate_tokens(q.system) if q.system else 0),
            "rt": completion if isinstance(completion, int) else estimate_tokens(answer),
            # the answer's time is the host-side process's reading of Redis's clock, the
            # pause's Redis's own: never show an answer before its question
            "s": paused_at, "c": _not_before(rec.get("t"), paused_at)})
    return out


def _not_before(at: Any, start: int | None) -> int | None:
    if not isinstance(at, int):
        return None
    return at if start is None else max(at, start)


@dataclass(frozen=True, slots=True)
class JournalRound:
    digest: bytes
    answers: list[str]


class Execution:
    def __init__(
        self,
        fn: StrategyFn,
        input: dict[str, Any],
        *,
        budget: dict[str, Any] | None = None,
        started_at_ms: int = 0,
        max_result_bytes: int | None = None,
        session_id: str | None = None,
        effects: Effects | None = None,
    ) -> None:
        self._fn = fn
        self._input = input
        self._max_result_bytes = max_result_bytes
        self.ctx = Context(self._ask, budget=budget, started_at_ms=started_at_ms,
                           effects=effects, spawn=self._spawn)
        self._task: asyncio.Task[Any] | None = None
        #: The strategy's time on the loop: its step deadline, and the watchdog's view.
        self.clock = StepClock(getattr(fn, "__qualname__", ""), session_id=session_id)
        self._outbox: asyncio.Future[list[LlmQuery]] | None = None
        self._inbox: asyncio.Future[list[str]] | None = None
        #: Rounds asked so far; equals the session's ``asked`` while in step with it.
        self.asked = 0
        self.last_queries: list[LlmQuery] = []
        #: When its last round paused (Unix ms, Redis's clock, as near as this worker knows
        #: it): the history's "asked at" of that round's exchanges.
        self.paused_at: int | None = None
        #: Set by ``close``: the strategy was cut off and may ask nothing more.
        self._closed = False

    async def _ask(self, queries: list[LlmQuery]) -> list[str]:
        # Typed errors, raised inside the strategy, for the two asks nobody can answer: a
        # strategy that caught the CancelledError of a cancel (or a step cut short) and
        # asks on, and one that asks from two coroutines at once.
        if self._closed:
            raise InvalidTransition(
                "the session's execution was stopped (the session was cancelled or ended, "
                "or its step was cut short): ctx.llm cannot ask any more; let the "
                "CancelledError propagate")
        if self._outbox is None or self._outbox.done():
            raise InvalidTransition(
                "ctx.llm was called while another ask of this strategy is still pending: "
                "ask several questions at once with ctx.llm_batch, not concurrent ctx.llm "
                "calls")
        self._inbox = asyncio.get_running_loop().create_future()
        self._outbox.set_result(queries)
        return await self._inbox

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        """A task for a strategy this one forks, clocked as the strategy itself: its time on
        the loop is this step's (``watchdog.py``)."""
        return asyncio.create_task(self.clock.timed(coro))

    def _ended(self, task: asyncio.Task[Any]) -> None:
        """The strategy returned or raised: that is the step's outcome too."""
        if self._outbox is not None and not self._outbox.done():
            self._outbox.set_result(_ENDED)

    async def _main(self) -> Any:
        return await self._fn(self.ctx, **self._input)

    async def step(self, answers: list[str] | None, timeout_s: float) -> Outcome:
        """Start the strategy (``answers`` None) or answer its pending ask, and run it to
        its next ask or its end."""
        if self._task is not None and (answers is None
                                       or len(answers) != len(self.last_queries)):
            # The last line of defence: answers are handed back by position, so any other
            # number than was asked would resume the strategy with wrong or missing answers
            # (it got [] for a batch of 4 once, and completed). End it instead.
            self.close()
            return Crash.of(CorruptState(
                f"corrupt state: round {self.asked} asked {len(self.last_queries)} "
                f"question(s) but {'no' if answers is None else len(answers)} answer(s) came "
                "back; the strategy is not resumed with answers that do not match its "
                "questions"
            ))
        # One future carries either outcome (an ask, or _ENDED from the task's done
        # callback), awaited under a timeout scope: no asyncio.wait, no extra task per step.
        outbox: asyncio.Future[list[LlmQuery]] = asyncio.get_running_loop().create_future()
        self._outbox = outbox
        if self._task is None:
            self._task = asyncio.create_task(self.clock.timed(self._main()))
            self._task.add_done_callback(self._ended)
        else:
            assert self._inbox is not None and answers is not None
            self._inbox.set_result(answers)
        task = self._task
        if task.done():
            # It ended after its last ask, when no step was waiting (one coroutine asked
            # while another failed, say): its end is this step's outcome, not a timeout.
            self._ended(task)
        try:
            queries = await self.clock.within(outbox, timeout_s)
        except TimeoutError as exc:  # overrun, or interrupted by the watchdog (watchdog.py)
            self.close()
            return Crash.of(StepTimeout(str(exc) or
                f"step timeout: the strategy neither asked nor returned within {timeout_s:g} s"
            ))
        except asyncio.CancelledError:
            self.close()  # a step cut short must not leave the strategy running on its own
            raise
        if queries is _ENDED:
            return self._finish(task)
        self.asked += 1
        self.last_queries = queries
        return Ask(queries)

    def _finish(self, task: asyncio.Task[Any]) -> Outcome:
        if task.cancelled():
            return Crash("the strategy was cancelled")
        exc = task.exception()
        if exc is not None:
            return Crash.raised(exc)
        result = task.result()
        try:
            check_json_able(result, what="the strategy's result", limit=self._max_result_bytes)
            # Whatever msgpack still refuses fails the session here, by name: at the commit
            # it would be a step error, retried max_attempts times to a misleading dead letter.
            pack_checked(result, what="the strategy's result")
        except SessionError as err:
            return Crash(err.message, "invalid_result")
        return Done(result)

    async def replay(self, journal: list[JournalRound], timeout_s: float) -> Outcome:
        """Re-run the strategy through its answered rounds; returns the outcome after the
        last journaled round, which is the ask still pending (or an end)."""
        self.ctx.replaying = True
        try:
            out = await self.step(None, timeout_s)
            for n, entry in enumerate(journal, start=1):
                if not isinstance(out, Ask) or digest(out.queries) != entry.digest:
                    raise NonDeterminism(
                        f"non-determinism: on replay, round {n} asked "
                        f"{_describe(out)} instead of what the journal recorded; strategies "
                        "must ask the same questions given the same answers"
                    )
                if len(entry.answers) != len(out.queries):
                    raise CorruptState(
                        f"corrupt state: journal round {n} holds {len(entry.answers)} "
                        f"answer(s) to {len(out.queries)} question(s)"
                    )
                out = await self.step(entry.answers, timeout_s)
            return out
        finally:
            self.ctx.replaying = False
            self.ctx.logs.clear()
            self.ctx.last_progress = None

    def close(self) -> None:
        self._closed = True
        if self._task is not None and not self._task.done():
            self._task.cancel()
            # What it ends with (a strategy may catch the cancel and raise something else)
            # is nobody's to read now; read it so asyncio does not log it as lost.
            self._task.add_done_callback(_retrieve)
        if self._inbox is not None and not self._inbox.done():
            self._inbox.cancel()
        if self._task is not None and self._task.done():
            with contextlib.suppress(BaseException):
                self._task.exception()


def _retrieve(task: asyncio.Task[Any]) -> None:
    if not task.cancelled():
        task.exception()


def _describe(out: Outcome) -> str:
    if isinstance(out, Ask):
        return f"{len(out.queries)} different question(s)"
    if isinstance(out, Done):
        return "nothing (it returned)"
    return f"nothing (it failed: {out.error})"
