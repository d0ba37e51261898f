"""A crashed worker costs its sessions a fraction of a second, not a lease.

A worker keeps its process channel (``ns:proc:<worker id>``) subscribed from start to exit, so
when Redis sees its connection close (SIGKILL, OOM kill, crash, or a cut-off) that channel has
no subscriber. The other workers look for that every ``RESCUE_EVERY_S`` (``workers.intake``)
and take the gone worker's work over at once: the jobs pending on its consumer, the rounds
handed to it, and lock A held in its name (``lock_acquire.lua``, ``step_begin.lua``), with the
fence bumped, so a cut-off worker's late commit is refused. A worker that is only frozen or
slow keeps its connection, and the lease and the claim timeout stay the bound there.

1. The scripts: lock A (and C) named for a gone holder is taken at once, a live or unnamed
   holder's is not (fakeredis and redis-server).
2. In-process rescues (fakeredis and redis-server): a job pending on a gone consumer, a
   round handed to a gone holder, and a worker cut off from pub/sub mid-step whose late
   commit is fenced out.
3. Real worker processes with the **default** settings (10 s lease, 5 s claim idle time): 20
   sessions of 5 rounds of 3 queries, the host thinking 10-40 ms a round, one of two workers
   SIGKILLed mid-run; every session finishes exactly, and each session whose step was in
   flight on the dead worker has its next event within RECOVERY_BOUND_S of the kill
   (printed: p50 and max). A worker killed in the middle of a step it took from the stream,
   and in the middle of one handed to it, the same. And the backstop: a *frozen* holder
   keeps its lease, which is waited out.

Nothing sleeps to synchronise: the host's think time is the simulated workload, and waits
are on events, on Redis (BLPOP, a pidfd) or ``assert_eventually``.
"""

from __future__ import annotations

import asyncio
import random
import signal
import statistics
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis

from coordinator.codec import text
from coordinator.keys import JOB_GROUP, Keys
from coordinator.locks import owner_token
from coordinator.models import Finished, LlmQuery, Paused
from coordinator.registry import SessionRegistry
from coordinator.settings import Settings
from coordinator.states import Phase
from tests.conftest import FakeCluster
from tests.helpers import GATES, Gate, assert_eventually, shard_keys
from tests.procs import WAIT_S, WorkerPool, WorkerProc, answer_for, steps_held_by
from tests.strategies_mp import expected_rounds, hold_keys, prompt_for
from workers import strategy
from workers.context import Context

#: The in-process tests run on fakeredis and on a real redis-server.
ON_BOTH_SERVERS = True

#: Generous bound on kill -> next event of a session whose step was on the dead worker
#: (typically a few hundred ms: one rescue period plus a replay); far below the 10 s lease.
RECOVERY_BOUND_S = 3.0
DEFAULTS = Settings()


# -- strategies for the in-process tests -------------------------------------------------------


@strategy("tfr-two")
async def tfr_two(ctx: Context, tag: str = "", **_: Any) -> dict[str, str]:
    first = await ctx.llm(f"{tag} first")
    second = await ctx.llm(f"{tag} second after {first}")
    return {"first": first, "second": second}


@strategy("tfr-gated-start")
async def tfr_gated_start(ctx: Context, tag: str = "", **_: Any) -> dict[str, str]:
    """The first worker to run the start step waits at the test's gate; any other runs on."""
    gate = GATES[tag]
    if not gate.entered.is_set():
        gate.entered.set()
        await gate.open.wait()
    return {"answer": await ctx.llm(f"{tag} question")}


# -- 1. the scripts ---------------------------------------------------------------------------


