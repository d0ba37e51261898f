"""Fault injection on workers (issue 3, "Nothing lost"): items 1, 2 and 4 of the issue.

1. Worker death, repeatedly: 4 worker processes, 3 host processes, a SIGKILL every 2 s.
2. A worker stalled (SIGSTOP) mid-step past its lease: taken over, its late write fenced out.
4. Redelivery (a slow worker's job claimed by another applies once) and poison jobs (a step
   that kills its worker every time, that raises in the step machinery every time, or that
   fails before it can even count an attempt, is dead-lettered after ``max_attempts``; an
   unknown job kind is dead-lettered at once).

The multi-process tests use a real redis-server and real ``coordinator worker`` processes
(``tests/procs.py``); the others run in-process on fakeredis. Nothing sleeps to synchronise:
waits are on events, on Redis (BLPOP, a pidfd), or ``assert_eventually`` where polling is
unavoidable (a log line, a pending-entries count).

Sizes: ``ALC_FULL_FAULTS=1`` runs the worker-death test at the issue's full size (200
sessions x 10 rounds) instead of the CI default (30 x 5). ``ALC_FAULTS_SEED`` fixes the seed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis

from coordinator.codec import unpack
from coordinator.errors import CorruptState, WaitTimeout
from coordinator.keys import JOB_GROUP, Keys
from coordinator.models import Finished, LlmQuery, Paused
from coordinator.registry import SessionRegistry
from coordinator.states import Phase
from tests.conftest import FakeCluster
from tests.helpers import GATES, Gate, assert_eventually
from tests.procs import (
    FAST_ENV,
    FAST_SETTINGS,
    WAIT_S,
    HostProc,
    WorkerPool,
    WorkerProc,
    answer_for,
    new_namespace,
    owner_of,
    pending_by_consumer,
    run_cli,
    spawn_host,
)
from tests.strategies_mp import (
    batch_sizes,
    expected_batches,
    expected_rounds,
    hold_keys,
    prompt_for,
)
from workers import strategy
from workers.context import Context
from workers.runtime import Ask
from workers.worker import Worker

FULL = os.environ.get("ALC_FULL_FAULTS") == "1"

# -- fixtures -------------------------------------------------------------------------------


@pytest.fixture
def namespace() -> str:
    return new_namespace()


@pytest.fixture
def make_pool(
    redis_url: str, namespace: str, tmp_path: Path
) -> Iterator[Callable[..., WorkerPool]]:
    """``make_pool(**ALC_env)``: a worker pool with FAST_ENV plus overrides; every process of
    every pool is killed at teardown."""
    pools: list[WorkerPool] = []

    def make(**env: str) -> WorkerPool:
        pool = WorkerPool(redis_url, namespace, tmp_path, env={**FAST_ENV, **env})
        pools.append(pool)
        return pool

    try:
        yield make
    finally:
        for pool in pools:
            pool.close()


@pytest.fixture
async def reg(redis_url: str, namespace: str) -> AsyncIterator[SessionRegistry]:
    async with SessionRegistry.from_url(redis_url, namespace=namespace,
                                        **FAST_SETTINGS) as registry:
        yield registry


async def drive_rounds(reg: SessionRegistry, tag: str, rounds: int, width: int) -> str:
    """Run an ``mp-rounds`` session to its end, answering with ``answer_for``; checks the
    result and returns the session id."""
    sid, event = await reg.start_execution(
        "mp-rounds", {"tag": tag, "rounds": rounds, "width": width}, timeout=WAIT_S)
    while isinstance(event, Paused):
        for q in event.queries:
            event = await reg.feed_response(sid, q.id, answer_for(q.prompt), timeout=WAIT_S)
    assert isinstance(event, Finished) and event.state is Phase.COMPLETED, event
    assert event.result == {"tag": tag,
                            "rounds": expected_rounds(tag, rounds, width, answer_for)}
    return sid


async def journal_prompts(client: Any, keys: Keys, sid: str) -> list[list[tuple[str, str]]]:
    """Each applied round's (prompt, answer) pairs, from the session's journal."""
    raw = await client.lrange(keys.session(sid).journal, 0, -1)
    rounds = []
    for entry in raw:
        _digest, triples = unpack(entry)
        rounds.append([(t[1], t[2]) for t in triples])
    return rounds


# -- 1. worker death, repeatedly ------------------------------------------------------------

CHAOS_SESSIONS, CHAOS_ROUNDS = (200, 10) if FULL else (30, 5)
CHAOS_WORKERS = 4
CHAOS_HOSTS = 3
KILL_EVERY_S = 2.0
#: Simulated LLM latency per answer (host side): spreads the run over time so kills land
#: mid-run; it orders nothing.
THINK_S = (0.5, 3.0)
#: Bound on the whole run (hosts give up and report stuck sessions after it).
CHAOS_DEADLINE_S = 300.0 if FULL else 120.0


@dataclass
class Kill:
    at_s: float
    victim: str
    held_live: list[str]  # unfinished sessions whose last step the victim committed
    pending_jobs: int  # jobs delivered to the victim and not acknowledged


@dataclass
class Chaos:
    pool: WorkerPool
    client: Any  # async redis client
    keys: Keys
    sids: list[str]
    rng: random.Random
    started: float = field(default_factory=time.monotonic)
    kills: list[Kill] = field(default_factory=list)

    async def run(self, hosts: list[HostProc]) -> None:
        """SIGKILL a random worker every KILL_EVERY_S (and start a new one) until every host
        has exited."""
        done = asyncio.ensure_future(asyncio.gather(*(h.proc.wait() for h in hosts)))
        next_kill = self.started + KILL_EVERY_S
        try:
            while True:
                try:
                    await asyncio.wait_for(asyncio.shield(done),
                                           max(0.0, next_kill - time.monotonic()))
                    return
                except TimeoutError:
                    pass
                if time.monotonic() - self.started > CHAOS_DEADLINE_S + 30:
                    raise AssertionError("the hosts did not exit within their deadline")
                await self.kill_one()
                next_kill += KILL_EVERY_S
        finally:
            if not done.done():
                done.cancel()

    async def kill_one(self) -> None:
        victim = self.rng.choice(self.pool.alive())
        pel = await asyncio.to_thread(self._pending_of, victim.worker_id)
        rc = await victim.kill()
        assert rc == -signal.SIGKILL, rc
        held = await self.held_by(victim.worker_id)
        self.kills.append(Kill(round(time.monotonic() - self.started, 2), victim.worker_id,
                               held, pel))
        await self.pool.start(concurrency=4)

    def _pending_of(self, worker_id: str) -> int:
        client = redis.Redis.from_url(self.pool.url, socket_timeout=5.0)
        try:
            return pending_by_consumer(client, self.pool.namespace).get(worker_id, 0)
        finally:
            client.close()

    async def held_by(self, worker_id: str) -> list[str]:
        pipe = self.client.pipeline(transaction=False)
        for sid in self.sids:
            pipe.hmget(self.keys.session(sid).session, ["holder", "phase"])
        held = []
        for sid, (holder, phase) in zip(self.sids, await pipe.execute(), strict=True):
            if holder is not None and holder.decode() == worker_id and not Phase(
                    phase.decode()).terminal:
                held.append(sid)
        return held


@pytest.mark.redis
@pytest.mark.slow
async def test_worker_death_repeatedly_loses_nothing(
    redis_url: str, namespace: str, make_pool: Callable[..., WorkerPool],
    reg: SessionRegistry, tmp_path: Path,
) -> None:
    seed = int(os.environ.get("ALC_FAULTS_SEED") or random.randrange(2**32))
    ctx = f"(seed {seed}, namespace {namespace}, {CHAOS_SESSIONS}x{CHAOS_ROUNDS})"
    keys = Keys(namespace)
    pool = make_pool()
    for _ in range(CHAOS_WORKERS):
        await pool.start(concurrency=4)

    plans: dict[str, tuple[str, list[int]]] = {}
    for n in range(CHAOS_SESSIONS):
        tag, sizes = f"s{n}", batch_sizes(n, CHAOS_ROUNDS)
        sid = await reg.submit("mp-batches", {"tag": tag, "sizes": sizes})
        plans[sid] = (tag, sizes)
    sids = list(plans)
    sessions_file = tmp_path / "sessions.json"
    sessions_file.write_text(json.dumps(sids))

    chaos = Chaos(pool, reg.client, keys, sids, random.Random(seed))
    hosts: list[HostProc] = []
    try:
        for h in range(CHAOS_HOSTS):
            hosts.append(await spawn_host(
                tmp_path, h, "--redis", redis_url, "--namespace", namespace,
                "--sessions", str(sessions_file), "--hosts", str(CHAOS_HOSTS),
                "--seed", str(seed), "--think-min", str(THINK_S[0]),
                "--think-max", str(THINK_S[1]), "--deadline", str(CHAOS_DEADLINE_S)))
        await chaos.run(hosts)
    finally:
        for host in hosts:
            host.kill()
            await host.proc.wait()
    duration = time.monotonic() - chaos.started
    diagnostics = "\n".join(f"--- host {i} rc {h.proc.returncode}\n{h.log_tail()}"
                            for i, h in enumerate(hosts)) + "\n" + pool.logs()
    reports = [h.report() for h in hosts]
    for i, rep in enumerate(reports):
        assert not rep["errors"], f"host {i} failed {ctx}: {rep['errors']}\n{diagnostics}"
        assert hosts[i].proc.returncode == 0, f"host {i} rc {hosts[i].proc.returncode} {ctx}"

    # Every session finished with the right result; every round applied exactly once.
    for sid, (tag, sizes) in plans.items():
        event = await reg.wait_event(sid, timeout=WAIT_S)
        where = f"{sid} ({tag}, sizes {sizes}) {ctx}"
        assert isinstance(event, Finished), f"{where}: {event}"
        assert event.state is Phase.COMPLETED, f"{where}: {event.state} {event.error}"
        assert event.result == {"tag": tag,
                                "rounds": expected_batches(tag, sizes, answer_for)}, where
        assert event.metrics["auto"]["rounds"] == len(sizes), (where, event.metrics)
        assert event.metrics["auto"]["pauses"] == len(sizes), (where, event.metrics)
        assert event.metrics["auto"]["llm_calls"] == sum(sizes), (where, event.metrics)
        journal = await journal_prompts(reg.client, keys, sid)
        assert journal == [[(p, answer_for(p)) for p in
                            (prompt_for(tag, r, i) for i in range(size))]
                           for r, size in enumerate(sizes)], f"{where}: journal {journal}"
        # Each host fed exactly its share, once, and saw the same final event.
        for h, rep in enumerate(reports):
            owned = sum(owner_of(sid, prompt_for(tag, r, i), CHAOS_HOSTS) == h
                        for r, size in enumerate(sizes) for i in range(size))
            assert rep["sessions"][sid]["feeds"] == owned, (where, h, rep["sessions"][sid])
            assert rep["sessions"][sid]["final"] == event.to_json(sid), (where, h)
        assert sum(rep["sessions"][sid]["settled"] for rep in reports) == len(sizes), where

    # Sessions live on a killed worker were finished by others.
    orphaned = {sid: k.victim for k in chaos.kills for sid in k.held_live}
    for sid, victim in orphaned.items():
        holder = (await reg.client.hget(keys.session(sid).session, "holder") or b"").decode()
        assert holder != victim, f"{sid}: finished by its killed holder {victim}? {ctx}"

    # Nothing left behind: no dead letter, no pending or queued job.
    assert (await reg.dead_letters())[0] == 0, f"{await reg.dead_letters()} {ctx}"

    async def queue_drained() -> bool:
        info = await reg.client.xpending(keys.jobs, JOB_GROUP)
        return int(info["pending"]) == 0 and await reg.client.xlen(keys.jobs) == 0

    await assert_eventually(queue_drained, timeout=WAIT_S, message=f"jobs left {ctx}")

    summary = {
        "sessions": CHAOS_SESSIONS, "rounds": CHAOS_ROUNDS,
        "queries": sum(sum(s) for _, s in plans.values()),
        "kills": len(chaos.kills), "workers_started": len(pool.procs),
        "live_sessions_taken_over": len(orphaned),
        "live_takeovers": sum(len(k.held_live) for k in chaos.kills),
        "jobs_claimed_from_killed": sum(k.pending_jobs for k in chaos.kills),
        "consumers_left_in_group": len(await reg.client.xinfo_consumers(keys.jobs, JOB_GROUP)),
        "duration_s": round(duration, 1), "host_s": [r["elapsed_s"] for r in reports],
        "seed": seed,
    }
    print(f"\nworker-death faults: {json.dumps(summary)}")
    assert len(chaos.kills) >= 3, f"too few kills to mean anything: {summary}"
    assert orphaned or summary["jobs_claimed_from_killed"], f"no takeover happened: {summary}"


# -- 2. a worker stalled past its lease ------------------------------------------------------


@pytest.mark.redis
@pytest.mark.slow
async def test_worker_stalled_past_its_lease_is_fenced_out_and_carries_on(
    redis_url: str, namespace: str, make_pool: Callable[..., WorkerPool], reg: SessionRegistry,
) -> None:
    pool = make_pool()
    workers = [await pool.start(concurrency=2), await pool.start(concurrency=2)]
    keys = Keys(namespace)
    tag = f"{namespace}-stall"
    hold = hold_keys(tag)
    sync = redis.Redis.from_url(redis_url, socket_timeout=WAIT_S + 5)
    stale: WorkerProc | None = None
    try:
        sid, first = await reg.start_execution("mp-hold", {"tag": tag, "url": redis_url},
                                               timeout=WAIT_S)
        assert first == Paused((LlmQuery(id="q-0", prompt=f"{tag} first"),)), first
        sk = keys.session(sid)
        feeder = asyncio.create_task(reg.feed_response(sid, "q-0", "A1", timeout=WAIT_S * 2))
        entered = await asyncio.to_thread(sync.blpop, [hold["entered"]], WAIT_S)
        assert entered is not None, f"no worker entered the held step\n{pool.logs()}"
        stale = pool.by_pid(int(entered[1]))
        taker = next(w for w in workers if w is not stale)
        fence_held = int(await reg.client.hget(sk.session, "fence"))

        # Stall the worker in the middle of its step, lock A held, for longer than its lease.
        stale.signal(signal.SIGSTOP)
        stopped_at = time.monotonic()
        try:
            taken = await asyncio.wait_for(feeder, WAIT_S * 2)
            stalled_s = time.monotonic() - stopped_at
            expected = Paused((LlmQuery(id="q-0", prompt=f"{tag} second after A1"),))
            assert taken == expected, f"{taken}\n{pool.logs()}"
            holder = (await reg.client.hget(sk.session, "holder")).decode()
            assert holder == taker.worker_id, (holder, taker.worker_id, stale.worker_id)
            assert int(await reg.client.hget(sk.session, "fence")) > fence_held
            # The lease is renewed every third of its length, so it runs out between 2/3 of
            # a lease and a full lease after the stall began: not before.
            lease_s = int(FAST_ENV["ALC_LEASE_MS"]) / 1000
            assert stalled_s >= lease_s * 2 / 3 - 0.05, f"taken over after {stalled_s:.2f} s"
        finally:
            stale.signal(signal.SIGCONT)

        # Let the stale step go on: it commits with its old fencing token and is rejected.
        sync.rpush(hold["go"], "go")
        marker = f"stale write rejected for session {sid}"
        await assert_eventually(lambda: marker in stale.log_text(), timeout=WAIT_S,
                                message=f"no fenced rejection logged\n{pool.logs()}")
        assert stale.log_text().count("stale write rejected") == 1, stale.log_tail()
        assert "stale write rejected" not in taker.log_text(), taker.log_tail()
        assert f"fence {fence_held}" in stale.log_text(), stale.log_tail()

        # The stale write changed nothing; the session finishes right.
        assert await reg.wait_event(sid, timeout=WAIT_S) == taken
        done = await reg.feed_response(sid, "q-0", "A2", timeout=WAIT_S)
        assert isinstance(done, Finished) and done.state is Phase.COMPLETED, done
        assert done.result == {"tag": tag, "first": "A1", "second": "A2"}
        auto = done.metrics["auto"]
        assert (auto["rounds"], auto["llm_calls"]) == (2, 2), done.metrics
        assert await reg.client.llen(sk.journal) == 2

        # The formerly stale worker carries on: with the taker gone, it serves a new session.
        assert stale.alive, stale.log_tail()
        await taker.kill()
        sid2 = await drive_rounds(reg, f"{tag}-after", rounds=2, width=2)
        holder2 = (await reg.client.hget(keys.session(sid2).session, "holder")).decode()
        assert holder2 == stale.worker_id
        assert stale.alive and "Traceback" not in stale.log_text(), stale.log_tail()
    finally:
        if stale is not None:
            stale.signal(signal.SIGCONT)
        sync.close()


@pytest.mark.redis
@pytest.mark.slow
async def test_step_handed_to_a_frozen_holder_is_taken_over_and_its_late_step_fenced_out(
    redis_url: str, namespace: str, make_pool: Callable[..., WorkerPool], reg: SessionRegistry,
) -> None:
    """The last answer of a round hands the step (lock A and the answers) to the live holder
    whenever its connection hears the nudge, which a frozen (SIGSTOPped) process's still
    does. Nobody else may step it while that handed lease lives; once it runs out, another
    worker claims the round's job and finishes the session right; the holder, thawed, runs
    the handed step from memory and its commit is refused by the fence."""
    pool = make_pool()
    workers = [await pool.start(concurrency=2), await pool.start(concurrency=2)]
    keys = Keys(namespace)
    tag = f"{namespace}-frozen"
    sid, first = await reg.start_execution("mp-rounds", {"tag": tag, "rounds": 2, "width": 1},
                                           timeout=WAIT_S)
    assert isinstance(first, Paused)
    sk = keys.session(sid)
    holder_id = (await reg.client.hget(sk.session, "holder")).decode()
    frozen = next(w for w in workers if w.worker_id == holder_id)
    taker = next(w for w in workers if w is not frozen)
    fence_before = int(await reg.client.hget(sk.session, "fence"))
    frozen.signal(signal.SIGSTOP)
    try:
        feeder = asyncio.create_task(reg.feed_response(
            sid, "q-0", answer_for(prompt_for(tag, 0, 0)), timeout=WAIT_S))
        # handed over: the lock is the feed's, in the frozen holder's name, one fence on
        await assert_eventually(lambda: reg.client.exists(sk.lock), timeout=WAIT_S,
                                message="the feed did not take lock A for the holder")
        assert int(await reg.client.hget(sk.session, "fence")) > fence_before
        taken = await asyncio.wait_for(feeder, WAIT_S)
        assert taken == Paused((LlmQuery(id="q-0", prompt=prompt_for(tag, 1, 0)),)), (
            f"{taken}\n{pool.logs()}")
        assert (await reg.client.hget(sk.session, "holder")).decode() == taker.worker_id
        assert int(await reg.client.hget(sk.session, "fence")) >= fence_before + 2
    finally:
        frozen.signal(signal.SIGCONT)
    marker = f"stale write rejected for session {sid}"
    await assert_eventually(lambda: marker in frozen.log_text(), timeout=WAIT_S,
                            message=f"the thawed holder's handed step was not fenced out\n"
                                    f"{pool.logs()}")
    done = await reg.feed_response(sid, "q-0", answer_for(prompt_for(tag, 1, 0)),
                                   timeout=WAIT_S)
    assert isinstance(done, Finished) and done.state is Phase.COMPLETED, done
    assert done.result == {"tag": tag, "rounds": [[answer_for(prompt_for(tag, 0, 0))],
                                                   [answer_for(prompt_for(tag, 1, 0))]]}
    assert done.metrics["auto"]["rounds"] == 2 and await reg.client.llen(sk.journal) == 2
    assert frozen.alive and "Traceback" not in frozen.log_text(), frozen.log_tail()


# -- 4a. redelivery after a slow worker (in-process, fakeredis) --------------------------------






@strategy("tfw-gated")
async def tfw_gated(ctx: Context, tag: str = "", **_: Any) -> dict[str, str]:
    """Two questions; the live step after the first answer waits at the test's gate."""
    first = await ctx.llm(f"{tag} first")
    if not ctx.replaying:
        GATES[tag].entered.set()
        await GATES[tag].open.wait()
    second = await ctx.llm(f"{tag} second after {first}")
    return {"first": first, "second": second}


