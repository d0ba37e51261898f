"""Concurrency by property (issue 3, item 6): random interleavings of feeds to the same
sessions from several registries at once, with duplicates, unknown query ids and unknown
sessions mixed in.

Hypothesis draws a plan: sessions, their rounds (1 to 4 queries each), and for every round a
shuffled list of feeds (each valid query id at least once, plus duplicates, unknown ids and
feeds to a session that does not exist), each from one of three registries (separate
clients), cut into *waves*. The feeds of a wave run concurrently (``asyncio.gather``); waves
run one after another; different sessions are driven concurrently too.

``feed.lua`` is atomic, so whatever the interleaving, the outcomes of a wave must be those of
the rules applied to the feeds in *some* order (a linearisation), which the test searches
for exhaustively (waves have at most four feeds). The rules, per round of width ``w``:

- a feed for an unanswered valid id is recorded: ``Accepted(w - answered)`` while answers
  remain, and the one that completes the round returns the next event (``Paused`` or
  ``Finished``) once a worker has applied the round;
- a feed for an id answered in this round: ``AlreadyResponded``;
- a feed for an id not in the round: ``UnknownQuery``;
- any feed after the round completed, while it is applied: ``InvalidTransition`` with
  ``state == "running"``;
- a feed to a session that does not exist: ``NotFound``;
- an empty query id: ``InvalidInput``, refused before it reaches Redis.

So the ``Accepted`` counts of a round are exactly ``w-1, ..., 1``, exactly one feed per round
returns the next event, every error is one of the typed ones, and the answer the strategy
finally receives for each query is the one of the feed that was accepted for it.

The worker's step is held by a gate (an ``asyncio.Event`` the strategy waits on before its
next question) until every feed of the round has returned: a feed that lands after the next
pause would answer the *next* round's query of the same id (ids restart each round), which
is a different experiment (see docs/guarantees.md).
"""

from __future__ import annotations

import asyncio
import itertools
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from coordinator.errors import (
    AlreadyResponded,
    InvalidInput,
    InvalidTransition,
    NotFound,
    SessionError,
    UnknownQuery,
)
from coordinator.models import Accepted, Finished, Paused
from coordinator.registry import SessionRegistry
from coordinator.settings import Settings
from coordinator.states import Phase
from tests.procs import InProcessCluster
from tests.redis_proc import RedisProcess
from workers import strategy
from workers.context import Context

REGISTRIES = 3
UNKNOWN_IDS = ("q-9", "f-0-0", "x", "")
NO_SUCH_SESSION = "s-0-00000000000000000000000000000000"


# -- the strategy under test: rounds of given widths, each step held by a gate ---------------


class Gate:
    def __init__(self) -> None:
        self.entered = asyncio.Event()
        self.opened = asyncio.Event()

    async def pass_(self) -> None:
        self.entered.set()
        await self.opened.wait()


GATES: dict[tuple[str, int], Gate] = {}


def prompt(tag: str, r: int, i: int) -> str:
    return f"{tag} r{r} q{i}"


@strategy("tprop-rounds")
async def gated_rounds(ctx: Context, tag: str = "", widths: list[int] | None = None,
                       **_: Any) -> list[list[str]]:
    """Round ``r`` asks ``widths[r]`` questions; before every question after the first round
    and before returning, the step waits at gate ``(tag, r)``."""
    out: list[list[str]] = []
    for r, width in enumerate(widths or []):
        if r > 0:
            await GATES[(tag, r)].pass_()
        out.append(await ctx.llm_batch([prompt(tag, r, i) for i in range(width)]))
    await GATES[(tag, len(widths or []))].pass_()
    return out


# -- plans ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Feed:
    reg: int  # which registry sends it
    qid: str
    sid_known: bool = True  # False: to a session that does not exist

    def answer(self, tag: str, r: int, n: int) -> str:
        return f"{tag}/r{r}/#{n}/reg{self.reg}/{self.qid}"


@dataclass(frozen=True)
class Round:
    width: int
    waves: tuple[tuple[Feed, ...], ...]


@dataclass(frozen=True)
class Plan:
    sessions: tuple[tuple[Round, ...], ...]