async def test_lock_a_of_a_gone_holder_is_taken_at_once_and_nobody_elses(
    fake_cluster: FakeCluster,
) -> None:
    reg = fake_cluster.registry()
    r, keys = reg.client, reg.keys
    sid = await reg.submit("tfr-never-run", {})  # no worker: running, its start job queued
    sk = keys.session(sid)
    # "alive" has a live connection on its process channel (in the session's shard, where
    # the scripts look, and in the first, lock C's); "ghost" has none
    shard, first = await shard_keys(reg, sid), await shard_keys(reg)
    await reg.mux.subscribe(shard.process_channel("alive"))
    await reg.mux.subscribe(first.process_channel("alive"))
    cases = [
        # (lock value, session fields, taken?)
        ("r1|ghost", {}, True),  # a worker's own token, the worker gone
        ("r1|alive", {}, False),  # ... the worker alive (however slow or frozen)
        ("r1", {}, False),  # a token that names nobody: its lease is always waited out
        ("feed-tok", {"ready_token": "feed-tok", "holder": "ghost"}, True),  # handoff, gone
        ("feed-tok", {"ready_token": "feed-tok", "holder": "alive"}, False),  # ... alive
        ("other", {"ready_token": "feed-tok", "holder": "ghost"}, False),  # not the handoff's
    ]
    for how in ("step_begin", "lock_acquire"):
        for value, fields, taken in cases:
            label = f"{how} over {value!r} {fields}"
            await r.set(sk.lock, value, px=60_000)
            if fields:
                await r.hset(sk.session, mapping=fields)
            fence = int(await r.hget(sk.session, "fence"))
            tries = int(await r.hget(sk.session, "tries") or 0)
            mine = owner_token("me")
            if how == "step_begin":
                lease = (await reg.scripts.step_begin(sid, token=mine, lease_ms=5_000,
                                                      with_journal=False)).lease
            else:
                lease = await reg.scripts.lock_acquire(sk.lock, sk.session, token=mine,
                                                       lease_ms=5_000, fence_field="fence")
            now_fence = int(await r.hget(sk.session, "fence"))
            if taken:
                # taken, the fence bumped as by any acquisition: the gone holder's commit
                # would be refused
                assert lease.fence > fence and lease.pttl == -1, label
                assert now_fence == lease.fence, label
                assert int(await r.hget(sk.session, "tries")) == tries + 1, label
                assert text(await r.get(sk.lock)) == mine, label
                assert 0 < await r.pttl(sk.lock) <= 5_000, label
            else:
                assert lease.fence == 0 and 55_000 < lease.pttl <= 60_000, (label, lease)
                assert now_fence == fence, label
                assert text(await r.get(sk.lock)) == value, label
            await r.hdel(sk.session, "ready_token", "holder")

    # Lock C names no holder, so its lease is always waited out; a token naming a gone one
    # would be taken (the same rule), though nothing takes lock C with such a token.
    for value, taken in (("c1", False), ("c1|ghost", True), ("c1|alive", False)):
        await r.set(first.registry_lock, value, px=60_000)
        lease = await reg.scripts.lock_acquire(first.registry_lock, first.registry_fence,
                                               token="c2", lease_ms=5_000, fence_field="")
        assert (lease.fence > 0) is taken and (lease.pttl == -1) is taken, (value, lease)
        assert text(await r.get(first.registry_lock)) == ("c2" if taken else value)


# -- 2. in-process rescues ----------------------------------------------------------------------