@strategy("tfw-ask")
async def tfw_ask(ctx: Context, tag: str = "", **_: Any) -> dict[str, str]:
    return {"answer": await ctx.llm(f"{tag} question")}


async def lock_waiters(client: Any, keys: Keys, sid: str) -> int:
    """How many processes wait for lock A of ``sid`` (subscribers of its release channel)."""
    ((_, count),) = await client.pubsub_shardnumsub(keys.lock_released(keys.session(sid).lock))
    return int(count)


async def test_job_redelivered_after_a_slow_worker_applies_once(
    fake_cluster: FakeCluster, gates: dict[str, Gate]
) -> None:
    reg = fake_cluster.registry()
    # The slow worker's own claim loop is kept out of the way: re-claiming the job it is
    # stepping would reset the job's idle time each time, before the other could claim it.
    slow = await fake_cluster.worker(claim_idle_ms=60_000, lock_wait_s=10.0)
    sid, first = await reg.start_execution("tfw-gated", {"tag": "rd"})
    assert isinstance(first, Paused)
    other = await fake_cluster.worker(claim_idle_ms=100, lock_wait_s=10.0)
    GATES["rd"] = gate = Gate()
    feeder = asyncio.create_task(reg.feed_response(sid, "q-0", "A1"))
    await asyncio.wait_for(gate.entered.wait(), 5)  # the live step runs on `slow`, slowly

    # Its job stays unacknowledged past claim_idle_ms: the other worker claims it (a
    # redelivery) and waits for lock A, which the slow worker keeps renewing.
    async def claimed_and_waiting() -> bool:
        return other.stats.claimed >= 1 and await lock_waiters(reg.client, reg.keys, sid) >= 1

    await assert_eventually(claimed_and_waiting, timeout=10,
                            message="the other worker never claimed the slow worker's job")
    entry = await reg.client.hget(reg.keys.session(sid).session, "job")
    pending = await reg.client.xpending_range(reg.keys.jobs, JOB_GROUP, "-", "+", 10)
    assert [p["message_id"] for p in pending] == [entry]
    assert pending[0]["times_delivered"] >= 2

    gate.open.set()
    second = await asyncio.wait_for(feeder, 10)
    assert second == Paused((LlmQuery(id="q-0", prompt="rd second after A1"),))
    # The claimed copy found its round applied already and was dropped, not re-applied.
    await assert_eventually(lambda: other.stats.stale_skips >= 1, timeout=10,
                            message="the redelivered job was not recognised as applied")
    assert other.stats.steps == 0 and other.stats.replays == 0, other.stats
    assert slow.stats.fenced_rejections == 0 and other.stats.fenced_rejections == 0
    assert await reg.client.xlen(reg.keys.jobs) == 0

    done = await reg.feed_response(sid, "q-0", "A2")
    assert isinstance(done, Finished) and done.state is Phase.COMPLETED, done
    assert done.result == {"first": "A1", "second": "A2"}
    auto = done.metrics["auto"]
    assert (auto["rounds"], auto["pauses"], auto["llm_calls"]) == (2, 2, 2), done.metrics
    assert await journal_prompts(reg.client, reg.keys, sid) == [
        [("rd first", "A1")], [("rd second after A1", "A2")]]