@st.composite
def rounds(draw: st.DrawFn) -> Round:
    width = draw(st.integers(1, 4))
    valid = [f"q-{i}" for i in range(width)]
    ids = list(valid)
    ids += draw(st.lists(st.sampled_from(valid), max_size=3))  # duplicates
    ids += draw(st.lists(st.sampled_from((*UNKNOWN_IDS, f"q-{width}")), max_size=2))
    feeds = [Feed(draw(st.integers(0, REGISTRIES - 1)), qid) for qid in ids]
    feeds += [Feed(draw(st.integers(0, REGISTRIES - 1)), "q-0", sid_known=False)
              for _ in range(draw(st.integers(0, 1)))]
    feeds = draw(st.permutations(feeds))
    waves: list[tuple[Feed, ...]] = []
    while feeds:
        size = draw(st.integers(1, min(4, len(feeds))))
        waves.append(tuple(feeds[:size]))
        feeds = feeds[size:]
    return Round(width, tuple(waves))


plans = st.builds(
    Plan, st.lists(st.lists(rounds(), min_size=1, max_size=3).map(tuple), min_size=1,
                   max_size=2).map(tuple),
)


# -- the rules --------------------------------------------------------------------------------

EVENT = "event"  # the outcome of the feed that completes a round: the next event


@dataclass
class RoundModel:
    width: int
    answered: set[str] = field(default_factory=set)

    @property
    def complete(self) -> bool:
        return len(self.answered) == self.width

    def apply(self, feed: Feed) -> Any:
        """The outcome the rules give: ("Accepted", n) | EVENT | an error type name."""
        if not feed.qid:
            return "InvalidInput"  # refused before it reaches Redis, in any state
        if not feed.sid_known:
            return "NotFound"
        if self.complete:
            return ("InvalidTransition", "running")
        if feed.qid in self.answered:
            return "AlreadyResponded"
        if feed.qid not in {f"q-{i}" for i in range(self.width)}:
            return "UnknownQuery"
        self.answered.add(feed.qid)
        return EVENT if self.complete else ("Accepted", self.width - len(self.answered))

    def copy(self) -> RoundModel:
        return RoundModel(self.width, set(self.answered))


def observed(outcome: Any) -> Any:
    """An outcome in the model's terms; anything outside the typed errors fails the test."""
    if isinstance(outcome, Accepted):
        return ("Accepted", outcome.remaining)
    if isinstance(outcome, InvalidTransition):
        return ("InvalidTransition", outcome.state)
    if isinstance(outcome, AlreadyResponded | UnknownQuery | NotFound | InvalidInput):
        return type(outcome).__name__
    raise AssertionError(f"not an outcome the rules allow: {outcome!r}")


def linearise(model: RoundModel, feeds: tuple[Feed, ...], seen: list[Any]) -> RoundModel:
    """The model after the wave, for an order of its feeds that explains every outcome seen;
    fails the test when no order does."""
    for order in itertools.permutations(range(len(feeds))):
        trial = model.copy()
        if all(trial.apply(feeds[i]) == seen[i] for i in order):
            return trial
    raise AssertionError(
        f"no order of the wave {[f.qid if f.sid_known else 'no-such-session' for f in feeds]} "
        f"explains the outcomes {seen} (answered before: {sorted(model.answered)}, "
        f"width {model.width})")


# -- driving a plan ---------------------------------------------------------------------------


async def settle(tasks: list[asyncio.Task[Any]], gate: Gate) -> None:
    """Wait until every feed task is done except at most the one that completed the round,
    which waits for the next event: that one is pending only once the round is complete,
    which the strategy's reaching the gate proves. Event-driven, bounded."""
    entered = asyncio.ensure_future(gate.entered.wait())
    try:
        while True:
            pending = [t for t in tasks if not t.done()]
            if not pending or (len(pending) == 1 and gate.entered.is_set()):
                return
            done, _ = await asyncio.wait([*pending, entered], timeout=20,
                                         return_when=asyncio.FIRST_COMPLETED)
            assert done, f"feeds stuck: {len(pending)} pending, gate entered: " \
                         f"{gate.entered.is_set()}"
    finally:
        entered.cancel()


async def feed_outcome(reg: SessionRegistry, sid: str, qid: str, answer: str) -> Any:
    try:
        return await reg.feed_response(sid, qid, answer, timeout=20)
    except SessionError as exc:
        return exc