async def test_a_job_pending_on_a_gone_worker_is_taken_over_at_once(
    fake_cluster: FakeCluster,
) -> None:
    """A worker ("ghost") read a start job and took lock A for it, then its connection went:
    the job is claimed and its lock taken over within a rescue period or two, though neither
    the claim idle time nor the lease (a minute each here) has passed. A job pending on a
    worker that is alive stays with it."""
    reg = fake_cluster.registry()
    r, keys = reg.client, reg.keys
    await r.xgroup_create(keys.jobs, JOB_GROUP, id="0", mkstream=True)
    sid = await reg.submit("tfr-two", {"tag": "g"})
    other = await reg.submit("tfr-two", {"tag": "alive"})
    (got,) = await r.xreadgroup(JOB_GROUP, "ghost", {keys.jobs: ">"}, count=1)
    assert text(got[1][0][1][b"sid"]) == sid
    await r.xreadgroup(JOB_GROUP, "alive", {keys.jobs: ">"}, count=1)
    await reg.mux.subscribe(keys.process_channel("alive"))
    # both registered, as every worker is before it reads a job
    await r.zadd(keys.workers, dict.fromkeys(("ghost", "alive"), time.time_ns() // 10**6))
    sk = keys.session(sid)
    await r.set(sk.lock, owner_token("ghost"), px=60_000)
    ghost_fence = time.time_ns() // 1000  # the ghost's acquisition (a clock fence, a try)
    await r.hset(sk.session, mapping={"fence": ghost_fence, "tries": 1})

    started = time.monotonic()
    w = await fake_cluster.worker(claim_idle_ms=60_000, lease_ms=60_000)
    assert w.locks.owner == w.id and w.locks.session(sid).new_token().endswith(f"|{w.id}")
    event = await reg.wait_event(sid, timeout=WAIT_S)
    elapsed = time.monotonic() - started
    assert event == Paused((LlmQuery(id="q-0", prompt="g first"),)), event
    assert elapsed < RECOVERY_BOUND_S, f"taken over after {elapsed:.2f} s"
    assert w.stats.rescued == 1 and w.stats.replays == 0, w.stats
    assert int(await r.hget(sk.session, "fence")) > ghost_fence  # the rescuer's
    assert await r.hget(sk.session, "tries") == b"0"  # reset by the rescuer's commit
    assert not await r.exists(sk.lock)  # released by the commit

    # The live worker's job is not touched, however often the rescuer looks.
    assert await w.intake.rescue_once() == 0
    rows = await r.xpending_range(keys.jobs, JOB_GROUP, "-", "+", 10)
    assert [text(row["consumer"]) for row in rows] == ["alive"], rows
    assert (await reg.status(other))["phase"] == "running"


async def test_a_round_handed_to_a_gone_holder_is_taken_over_at_once(
    fake_cluster: FakeCluster,
) -> None:
    """The feed handed a round to the session's live holder ("ghost": its nudge channel
    heard the handoff, then its connection went), taking lock A in its name; the worker that
    read the round's job left it to that holder, and takes it over at its next look."""
    reg = fake_cluster.registry()
    r, keys = reg.client, reg.keys
    w = await fake_cluster.worker(claim_idle_ms=60_000, lease_ms=60_000)
    sid, first = await reg.start_execution("tfr-two", {"tag": "h"}, timeout=WAIT_S)
    assert isinstance(first, Paused)
    sk = keys.session(sid)
    await reg.mux.subscribe(keys.worker_nudge("ghost"))  # hears the handoff, in its name
    await r.hset(sk.session, mapping={"holder": "ghost",
                                      "holder_ch": keys.worker_nudge("ghost")})
    fence = int(await r.hget(sk.session, "fence"))

    started = time.monotonic()
    event = await reg.feed_response(sid, "q-0", "A1", timeout=WAIT_S)
    elapsed = time.monotonic() - started
    assert event == Paused((LlmQuery(id="q-0", prompt="h second after A1"),)), event
    assert elapsed < RECOVERY_BOUND_S, f"taken over after {elapsed:.2f} s"
    assert w.stats.rescued == 1 and w.stats.deferred >= 1, w.stats
    assert int(await r.hget(sk.session, "fence")) > fence  # the handoff's, then the rescue's
    assert text(await r.hget(sk.session, "holder")) == w.id
    done = await reg.feed_response(sid, "q-0", "A2", timeout=WAIT_S)
    assert isinstance(done, Finished) and done.result == {"first": "A1", "second": "A2"}


async def test_a_worker_cut_off_mid_step_is_taken_over_and_its_late_commit_fenced_out(
    fake_cluster: FakeCluster, gates: dict[str, Gate],
) -> None:
    """Worker A's pub/sub connection stops hearing its process channel while A is in the
    middle of a step: to the others A is gone, so B takes the step over at once and finishes
    it; A's commit, when A gets there, is refused by the fence and changes nothing."""
    reg = fake_cluster.registry()
    gate = gates["cut"] = Gate()
    a = await fake_cluster.worker(claim_idle_ms=60_000, lease_ms=60_000)
    sid = await reg.submit("tfr-gated-start", {"tag": "cut"})
    await asyncio.wait_for(gate.entered.wait(), WAIT_S)  # A is mid-step, lock A held
    sk = reg.keys.session(sid)
    assert text(await reg.client.get(sk.lock)).endswith(f"|{a.id}")
    b = await fake_cluster.worker(claim_idle_ms=60_000, lease_ms=60_000)

    started = time.monotonic()
    await a.mux.drop(a.keys.process_channel(a.id))  # cut off (but running on)
    event = await reg.wait_event(sid, timeout=WAIT_S)
    elapsed = time.monotonic() - started
    assert event == Paused((LlmQuery(id="q-0", prompt="cut question"),)), event
    assert elapsed < RECOVERY_BOUND_S, f"taken over after {elapsed:.2f} s"
    assert b.stats.rescued == 1 and text(await reg.client.hget(sk.session, "holder")) == b.id

    gate.open.set()  # A's step goes on and commits with its old fence
    await assert_eventually(lambda: a.stats.fenced_rejections == 1, timeout=WAIT_S,
                            message=f"A's late commit was not fenced out: {a.stats}")
    assert await reg.wait_event(sid, timeout=WAIT_S) == event  # unchanged
    done = await reg.feed_response(sid, "q-0", "yes", timeout=WAIT_S)
    assert isinstance(done, Finished) and done.result == {"answer": "yes"}
    assert done.metrics["auto"]["rounds"] == 1 and await reg.client.llen(sk.journal) == 1


# -- 3. real worker processes, default settings -------------------------------------------------

SESSIONS, ROUNDS, WIDTH = 20, 5, 3
THINK_S = (0.010, 0.040)  # the host's (simulated LLM's) time per round
KILL_AFTER_ROUNDS = (SESSIONS * ROUNDS * 2) // 5  # 40 % of all rounds


@pytest.fixture
def pool(redis_url: str, namespace: str, tmp_path: Path) -> Iterator[WorkerPool]:
    """Worker processes with the default settings (no ``ALC_*`` at all: lease 10 s, claim
    idle time 5 s); all killed at teardown."""
    workers = WorkerPool(redis_url, namespace, tmp_path, env={})
    try:
        yield workers
    finally:
        workers.close()


@pytest.fixture
async def host(redis_url: str, namespace: str) -> AsyncIterator[SessionRegistry]:
    reg = SessionRegistry.from_url(redis_url, namespace=namespace)  # default settings too
    try:
        yield reg
    finally:
        await reg.aclose()


def spread(samples: list[float]) -> str:
    if not samples:
        return "none"
    return (f"n={len(samples)} p50={statistics.median(samples) * 1000:.0f} ms "
            f"max={max(samples) * 1000:.0f} ms")


@dataclass
class KillRun:
    """Drives SESSIONS sessions of ``mp-rounds`` from one host, and kills the worker that
    holds most unfinished sessions once KILL_AFTER_ROUNDS rounds are done. The kill is
    SIGSTOP, a look at who held what (exact: the victim can do nothing more, and while it is
    still connected nobody takes its work), then SIGKILL; with ``freeze`` the victim stays
    stopped until at least three rounds have been handed to it first, so some steps are
    certainly in flight on it when it dies."""

    reg: SessionRegistry
    workers: dict[str, WorkerProc]
    keys: Keys
    rng: random.Random
    freeze: bool
    ctx: str
    rounds_done: int = 0
    sids: dict[int, str] = field(default_factory=dict)
    unfinished: set[str] = field(default_factory=set)
    #: Sessions whose next event the host awaits (waiting on a worker), since when.
    waiting: dict[str, float] = field(default_factory=dict)
    returned: dict[str, list[float]] = field(default_factory=dict)  # sid -> event times
    victim: WorkerProc | None = None
    killed_at: float = 0.0
    in_flight: set[str] = field(default_factory=set)  # awaited at the kill
    affected: set[str] = field(default_factory=set)  # ... and held by the victim
    kill_task: asyncio.Task[None] | None = None

    async def drive(self, n: int) -> Any:
        tag = f"s{n}"
        t0 = time.monotonic()
        sid = await self.reg.submit("mp-rounds", {"tag": tag, "rounds": ROUNDS, "width": WIDTH})
        self.sids[n] = sid
        self.unfinished.add(sid)
        self.waiting[sid] = t0
        ev = await self.reg.wait_event(sid, timeout=WAIT_S)
        self.settled(sid)
        while isinstance(ev, Paused):
            await asyncio.sleep(self.rng.uniform(*THINK_S))  # the host thinking, not a wait
            *first, last = ev.queries
            for q in first:
                await self.reg.feed_response(sid, q.id, answer_for(q.prompt), timeout=WAIT_S)
            self.waiting[sid] = time.monotonic()
            ev = await self.reg.feed_response(sid, last.id, answer_for(last.prompt),
                                              timeout=WAIT_S)
            self.settled(sid)
            self.rounds_done += 1
            if self.rounds_done == KILL_AFTER_ROUNDS:
                self.kill_task = asyncio.create_task(self.kill())
        self.unfinished.discard(sid)
        return ev

    def settled(self, sid: str) -> None:
        self.waiting.pop(sid, None)
        self.returned.setdefault(sid, []).append(time.monotonic())

    async def kill(self) -> None:
        holders: dict[str, int] = dict.fromkeys(self.workers, 0)
        live = sorted(self.unfinished)
        for holder in await self._hget_each(live, "holder"):
            if holder is not None and text(holder) in holders:
                holders[text(holder)] += 1
        victim_id = max(holders, key=lambda w: holders[w])
        self.victim = victim = self.workers[victim_id]
        victim.signal(signal.SIGSTOP)
        if self.freeze:
            async def handed_to_victim() -> bool:
                return len(await self._held_by(victim_id)) >= min(3, holders[victim_id])

            await assert_eventually(handed_to_victim, timeout=WAIT_S, interval=0.005,
                                    message=f"no rounds handed to the frozen victim {self.ctx}")
        held = await self._held_by(victim_id)
        self.in_flight = set(self.waiting)
        self.killed_at = time.monotonic()
        victim.signal(signal.SIGKILL)
        assert await asyncio.wait_for(victim.wait_exit(), WAIT_S) == -signal.SIGKILL
        # and those handed to it while it was stopped (it was still connected): looked at
        # once more, before the survivor's first look is likely to have taken them over
        self.affected = held | (await self._held_by(victim_id) & self.in_flight)

    async def _hget_each(self, sids: list[str], name: str) -> list[Any]:
        pipe = self.reg.client.pipeline(transaction=False)
        for sid in sids:
            pipe.hget(self.keys.session(sid).session, name)
        return list(await pipe.execute())

    async def _held_by(self, worker_id: str) -> set[str]:
        return await steps_held_by(self.reg.client, self.keys, sorted(self.waiting), worker_id)

    def recovery(self, sids: set[str]) -> list[float]:
        """Kill -> the first event after it, of each of ``sids``."""
        return [min(t for t in self.returned[sid] if t > self.killed_at) - self.killed_at
                for sid in sorted(sids)]

    async def check_session(self, n: int, ev: Any) -> None:
        sid, tag = self.sids[n], f"s{n}"
        assert isinstance(ev, Finished) and ev.state is Phase.COMPLETED, (sid, ev, self.ctx)
        assert ev.result == {"tag": tag,
                             "rounds": expected_rounds(tag, ROUNDS, WIDTH, answer_for)}, (
            sid, ev.result, self.ctx)
        # each round applied exactly once
        auto = ev.metrics["auto"]
        assert (auto["rounds"], auto["pauses"], auto["llm_calls"]) == (
            ROUNDS, ROUNDS, ROUNDS * WIDTH), (sid, ev.metrics, self.ctx)
        assert await self.reg.client.llen(self.keys.session(sid).journal) == ROUNDS


@pytest.mark.redis
@pytest.mark.slow
@pytest.mark.parametrize("freeze", [False, True], ids=["kill", "freeze-then-kill"])
async def test_sigkill_mid_run_the_dead_workers_sessions_resume_within_a_second(
    freeze: bool, pool: WorkerPool, host: SessionRegistry, namespace: str,
) -> None:
    seed = random.randrange(2**32)
    ctx = f"(seed {seed}, namespace {namespace})"
    first, second = await pool.start(concurrency=4), await pool.start(concurrency=4)
    run = KillRun(host, {first.worker_id: first, second.worker_id: second}, Keys(namespace),
                  random.Random(seed), freeze, ctx)
    started = time.monotonic()
    try:
        events = await asyncio.gather(*(run.drive(n) for n in range(SESSIONS)))
        assert run.kill_task is not None
        await run.kill_task
    except BaseException as exc:
        raise AssertionError(f"driving the sessions failed {ctx}: {exc!r}\n{pool.logs()}") \
            from exc
    elapsed = time.monotonic() - started
    assert run.victim is not None and not run.victim.alive
    survivor = next(w for w in pool.procs if w is not run.victim)
    assert survivor.alive, survivor.log_tail()
    for n, ev in enumerate(events):
        await run.check_session(n, ev)

    affected = run.recovery(run.affected)
    in_flight = run.recovery(run.in_flight)
    print(f"\nrecovery after SIGKILL ({'frozen first' if freeze else 'mid-run'}): "
          f"affected sessions {spread(affected)}; every session in flight at the kill "
          f"{spread(in_flight)}; whole run {elapsed:.2f} s {ctx}")
    if freeze:
        assert affected, f"no step was in flight on the victim {ctx}"
    assert max(in_flight, default=0.0) < RECOVERY_BOUND_S, (
        f"sessions in flight at the kill waited {spread(in_flight)} (affected: "
        f"{spread(affected)}) {ctx}\n{pool.logs()}")
    # the whole run: seconds, not the lease of the steps the kill cut short
    assert elapsed < DEFAULTS.lease_ms / 1000, f"the run took {elapsed:.1f} s {ctx}"

    async def no_pending_jobs() -> bool:
        return int((await host.client.xpending(run.keys.jobs, JOB_GROUP))["pending"]) == 0

    await assert_eventually(no_pending_jobs, timeout=10, message=f"jobs left pending {ctx}")
    if affected:
        assert "is gone" in survivor.log_text() or "taken over" in survivor.log_text(), \
            survivor.log_tail()


async def held_step(pool: WorkerPool, redis_url: str, tag: str) -> WorkerProc:
    """The worker process holding ``tag``'s step (``mp-hold``: it pushed its pid, and now
    blocks mid-step, lock A held)."""
    sync = redis.Redis.from_url(redis_url, socket_timeout=WAIT_S + 5)
    try:
        entered = await asyncio.to_thread(sync.blpop, [hold_keys(tag)["entered"]], WAIT_S)
    finally:
        sync.close()
    assert entered is not None, f"no worker entered the held step\n{pool.logs()}"
    return pool.by_pid(int(entered[1]))


@pytest.mark.redis
@pytest.mark.slow
@pytest.mark.parametrize("how", ["stream", "handoff"])
async def test_worker_killed_in_the_middle_of_a_step_is_taken_over_within_a_second(
    how: str, pool: WorkerPool, host: SessionRegistry, redis_url: str, namespace: str,
) -> None:
    """``stream``: the step came from the stream (its holder was gone already, so nobody was
    handed the round), and lock A carries the stepping worker's own token. ``handoff``: the
    feed handed the round to the live holder, taking lock A in its name. Either way the
    worker is SIGKILLed mid-step, lock A held, and another takes over at once."""
    keys = Keys(namespace)
    a, b = await pool.start(concurrency=2), await pool.start(concurrency=2)
    tag = f"{namespace}-{how}"
    sid, first = await host.start_execution("mp-hold", {"tag": tag, "url": redis_url},
                                            timeout=WAIT_S)
    assert first == Paused((LlmQuery(id="q-0", prompt=f"{tag} first"),)), first
    sk = keys.session(sid)
    if how == "stream":
        holder = {w.worker_id: w for w in (a, b)}[
            text(await host.client.hget(sk.session, "holder"))]
        await holder.kill()  # idle: nothing in flight; the round will go to the stream
        await pool.start(concurrency=2)
    feed = asyncio.create_task(host.feed_response(sid, "q-0", "A1", timeout=WAIT_S))
    victim = await held_step(pool, redis_url, tag)
    lock = await host.client.get(sk.lock)
    if how == "stream":
        assert lock is not None and text(lock).endswith(f"|{victim.worker_id}"), lock
    else:
        assert lock == await host.client.hget(sk.session, "ready_token"), lock
    assert not feed.done()
    killed_at = time.monotonic()
    assert await victim.kill() == -signal.SIGKILL

    event = await asyncio.wait_for(feed, WAIT_S)
    recovered = time.monotonic() - killed_at
    print(f"\nkilled mid-step ({how}): next event {recovered * 1000:.0f} ms after the kill")
    assert event == Paused((LlmQuery(id="q-0", prompt=f"{tag} second after A1"),)), event
    assert recovered < RECOVERY_BOUND_S, f"{recovered:.2f} s\n{pool.logs()}"
    taker_id = text(await host.client.hget(sk.session, "holder"))
    taker = next(w for w in pool.alive() if w.worker_id == taker_id)
    assert "taken over" in taker.log_text(), taker.log_tail()
    done = await host.feed_response(sid, "q-0", "A2", timeout=WAIT_S)
    assert isinstance(done, Finished) and done.result == {"tag": tag, "first": "A1",
                                                          "second": "A2"}
    assert done.metrics["auto"]["rounds"] == 2 and await host.client.llen(sk.journal) == 2


@pytest.mark.redis
@pytest.mark.slow
async def test_a_frozen_holder_keeps_its_lease_which_is_waited_out(
    pool: WorkerPool, host: SessionRegistry, namespace: str,
) -> None:
    """The backstop, with the default settings: a SIGSTOPped worker's connection stays open,
    so it is not taken for gone; the round handed to it waits out the lease (10 s), then
    another worker claims it and finishes the session, and the thawed holder's late step is
    fenced out."""
    keys = Keys(namespace)
    workers = [await pool.start(concurrency=2), await pool.start(concurrency=2)]
    tag = f"{namespace}-frozen"
    sid, first = await host.start_execution("mp-rounds", {"tag": tag, "rounds": 2, "width": 1},
                                            timeout=WAIT_S)
    assert isinstance(first, Paused)
    sk = keys.session(sid)
    holder_id = text(await host.client.hget(sk.session, "holder"))
    frozen = next(w for w in workers if w.worker_id == holder_id)
    taker = next(w for w in workers if w is not frozen)
    frozen.signal(signal.SIGSTOP)
    try:
        started = time.monotonic()
        taken = await host.feed_response(sid, "q-0", answer_for(prompt_for(tag, 0, 0)),
                                         timeout=WAIT_S)
        waited = time.monotonic() - started
        assert taken == Paused((LlmQuery(id="q-0", prompt=prompt_for(tag, 1, 0)),)), taken
        assert text(await host.client.hget(sk.session, "holder")) == taker.worker_id
    finally:
        frozen.signal(signal.SIGCONT)
    lease_s = DEFAULTS.lease_ms / 1000
    print(f"\nfrozen holder: taken over after {waited:.2f} s (lease {lease_s:g} s)")
    assert lease_s * 0.9 <= waited < lease_s + DEFAULTS.claim_idle_ms / 1000 + 5, waited
    await assert_eventually(lambda: f"stale write rejected for session {sid}" in
                            frozen.log_text(), timeout=WAIT_S,
                            message=f"the thawed holder was not fenced out\n{pool.logs()}")
    done = await host.feed_response(sid, "q-0", answer_for(prompt_for(tag, 1, 0)),
                                    timeout=WAIT_S)
    assert isinstance(done, Finished) and done.result == {
        "tag": tag, "rounds": expected_rounds(tag, 2, 1, answer_for)}
    assert frozen.alive and "Traceback" not in frozen.log_text(), frozen.log_tail()
