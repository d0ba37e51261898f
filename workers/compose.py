"""Strategies made of strategies: ``ctx.fork``, ``ctx.run`` and ``ctx.pipe``.

``run`` and ``pipe`` call registered strategies inline on the caller's own context, so their
questions are simply the caller's. ``fork`` runs its children side by side, each on a child
context whose asks come here instead of pausing the session; the fork merges them:

1. each child runs, one at a time and in child order, until it asks or ends (started in
   turn, then resumed in turn with its answers). So what children do between two rounds
   (count against the budget, log, record side effects and state ops, which are numbered in
   call order) happens in the same order on every run, whatever the event loop schedules
   or however long their I/O takes;
2. each child's questions are counted against the session's budget, in child order (a child
   over budget gets ``BudgetExceeded`` from its ask, runs on to its next ask or its end,
   and is looked at again);
3. every asking child's questions are asked as ONE round of the session, in child order,
   renamed ``f-<child>-<n>`` (``n`` counts that child's questions across the whole fork,
   upstream's numbering), and each child gets its own answers back.

Everything the merge decides follows from the children's questions and answers alone, so a
replay on another worker asks the very same rounds. The questions are what run side by side
(one round for all children); the children's own code takes turns, which on one event loop
costs nothing.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, TypedDict

from coordinator.codec import check_json_able
from coordinator.errors import InvalidInput, InvalidTransition, SessionError
from coordinator.models import LlmQuery, QueryId

from . import catalog

if TYPE_CHECKING:
    from .context import Context

#: Most strategies one fork runs: each is a task and a share of every round.
MAX_FORK = 64
#: Most stages one pipe runs.
MAX_PIPE = 64


class ForkEntry(TypedDict, total=False):
    """One child's outcome, as upstream's ``alc.fork`` gives it."""

    strategy: str
    result: Any
    error: str
    ok: bool


@dataclass(slots=True, eq=False)
class _Child:
    index: int
    name: str
    ctx: Context | None = None
    task: asyncio.Task[Any] | None = None
    #: Its questions not yet asked (None: it is running, or ended).
    request: list[LlmQuery] | None = None
    charged: bool = False
    reply: asyncio.Future[list[str]] | None = None
    #: Set when it asks or ends: what the merge waits for.
    settled: asyncio.Future[None] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future())
    #: Questions it asked so far in this fork (the ``n`` of ``f-<child>-<n>``).
    seq: int = 0

    def settle(self, _: object = None) -> None:
        if not self.settled.done():
            self.settled.set_result(None)

    async def until_settled(self) -> None:
        """Wait until it asks or ends (``asyncio.wait``: a cancelled fork must not cancel
        the future another callback will set)."""
        assert self.task is not None
        if not self.task.done() and self.request is None:
            await asyncio.wait([self.settled])

    async def resume(self, answers: list[str] | SessionError) -> None:
        """Hand it its answers (or its ask's error) and let it run, alone, to its next ask
        or its end: children run one at a time, in child order, so what they do between
        two rounds (side effects, state, budget) happens in the same order on a replay."""
        assert self.reply is not None
        reply, self.request, self.charged = self.reply, None, False
        self.settled = asyncio.get_running_loop().create_future()
        if isinstance(answers, SessionError):
            reply.set_exception(answers)
        else:
            reply.set_result(answers)
        await self.until_settled()

    async def ask(self, queries: list[LlmQuery]) -> list[str]:
        if self.request is not None or (self.reply is not None and not self.reply.done()):
            raise InvalidTransition(
                f"fork child {self.index} ({self.name!r}) asked while another ask of it is "
                "still pending: ask several questions at once with ctx.llm_batch, not "
                "concurrent ctx.llm calls")
        self.request = queries
        self.charged = False
        reply: asyncio.Future[list[str]] = asyncio.get_running_loop().create_future()
        self.reply = reply
        self.settle()
        return await reply


# -- run ---------------------------------------------------------------------------------


async def run(ctx: Context, name: str, input: dict[str, Any] | None = None) -> Any:
    """Another registered strategy, on this context (see ``Context.run``)."""
    fn = catalog.get(_name(name, "run"))
    return await fn(ctx, **_input(input, "run"))


# -- pipe --------------------------------------------------------------------------------


async def pipe(
    ctx: Context, strategies: list[str], input: dict[str, Any] | None = None, *,
    on_error: Literal["fail", "skip"] = "fail",
) -> dict[str, Any]:
    """Upstream's ``alc.pipe`` (see ``Context.pipe``). ``on_error="skip"`` records a
    failing stage as ``{"strategy", "error"}`` and goes on with the task it had."""
    names = _names(strategies, "pipe", MAX_PIPE)
    if on_error not in ("fail", "skip"):
        raise InvalidInput(f"pipe on_error must be 'fail' or 'skip', not {on_error!r}")
    state = _input(input, "pipe")
    history: list[dict[str, Any]] = []
    for i, name in enumerate(names):
        fn = catalog.get(name)
        stage_input = {k: v for k, v in state.items() if k != "result"}
        try:
            result = await fn(ctx, **copy.deepcopy(stage_input))
        except Exception as exc:
            if on_error == "fail":
                raise
            ctx.log("warn", f"pipe: stage {name!r} failed: {_describe(exc)}")
            history.append({"strategy": name, "error": _describe(exc)})
            continue
        state["result"] = result
        history.append({"strategy": name, "result": result})
        if result is not None and i < len(names) - 1:
            state["task"] = as_task(result)
    state["pipe_history"] = history
    return state


def as_task(result: Any) -> str:
    """A stage's result as the next stage's ``task``: upstream hands it on as text, JSON
    for a table, the value's text for the rest."""
    if isinstance(result, str):
        return result
    if isinstance(result, bool):
        return "true" if result else "false"
    if isinstance(result, dict | list):
        return json.dumps(result, ensure_ascii=False, separators=(",", ":"))
    return str(result)


# -- fork --------------------------------------------------------------------------------


async def fork(
    ctx: Context, strategies: list[str], input: dict[str, Any] | None = None, *,
    on_error: str = "skip",
) -> list[ForkEntry]:
    """Upstream's ``alc.fork`` (see ``Context.fork`` and this module's docstring)."""
    names = _names(strategies, "fork", MAX_FORK)
    if on_error == "abort":  # upstream's name for it
        on_error = "fail"
    if on_error not in ("skip", "fail"):
        raise InvalidInput(f"fork on_error must be 'skip' or 'fail', not {on_error!r}")
    base = _input(input, "fork")
    fns = [catalog.get(name) for name in names]
    children = [_Child(i, name) for i, name in enumerate(names)]
    try:
        for child, fn in zip(children, fns, strict=True):  # started one at a time
            child.ctx = ctx._child(child.ask)
            child.task = ctx._spawn(_call(fn, child.ctx, copy.deepcopy(base)))
            child.task.add_done_callback(child.settle)
            await child.until_settled()
        await _merge(ctx, children, fail_fast=on_error == "fail")
    finally:
        for child in children:
            if child.task is not None and not child.task.done():
                child.task.cancel()
                child.task.add_done_callback(_retrieve)
    return [_entry(child) for child in children]


async def _call(fn: catalog.StrategyFn, ctx: Context, input: dict[str, Any]) -> Any:
    return await fn(ctx, **input)


async def _merge(ctx: Context, children: list[_Child], *, fail_fast: bool) -> None:
    """Ask the children's questions round by round until every child has ended."""
    while True:
        if fail_fast:
            _raise_first_failure(children)
        _drop_orphans(children)
        asking = [c for c in children if c.request is not None]
        if not asking:
            return
        if ctx._charges and not await _charge(ctx, asking):
            continue  # a child was refused its ask and did something else: look again
        merged: list[LlmQuery] = []
        for child in asking:
            assert child.request is not None
            for query in child.request:
                merged.append(dataclasses.replace(query, id=QueryId.fork(child.index,
                                                                          child.seq)))
                child.seq += 1
        answers = await ctx._ask(merged)
        at = 0
        for child in asking:
            assert child.request is not None
            n = len(child.request)
            await child.resume(answers[at:at + n])
            at += n


def _drop_orphans(children: list[_Child]) -> None:
    """A child that ended with an ask still pending (one coroutine of it asked while
    another raised): nobody is left to read the answers, so its questions are not asked."""
    for child in children:
        assert child.task is not None
        if child.task.done() and child.request is not None:
            child.request = None
            if child.reply is not None:
                child.reply.cancel()


async def _charge(ctx: Context, asking: list[_Child]) -> bool:
    """Count each asking child's questions, in child order; False when one was refused
    (it gets ``BudgetExceeded`` from its ask, and runs on to its next ask or its end)."""
    all_charged = True
    for child in asking:
        if child.charged:
            continue
        assert child.request is not None
        try:
            ctx._tally.charge(child.request)
        except SessionError as exc:
            await child.resume(exc)
            all_charged = False
            continue
        child.charged = True
    return all_charged


def _raise_first_failure(children: list[_Child]) -> None:
    for child in children:
        task = child.task
        if task is not None and task.done() and not task.cancelled() \
                and task.exception() is not None:
            raise task.exception()  # type: ignore[misc]


def _entry(child: _Child) -> ForkEntry:
    task = child.task
    if task is None or not task.done() or task.cancelled():
        return {"strategy": child.name, "error": "the strategy did not finish", "ok": False}
    exc = task.exception()
    if exc is not None:
        if not isinstance(exc, Exception):  # StepInterrupted, KeyboardInterrupt: not ours
            raise exc
        return {"strategy": child.name, "error": _describe(exc), "ok": False}
    return {"strategy": child.name, "result": task.result(), "ok": True}


def _describe(exc: BaseException) -> str:
    return exc.message if isinstance(exc, SessionError) else f"{type(exc).__name__}: {exc}"


def _retrieve(task: asyncio.Task[Any]) -> None:
    if not task.cancelled():
        task.exception()


# -- checks ------------------------------------------------------------------------------


def _name(name: Any, what: str) -> str:
    if not isinstance(name, str) or not name:
        raise InvalidInput(f"{what} takes a registered strategy's name, got {name!r:.60}")
    return name


def _names(strategies: Any, what: str, limit: int) -> list[str]:
    if isinstance(strategies, str) or not isinstance(strategies, list | tuple) \
            or not strategies:
        raise InvalidInput(f"{what} takes a non-empty list of strategy names")
    if len(strategies) > limit:
        raise InvalidInput(f"{what} takes at most {limit} strategies, got {len(strategies)}")
    return [_name(s, what) for s in strategies]


def _input(input: Any, what: str) -> dict[str, Any]:
    """A private copy of ``input``: data only (each child may change its own freely)."""
    if input is None:
        return {}
    if not isinstance(input, dict) or not all(isinstance(k, str) for k in input):
        raise InvalidInput(f"{what} input must be a dict with string keys, not "
                           f"{type(input).__name__}")
    check_json_able(input, what=f"{what} input")
    return copy.deepcopy(input)