async def drive_session(regs: list[SessionRegistry], tag: str, plan: tuple[Round, ...]) -> None:
    widths = [rnd.width for rnd in plan]
    for r in range(1, len(plan) + 1):
        GATES[(tag, r)] = Gate()
    sid, event = await regs[0].start_execution("tprop-rounds", {"tag": tag, "widths": widths})
    expected_answers: list[list[str]] = []
    counter = itertools.count()
    for r, rnd in enumerate(plan):
        assert isinstance(event, Paused), event
        assert [q.id for q in event.queries] == [f"q-{i}" for i in range(rnd.width)]
        assert [q.prompt for q in event.queries] == [prompt(tag, r, i)
                                                      for i in range(rnd.width)]
        gate = GATES[(tag, r + 1)]
        model = RoundModel(rnd.width)
        tasks: list[asyncio.Task[Any]] = []
        accepted_by: dict[str, str] = {}
        completing: asyncio.Task[Any] | None = None
        for wave in rnd.waves:
            answers = [f.answer(tag, r, next(counter)) for f in wave]
            wave_tasks = [
                asyncio.create_task(feed_outcome(regs[f.reg], sid if f.sid_known
                                                 else NO_SUCH_SESSION, f.qid, a))
                for f, a in zip(wave, answers, strict=True)
            ]
            tasks += wave_tasks
            await settle(tasks, gate)
            seen = [observed(t.result()) if t.done() else EVENT for t in wave_tasks]
            model = linearise(model, wave, seen)
            for f, a, s, t in zip(wave, answers, seen, wave_tasks, strict=True):
                if s == EVENT or (isinstance(s, tuple) and s[0] == "Accepted"):
                    accepted_by[f.qid] = a
                if s == EVENT:
                    completing = t
        assert model.complete and completing is not None
        outcomes = [observed(t.result()) for t in tasks if t is not completing]
        counts = sorted(o[1] for o in outcomes if isinstance(o, tuple) and o[0] == "Accepted")
        assert counts == list(range(1, rnd.width)), counts  # w-1, ..., 1: each exactly once
        gate.opened.set()
        event = await asyncio.wait_for(completing, 20)  # exactly one feed: the next event
        expected_answers.append([accepted_by[f"q-{i}"] for i in range(rnd.width)])
    assert isinstance(event, Finished) and event.state is Phase.COMPLETED, event
    assert event.result == expected_answers  # the accepted feed's answer, in query order
    assert event.metrics["auto"]["rounds"] == len(plan)


async def run_plan(plan: Plan, make_regs: Callable[[], Awaitable[list[SessionRegistry]]],
                   ) -> None:
    regs = await make_regs()
    prefix = secrets.token_hex(3)
    try:
        await asyncio.wait_for(asyncio.gather(*(
            drive_session(regs, f"{prefix}s{n}", rounds_)
            for n, rounds_ in enumerate(plan.sessions))), 60)
    finally:
        for gate in GATES.values():
            gate.opened.set()
        GATES.clear()


def prop_settings(ns: str) -> Settings:
    return Settings(namespace=ns, wait_slice_s=0.05, wait_timeout_s=20.0, lock_wait_s=5.0)


def run_on(cluster: InProcessCluster, plan: Plan) -> None:
    """One example: a worker and ``REGISTRIES`` registries, each on its own transport (as
    separate processes would be), driving ``plan``."""

    async def main() -> None:
        try:
            await cluster.worker(concurrency=4)

            async def make_regs() -> list[SessionRegistry]:
                return [cluster.registry() for _ in range(REGISTRIES)]

            await run_plan(plan, make_regs)
        finally:
            await cluster.aclose()

    asyncio.run(main())


# -- on fakeredis ----------------------------------------------------------------------------


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(plan=plans)
def test_concurrent_feeds_follow_the_rules_on_fakeredis(plan: Plan) -> None:
    run_on(InProcessCluster.fake(prop_settings(f"tp{secrets.token_hex(4)}")), plan)


# -- on a real server ------------------------------------------------------------------------


@pytest.mark.redis
@settings(max_examples=15, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(plan=plans)
def test_concurrent_feeds_follow_the_rules_on_redis(shared_redis: RedisProcess,
                                                   plan: Plan) -> None:
    """The same property over TCP, through the production transport, where the feeds of a
    wave really are in flight together on three connections."""
    run_on(InProcessCluster.real(shared_redis.url, prop_settings(f"tp{secrets.token_hex(4)}")),
           plan)
