"""No wrong result across an unclean Sentinel failover, on real servers.

A failover with a lagging replica loses acknowledged writes: a session can come back at an
earlier pause than the one its host was last shown. Query ids recur every round (``q-0``), so
an answer meant for a later round must not be applied to the earlier one, and nothing a host
was told must be undone when the writes wait for a replica (``wait_replicas=1``).

The loss is made as ``/work/shared/reference/redis-sentinel-and-cluster.md`` §6 describes:
freeze the replica (SIGSTOP), cut its link on the primary (``CLIENT KILL TYPE replica``), let
traffic go on for a while (writes the replica never gets), SIGKILL the primary, SIGCONT the
replica; Sentinel promotes it (down-after 1000 ms). The old primary comes back empty on its
port and Sentinel makes it the new primary's replica.

Two real worker processes, one in-process host driving sessions of ``mp-rounds`` (every
round's answers, in order, are the result), answering each batch in a random order. On
``Unavailable`` (``NotReplicated`` included), ``StaleRound``, ``WaitTimeout``,
``AlreadyResponded``, ``UnknownQuery`` or ``InvalidTransition`` the host re-reads the session
(``wait_event``) and answers what it is shown, as a real host should.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import re
import secrets
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis

import tests.strategies_mp  # noqa: F401  (registers mp-rounds for the in-process catalog)
from coordinator import (
    AlreadyResponded,
    Finished,
    InvalidTransition,
    Paused,
    SessionRegistry,
    Unavailable,
    UnknownQuery,
    WaitTimeout,
)
from coordinator.errors import SessionError, StaleRound
from coordinator.states import Phase
from tests.helpers import assert_eventually
from tests.procs import WorkerPool, answer_for, new_namespace
from tests.redis_proc import RedisProcess
from tests.strategies_mp import expected_rounds
from tests.topology import SentinelGroup, running

pytestmark = [pytest.mark.redis, pytest.mark.slow]

_HOST = "127.0.0.1"
SESSIONS = 48
#: In-process hosts, each its own registry (its own connection): with ``wait_replicas`` a
#: connection's writes wait for the replica one after another, so several hosts put several
#: unconfirmed writes on the primary at once while the replica is frozen.
HOSTS = 8
#: ``wait_replicas_timeout_ms`` of the durability-on run (registries and workers).
WAIT_REPLICAS_MS = 300
WIDTH = 3
#: The host thinking before each round (not synchronisation): it keeps traffic going at a
#: pace where the lag window covers a dozen rounds or so of every session.
THINK_S = (0.02, 0.06)
#: The deliberate lag window: acknowledged writes the replica never sees.
LAG_S = 0.8
#: The failover starts once this share of all rounds has been shown to the host, so short
#: sessions are done before it, long ones are in the middle of it.
TRIGGER_SHARE = 0.2
RUN_BOUND_S = 120.0
#: What a host meets during a failover and answers by re-reading the session.
REREAD: tuple[type[SessionError], ...] = (Unavailable, StaleRound, WaitTimeout,
                                          AlreadyResponded, UnknownQuery, InvalidTransition)
_ROUND = re.compile(r"round (\d+), item (\d+)$")


def rounds_of(n: int) -> int:
    """Session ``n``'s length: 6 to 45 rounds, so sessions end before, during and after."""
    return 6 + (n * 7) % 40


def round_of(prompt: str) -> int:
    match = _ROUND.search(prompt)
    assert match, prompt
    return int(match.group(1))


# -- the topology -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sentinel_group() -> Iterator[SentinelGroup]:
    with running(SentinelGroup()) as group:
        yield group


def node_at(group: SentinelGroup, port: int) -> RedisProcess:
    nodes = [n for n in (group.primary, group.replica) if n is not None]
    return next(n for n in nodes if n.port == port)


def replicating(group: SentinelGroup) -> bool:
    """The current replica is linked and acknowledges a write (``WAIT 1``)."""
    with redis.Redis(host=_HOST, port=group.primary_port(), socket_timeout=3) as client:
        client.set("tfailover:probe", "1")
        return bool(client.execute_command("WAIT", 1, 500) >= 1)


async def settled(group: SentinelGroup) -> None:
    """Until the group has a primary with a replica that confirms writes (an earlier test
    may have failed it over)."""
    await assert_eventually(lambda: asyncio.to_thread(replicating, group), timeout=30,
                            interval=0.1, message="the replica acknowledges WAIT")