# -- 4b. poison: a step that raises in the step machinery every time (in-process) --------------


@strategy("tfw-poison")
async def tfw_poison(ctx: Context, **_: Any) -> str:
    return await ctx.llm("poison: this step's commit always fails")


async def test_step_failing_in_the_machinery_every_time_is_dead_lettered(
    fake_cluster: FakeCluster,
) -> None:
    reg = fake_cluster.registry()
    w: Worker = await fake_cluster.worker(claim_idle_ms=50, max_attempts=3)
    commit = w._commit

    async def failing_commit(sid: str, lock: Any, **kw: Any) -> bool:
        outcome = kw["outcome"]
        if isinstance(outcome, Ask) and outcome.queries[0].prompt.startswith("poison"):
            raise RuntimeError("injected: the commit of this step always fails")
        return await commit(sid, lock, **kw)

    w._commit = failing_commit  # type: ignore[method-assign]
    sid = await reg.submit("tfw-poison", {})
    event = await reg.wait_event(sid, timeout=20)
    assert isinstance(event, Finished) and event.state is Phase.FAILED, event
    assert event.error is not None
    assert "failed 3 times in a row (max_attempts 3)" in event.error, event.error
    assert "RuntimeError: injected: the commit of this step always fails" in event.error
    assert (w.stats.step_errors, w.stats.dead_letters) == (3, 1), w.stats
    total, letters = await reg.dead_letters()
    assert total == 1 and letters[0]["sid"] == sid, letters
    assert letters[0]["reason"] == "failed 3 times in a row", letters
    assert letters[0]["error"] == event.error
    assert await reg.client.xlen(reg.keys.jobs) == 0

    # The worker keeps serving, and nothing about the dead session is retried.
    ok, first = await reg.start_execution("tfw-ask", {"tag": "ok"})
    assert first == Paused((LlmQuery(id="q-0", prompt="ok question"),))
    done = await reg.feed_response(ok, "q-0", "fine")
    assert isinstance(done, Finished) and done.result == {"answer": "fine"}
    claims = w.stats.claimed
    assert await w.claim_once() == 0
    assert (w.stats.step_errors, w.stats.dead_letters, w.stats.claimed) == (3, 1, claims)