@dataclass
class Failover:
    """Timestamps (loop time) and what the unclean failover did."""

    lag_started: float = 0.0
    primary_killed: float = 0.0
    promoted: float = 0.0
    relinked: float = 0.0
    links_cut: int = 0
    old_primary: int = 0
    new_primary: int = 0


async def unclean_failover(group: SentinelGroup, lagging: asyncio.Event,
                           promoted: asyncio.Event) -> Failover:
    """Lose the writes of the lag window: the research note's recipe, then the old primary
    back on its port (empty) as the new primary's replica."""
    loop = asyncio.get_running_loop()
    fo = Failover(old_primary=group.primary_port())
    primary = node_at(group, fo.old_primary)
    replica = group.current_replica()
    replica.pause()
    with redis.Redis(host=_HOST, port=primary.port, socket_timeout=2) as client:
        fo.links_cut = int(client.execute_command("CLIENT", "KILL", "TYPE", "replica"))
    fo.lag_started = loop.time()
    lagging.set()
    await asyncio.sleep(LAG_S)  # the deliberate lag window: traffic goes on meanwhile
    primary.kill()
    fo.primary_killed = loop.time()
    replica.resume()

    async def switched() -> bool:
        return await asyncio.to_thread(group.primary_port) == replica.port

    await assert_eventually(switched, timeout=30, interval=0.05,
                            message="Sentinel did not promote the replica")
    fo.promoted, fo.new_primary = loop.time(), replica.port
    promoted.set()
    await asyncio.to_thread(primary.start)  # empty: Sentinel makes it a replica
    await assert_eventually(lambda: asyncio.to_thread(replicating, group), timeout=30,
                            interval=0.1, message="the old primary did not become a replica")
    fo.relinked = loop.time()
    return fo


# -- worker processes on a Sentinel URL ---------------------------------------------------------


# -- the host ---------------------------------------------------------------------------------


@dataclass
class Ledger:
    """What the host was shown and told about one session."""

    tag: str
    rounds: int
    host_no: int  # which of the in-process hosts (registries) drives it
    #: This session's host thinks through the failover once: the round it is shown while
    #: the replica lags, it answers only once the new primary serves (as an LLM call that
    #: takes seconds would), so its answers meet a session that may have been taken back.
    slow_thinker: bool = False
    sid: str = ""
    shown_max: int = -1
    acked: dict[int, set[str]] = field(default_factory=dict)
    finished: Finished | None = None
    first_finished_at: float = float("inf")  # loop time the host was first told it ended
    uncompleted: str = ""    # the phase a completed session was found in after the failover


@dataclass
class Host:
    regs: list[SessionRegistry]
    promoted: asyncio.Event
    rng: random.Random
    ledgers: list[Ledger]
    lagging: asyncio.Event = field(default_factory=asyncio.Event)
    trigger: asyncio.Event = field(default_factory=asyncio.Event)
    rounds_shown: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    samples: dict[str, str] = field(default_factory=dict)  # the first message of each
    rolled_back: dict[str, tuple[int, int]] = field(default_factory=dict)
    lost_acked: set[tuple[str, int, str]] = field(default_factory=set)
    ack_times: list[float] = field(default_factory=list)
    slow_answers: int = 0  # rounds shown while the replica lagged, answered after promotion

    @property
    def total_rounds(self) -> int:
        return sum(led.rounds for led in self.ledgers)

    def observe(self, led: Ledger, event: Paused) -> None:
        r = round_of(event.queries[0].prompt)
        if r < led.shown_max:
            first = self.rolled_back.get(led.sid, (led.shown_max, r))
            self.rolled_back[led.sid] = (max(first[0], led.shown_max), min(first[1], r))
        for q in event.queries:
            if q.id in led.acked.get(r, set()):
                self.lost_acked.add((led.sid, r, q.id))
        if r > led.shown_max:
            self.rounds_shown += r - max(led.shown_max, 0)
            led.shown_max = r
        if self.rounds_shown >= TRIGGER_SHARE * self.total_rounds:
            self.trigger.set()

    def note(self, what: str, exc: SessionError) -> None:
        self.errors[what] += 1
        self.samples.setdefault(what, f"{time.monotonic():.3f} {exc}")

    async def reattach(self, led: Ledger) -> Any:
        while True:
            try:
                return await self.regs[led.host_no].wait_event(led.sid, timeout=10)
            except (Unavailable, WaitTimeout) as exc:
                self.note(f"wait_event:{exc.code}", exc)
                if isinstance(exc, Unavailable):
                    await asyncio.sleep(0.05)  # a host backs off while Redis is unavailable

    async def answer(self, led: Ledger, event: Paused) -> Any:
        """Answer the round shown, in a random order; the next event, or a re-read."""
        r = round_of(event.queries[0].prompt)
        queries = list(event.queries)
        self.rng.shuffle(queries)
        reg = self.regs[led.host_no]
        for q in queries:
            try:
                res = await reg.feed_response(led.sid, q.id, answer_for(q.prompt))
            except REREAD as exc:
                self.note(f"feed:{exc.code}", exc)
                return await self.reattach(led)
            led.acked.setdefault(r, set()).add(q.id)
            self.ack_times.append(time.monotonic())
            if isinstance(res, Paused | Finished):
                return res
        return await self.reattach(led)  # answers this round had are gone: re-read it

    async def drive(self, led: Ledger, event: Any) -> None:
        while True:
            while isinstance(event, Paused):
                self.observe(led, event)
                await asyncio.sleep(self.rng.uniform(*THINK_S))  # the host thinking
                if led.slow_thinker and self.lagging.is_set() and not self.promoted.is_set():
                    led.slow_thinker = False
                    self.slow_answers += 1
                    await self.promoted.wait()  # ... for as long as the failover takes
                event = await self.answer(led, event)
            assert isinstance(event, Finished), event
            led.finished = event
            led.first_finished_at = min(led.first_finished_at, time.monotonic())
            if self.promoted.is_set():  # told by the new primary: no failover after it
                return
            # Told before the promotion: is it still so on the new primary? If not, carry on.
            await self.promoted.wait()
            phase = await self._phase(led)
            if phase == "completed" or event.state is not Phase.COMPLETED:
                return
            led.uncompleted = phase
            event = await self.reattach(led)

    async def _phase(self, led: Ledger) -> str:
        while True:
            try:
                return str((await self.regs[led.host_no].status(led.sid))["phase"])
            except Unavailable as exc:
                self.note(f"status:{exc.code}", exc)