async def test_step_failing_before_it_can_count_an_attempt_is_still_dead_lettered(
    fake_cluster: FakeCluster,
) -> None:
    """Attempts are counted by lock A's fencing token. A step that fails every time before
    that token moves (here the session's plain ``fence`` field is corrupt, so taking lock A
    fails half-way) must still end within a bounded number of tries: the session failed
    clearly and dead-lettered, lock A not left behind, no retry every lease period forever."""
    reg = fake_cluster.registry()
    w: Worker = await fake_cluster.worker(claim_idle_ms=50, lease_ms=300, lock_wait_s=1.0,
                                          max_attempts=3)
    sid, first = await reg.start_execution("tfw-ask", {"tag": "cf"})
    assert isinstance(first, Paused)
    sk = reg.keys.session(sid)
    await reg.client.hset(sk.session, "fence", "not-a-number")
    # The feed itself is recorded; reading the corrupt session back may fail by name.
    with contextlib.suppress(CorruptState, WaitTimeout):
        await reg.feed_response(sid, "q-0", "an answer", timeout=0.1)

    async def ended() -> bool:
        return await reg.client.hget(sk.session, "phase") == b"failed"

    try:
        await assert_eventually(ended, timeout=10, interval=0.05)
    except AssertionError as exc:
        raise AssertionError(
            f"the session is still {(await reg.client.hget(sk.session, 'phase'))!r} after "
            f"10 s: its job was tried {w.stats.step_errors} times "
            f"(max_attempts {w.settings.max_attempts}), last error "
            f"{(await reg.client.hget(sk.session, 'last_error'))!r}; lock A left held "
            f"(pttl {await reg.client.pttl(sk.lock)} ms) by a failed acquisition; dead "
            f"letters {(await reg.dead_letters())[0]}: it is retried once per lease, forever"
        ) from exc
    error = (await reg.client.hget(sk.session, "error") or b"").decode()
    assert "corrupt" in error or "times in a row" in error, error
    _, letters = await reg.dead_letters()
    assert [x["sid"] for x in letters] == [sid], letters
    assert w.stats.step_errors <= w.settings.max_attempts, w.stats
    assert await reg.client.pttl(sk.lock) == -2, "lock A left held"


# -- 4c. poison: a step that kills its worker process every time (real processes) ---------------


async def supervise(pool: WorkerPool, stop: asyncio.Event, concurrency: int) -> None:
    """Keep the pool's live workers at their number: start a new one when one exits."""
    while not stop.is_set():
        exits = {asyncio.ensure_future(w.wait_exit()) for w in pool.alive()}
        stopper = asyncio.ensure_future(stop.wait())
        done, rest = await asyncio.wait({*exits, stopper}, return_when=asyncio.FIRST_COMPLETED)
        for task in rest:
            task.cancel()
        await asyncio.gather(*rest, return_exceptions=True)
        if stop.is_set():
            return
        for _ in done - {stopper}:
            await pool.start(concurrency=concurrency)


@pytest.mark.redis
@pytest.mark.slow
async def test_poison_job_killing_its_worker_is_dead_lettered_and_shown_by_status(
    redis_url: str, namespace: str, make_pool: Callable[..., WorkerPool], reg: SessionRegistry,
) -> None:
    max_attempts = 2
    pool = make_pool(ALC_MAX_ATTEMPTS=str(max_attempts))
    await pool.start(concurrency=2)
    await pool.start(concurrency=2)
    keys = Keys(namespace)
    stop = asyncio.Event()
    supervisor = asyncio.create_task(supervise(pool, stop, concurrency=2))
    try:
        sid, first = await reg.start_execution("mp-crash", {"tag": "poison"}, timeout=WAIT_S)
        assert first == Paused((LlmQuery(id="q-0", prompt="poison go?"),)), first
        started = time.monotonic()
        event = await reg.feed_response(sid, "q-0", "go", timeout=WAIT_S * 2)
        took = time.monotonic() - started
        assert isinstance(event, Finished) and event.state is Phase.FAILED, (
            f"{event}\n{pool.logs()}")
        assert event.error == (
            f"job failed {max_attempts} times in a row (max_attempts {max_attempts}); "
            "last error: the worker died mid-step"), event.error
        crashed = [w for w in pool.procs if w.proc.poll() == 1]
        assert len(crashed) == max_attempts, pool.logs()
        total, letters = await reg.dead_letters()
        assert total == 1 and letters[0]["sid"] == sid, letters
        assert letters[0]["reason"] == f"failed {max_attempts} times in a row"

        # A queue entry naming an unknown job kind (here: for a live, healthy session) is
        # dead-lettered at once, and the pool keeps serving, that session included.
        healthy, paused = await reg.start_execution(
            "mp-rounds", {"tag": "healthy", "rounds": 2, "width": 2}, timeout=WAIT_S)
        assert isinstance(paused, Paused)
        bogus = (await reg.client.xadd(keys.jobs, {"k": "bogus", "sid": healthy})).decode()

        async def bogus_dead_lettered() -> bool:
            return (await reg.dead_letters())[0] == 2

        await assert_eventually(bogus_dead_lettered, timeout=WAIT_S,
                                message=f"the bogus job was not dead-lettered\n{pool.logs()}")
        _, letters = await reg.dead_letters()
        assert letters[0] == {**letters[0], "sid": healthy, "job": bogus,
                              "reason": "unknown job kind 'bogus'"}, letters
        event = paused
        while isinstance(event, Paused):
            for q in event.queries:
                event = await reg.feed_response(healthy, q.id, answer_for(q.prompt),
                                                timeout=WAIT_S)
        assert isinstance(event, Finished) and event.state is Phase.COMPLETED, event
        assert event.result == {"tag": "healthy",
                                "rounds": expected_rounds("healthy", 2, 2, answer_for)}
        assert await drive_rounds(reg, "after", rounds=1, width=3)

        # Nothing loops: no further crash, no job left to retry.
        async def drained() -> bool:
            info = await reg.client.xpending(keys.jobs, JOB_GROUP)
            return int(info["pending"]) == 0 and await reg.client.xlen(keys.jobs) == 0

        await assert_eventually(drained, timeout=WAIT_S, message="jobs left in the stream")
        assert len([w for w in pool.procs if w.proc.poll() == 1]) == max_attempts

        out = await run_cli("status", "--redis", redis_url, "--namespace", namespace)
        assert out.code == 0, str(out)
        assert "dead letters: 2" in out.stdout, out.stdout
        assert f"{sid}  failed {max_attempts} times in a row" in out.stdout, out.stdout
        assert "the worker died mid-step" in out.stdout, out.stdout
        assert f"{healthy}  unknown job kind 'bogus'" in out.stdout, out.stdout
        print(f"\npoison: dead-lettered after {max_attempts} crashes in {took:.1f} s")
    finally:
        stop.set()
        await supervisor