def wrong_results(ledgers: list[Ledger]) -> list[str]:
    """One line per session whose result is not exactly its answers, round by round."""
    out = []
    for led in ledgers:
        fin = led.finished
        want = expected_rounds(led.tag, led.rounds, WIDTH, answer_for)
        if fin is None or fin.state is not Phase.COMPLETED:
            out.append(f"{led.sid} ({led.tag}): not completed: {fin}")
        elif fin.result.get("rounds") != want:
            got = fin.result["rounds"]
            bad = [(r, i, got[r][i].rsplit(":", 1)[-1]) for r in range(min(len(got), len(want)))
                   for i in range(WIDTH) if got[r][i] != want[r][i]]
            out.append(f"{led.sid} ({led.tag}): {len(got)} rounds, {len(bad)} wrong answers; "
                       f"first: round {bad[0][0]} item {bad[0][1]} got the answer to "
                       f"{bad[0][2]!r}" if bad else f"{led.sid}: {len(got)} of {len(want)} rounds")
    return out


@dataclass
class Outcome:
    host: Host
    failover: Failover
    seconds: float
    wrong: list[str]

    def report(self, label: str) -> str:
        h, fo = self.host, self.failover
        in_lag = sum(fo.lag_started <= t <= fo.primary_killed for t in h.ack_times)
        across = sum(led.first_finished_at > fo.primary_killed for led in h.ledgers)
        uncompleted = [led.sid for led in h.ledgers if led.uncompleted]
        return (
            f"[{label}] {len(h.ledgers)} sessions ({across} running at the kill) in "
            f"{self.seconds:.1f} s: "
            f"wrong results {len(self.wrong)}, rolled_back {len(h.rolled_back)}, "
            f"lost acknowledged answers {len(h.lost_acked)}, acks in the lag window "
            f"{in_lag}, rounds answered only after the promotion {h.slow_answers}, "
            f"told completed then found not completed {len(uncompleted)}; "
            f"failover: {fo.links_cut} replica link(s) cut, primary killed "
            f"{fo.primary_killed - fo.lag_started:.2f} s after, promoted "
            f"{fo.promoted - fo.primary_killed:.2f} s after the kill, old primary relinked "
            f"{fo.relinked - fo.promoted:.2f} s after; host re-reads {dict(h.errors)}"
        )

    def print_report(self, label: str) -> None:
        """The report, the first sample of each kind of host error, the first wrong results."""
        print(self.report(label))
        for what, msg in self.host.samples.items():
            print(f"  first {what}: {msg}")
        for line in self.wrong[:10]:
            print("  wrong:", line)


async def run_through_failover(group: SentinelGroup, tmp_path: Path, *,
                               wait_replicas: int) -> Outcome:
    await settled(group)
    ns = new_namespace()
    durability = {"wait_replicas": wait_replicas, "wait_replicas_timeout_ms": WAIT_REPLICAS_MS}
    regs = [SessionRegistry.from_url(group.url, namespace=ns, wait_slice_s=0.1,
                                     wait_timeout_s=30.0, redis_timeout_s=8.0, **durability)
            for _ in range(HOSTS)]
    pool = WorkerPool(group.url, ns, tmp_path)
    pool.env.update({"ALC_REDIS_TIMEOUT_S": "8", "ALC_WAIT_REPLICAS": str(wait_replicas),
                     "ALC_WAIT_REPLICAS_TIMEOUT_MS": str(WAIT_REPLICAS_MS)})
    promoted = asyncio.Event()
    host = Host(regs, promoted, random.Random(secrets.randbits(32)),
                [Ledger(f"s{n}", rounds_of(n), n % HOSTS, slow_thinker=n % 3 == 0)
                 for n in range(SESSIONS)])
    try:
        await pool.start(concurrency=8)
        await pool.start(concurrency=8)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        firsts = []
        for led in host.ledgers:
            led.sid, first = await regs[led.host_no].start_execution(
                "mp-rounds", {"tag": led.tag, "rounds": led.rounds, "width": WIDTH})
            firsts.append(first)
        runs = [asyncio.create_task(host.drive(led, first))
                for led, first in zip(host.ledgers, firsts, strict=True)]
        try:
            await asyncio.wait_for(host.trigger.wait(), 60)
            failover = asyncio.create_task(unclean_failover(group, host.lagging, promoted))
            await asyncio.wait_for(asyncio.shield(failover), 60)
            await asyncio.wait_for(asyncio.gather(*runs), RUN_BOUND_S)
        finally:
            for run in runs:
                run.cancel()
            with contextlib.suppress(BaseException):
                await asyncio.gather(*runs, return_exceptions=True)
        seconds = loop.time() - t0
        fo = failover.result()
        across = sum(led.first_finished_at > fo.primary_killed for led in host.ledgers)
        assert across, "every session ended before the failover"
        outcome = Outcome(host, fo, seconds, wrong_results(host.ledgers))
        # What the sessions say now, on the new primary: completed, with the same result.
        for led in host.ledgers:
            snap = await regs[led.host_no].status(led.sid)
            want = expected_rounds(led.tag, led.rounds, WIDTH, answer_for)
            listed = any(led.sid in line for line in outcome.wrong)
            if not listed and (snap["phase"] != "completed" or snap["result"]["rounds"] != want):
                outcome.wrong.append(f"{led.sid} ({led.tag}): status now: {snap['phase']}, "
                                     f"error {snap.get('error')!r}")
        return outcome
    except BaseException:
        print(pool.logs())
        raise
    finally:
        pool.close()
        for each in regs:
            await each.aclose()


async def test_durability_off_loses_acknowledged_writes_but_gives_no_wrong_result(
    sentinel_group: SentinelGroup, tmp_path: Path,
) -> None:
    """``wait_replicas=0``: the failover loses acknowledged answers and rolls sessions back
    to earlier pauses (allowed), but every session still ends with exactly its answers."""
    out = await run_through_failover(sentinel_group, tmp_path, wait_replicas=0)
    out.print_report("durability off")
    assert out.host.rolled_back or out.host.lost_acked, (
        "the failover lost no acknowledged write: this run proves nothing; " + out.report("off"))
    assert not out.wrong, f"{len(out.wrong)} wrong results: {out.wrong[:5]}"


async def test_durability_on_loses_no_acknowledged_answer_and_gives_no_wrong_result(
    sentinel_group: SentinelGroup, tmp_path: Path,
) -> None:
    """``wait_replicas=1``: nothing the host was told is lost (no acknowledged answer comes
    back pending, no completed session comes back unfinished), and no result is wrong."""
    out = await run_through_failover(sentinel_group, tmp_path, wait_replicas=1)
    out.print_report("durability on")
    assert out.host.errors.get("feed:not_replicated", 0) > 0, (
        "no write was refused as not replicated while the replica was frozen")
    assert not out.host.lost_acked, sorted(out.host.lost_acked)[:10]
    uncompleted = {led.sid: led.uncompleted for led in out.host.ledgers if led.uncompleted}
    assert not uncompleted, f"told completed, then found {uncompleted}"
    assert not out.wrong, f"{len(out.wrong)} wrong results: {out.wrong[:5]}"
