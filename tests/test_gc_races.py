"""GC races (issue 3, item 7): a sweep running while feeds and steps are in flight never reaps
an active session; an expired one is reaped exactly once (one sweeper of several), and a
caller waiting on it gets a clear ``Finished(failed)`` naming the expiry.

Two clocks:

- an **injected clock** (``gc_sweep(now_ms=...)``): sessions idle since before ``L`` are due
  at ``L + ttl``; anything that happened after ``L`` (a feed, a commit) keeps a session alive.
  Contested sessions are due when a sweep reads the deadlines and fed concurrently with it:
  each must end up either reaped (and then no feed of it was ever accepted) or completed
  with its exact result, never both.
- the **server clock** (``gc_sweep()``): short ttls, several registries sweeping in a loop
  while a worker's own GC loop sweeps too (lock C makes one of them reap each session).

In-process registries and workers, on fakeredis and (for the server-clock race) also on a
real redis-server. Slow steps are gates the test opens; nothing sleeps to synchronise.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import pytest

from coordinator.codec import text
from coordinator.errors import InvalidTransition
from coordinator.models import Accepted, Finished, LlmQuery, Paused
from coordinator.registry import SessionRegistry
from coordinator.states import Phase
from tests.conftest import FakeCluster
from tests.helpers import GATES, Gate, assert_eventually
from tests.procs import answer_for
from workers import strategy
from workers.context import Context

EXPIRED = "session expired: it was idle for longer than its ttl"
TTL_S = 60.0
TTL_MS = int(TTL_S * 1000)






async def pass_gate(ctx: Context, key: str) -> None:
    if not ctx.replaying and key in GATES:
        GATES[key].entered.set()
        await GATES[key].open.wait()


def prompt(tag: str, r: int, i: int) -> str:
    return f"gc {tag}: round {r}, item {i}"


def expected_result(tag: str, rounds: int, width: int) -> dict[str, Any]:
    return {"tag": tag, "rounds": [[answer_for(prompt(tag, r, i)) for i in range(width)]
                                   for r in range(rounds)]}


@strategy("tgc-rounds")
async def tgc_rounds(ctx: Context, tag: str = "", rounds: int = 2, width: int = 2,
                     **_: Any) -> dict[str, Any]:
    """``rounds`` rounds of ``width`` queries; the step starting round ``r`` waits at the gate
    ``{tag}/{r}`` when the test made one (``{tag}/0`` is the start step)."""
    collected = []
    for r in range(rounds):
        await pass_gate(ctx, f"{tag}/{r}")
        collected.append(list(await ctx.llm_batch([prompt(tag, r, i) for i in range(width)])))
    return {"tag": tag, "rounds": collected}


async def server_ms(client: Any) -> int:
    sec, usec = await client.time()
    return int(sec) * 1000 + int(usec) // 1000


async def lock_waiters(reg: SessionRegistry, sid: str) -> int:
    keys = reg.keys
    ((_, count),) = await reg.client.pubsub_shardnumsub(keys.lock_released(keys.session(sid).lock))
    return int(count)


async def drive(reg: SessionRegistry, sid: str, rng: random.Random,
                jitter: int = 0) -> tuple[Any, int]:
    """Answer every round of a ``tgc-rounds`` session (in a random order); returns the final
    event and how many feeds were accepted. A feed refused because the session was expired
    ends the drive with that session's final event. ``jitter``: yield to the event loop up to
    that many times first, so drives start at random points of the concurrent sweeps."""
    for _ in range(rng.randrange(jitter + 1)):
        await asyncio.sleep(0)
    accepted = 0
    event = await reg.wait_event(sid)
    while isinstance(event, Paused):
        queries = list(event.queries)
        rng.shuffle(queries)
        for q in queries:
            try:
                event = await reg.feed_response(sid, q.id, answer_for(q.prompt))
            except InvalidTransition as exc:
                assert exc.state == "failed", exc
                return await reg.wait_event(sid), accepted
            accepted += 1
    return event, accepted


@dataclass
class Sweepers:
    """Registries that sweep with one injected clock, in a loop, until stopped."""

    regs: list[SessionRegistry]
    now_ms: int | None
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    reaped: list[str] = field(default_factory=list)
    sweeps: int = 0

    async def loop(self, reg: SessionRegistry) -> None:
        while not self.stop.is_set():
            self.reaped += await reg.gc_sweep(now_ms=self.now_ms)
            self.sweeps += 1
            await asyncio.sleep(0)  # let the feeds and steps interleave with the sweeps

    async def __aenter__(self) -> Sweepers:
        self._tasks = [asyncio.create_task(self.loop(r)) for r in self.regs]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.stop.set()
        await asyncio.gather(*self._tasks)


# -- 1. injected clock: sweeps racing feeds and steps -------------------------------------------


def check_contested(sids: list[str], results: list[tuple[Any, int]], reaped: Counter[str],
                    ctx: str) -> Counter[str]:
    """Each contested session was either reaped (and none of its feeds was accepted) or
    completed with its exact result, never both."""
    outcomes: Counter[str] = Counter()
    for i, (sid, (event, accepted)) in enumerate(zip(sids, results, strict=True)):
        assert isinstance(event, Finished), event
        if reaped[sid]:
            outcomes["reaped"] += 1
            assert accepted == 0, f"cont{i} reaped after {accepted} accepted feed(s) {ctx}"
            assert (event.state, event.error) == (Phase.FAILED, EXPIRED), (event, ctx)
        else:
            outcomes["completed"] += 1
            assert event.state is Phase.COMPLETED, (f"cont{i}", event, ctx)
            assert event.result == expected_result(f"cont{i}", 2, 2), ctx
            auto = event.metrics["auto"]
            assert (auto["rounds"], auto["llm_calls"]) == (2, 4), ctx
    return outcomes


async def test_injected_clock_sweeps_racing_feeds_and_steps_never_reap_an_active_session(
    fake_cluster: FakeCluster, gates: dict[str, Gate]
) -> None:
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    hosts = [fake_cluster.registry() for _ in range(2)]
    for _ in range(2):
        await fake_cluster.worker(concurrency=8)
    host = hosts[0]

    async def paused(tag: str) -> str:
        sid, event = await host.start_execution(
            "tgc-rounds", {"tag": tag, "rounds": 2, "width": 2}, ttl=TTL_S)
        assert isinstance(event, Paused), event
        return sid

    # Before L: idle sessions (never fed again), contested ones (fed while sweeps run), and
    # one whose start step is in flight (lock A held) through the sweeps.
    idle, contested = [], []
    for i in range(16):  # interleaved, so their deadlines are too
        if i % 2:
            idle.append(await paused(f"idle{i // 2}"))
        else:
            contested.append(await paused(f"cont{i // 2}"))
    GATES["step/0"] = step_gate = Gate()
    in_step = await host.submit("tgc-rounds", {"tag": "step", "rounds": 2, "width": 2},
                                ttl=TTL_S)
    await asyncio.wait_for(step_gate.entered.wait(), 5)
    before = [*idle, *contested, in_step]
    last = max([(await host.status(sid))["last_activity_at"] for sid in before])

    async def clock_moved_on() -> bool:
        return await server_ms(host.client) > last

    await assert_eventually(clock_moved_on, timeout=5)
    now_ms = last + TTL_MS  # everything above is due at this clock; all that follows is not
    for sid in [*idle, *contested]:
        assert await host.client.zscore(host.keys.deadlines, sid) <= now_ms
    # Mid-step, a worker owes it the step: not idle, so not in the deadline index at all.
    assert await host.client.zscore(host.keys.deadlines, in_step) is None

    # After L: active sessions, started and driven while the sweeps run.
    sweepers = Sweepers([fake_cluster.registry(lock_wait_s=0.2) for _ in range(3)], now_ms)

    async def start_and_drive(n: int) -> tuple[str, Any]:
        sid, _ = await hosts[n % 2].start_execution(
            "tgc-rounds", {"tag": f"act{n}", "rounds": 3, "width": 3}, ttl=TTL_S)
        event, _accepted = await drive(hosts[(n + 1) % 2], sid, rng)
        return sid, event

    async def release_the_step() -> tuple[Any, int]:
        # Open the gate only once sweeps past its ttl have run while the step ran; none even
        # tried it (no sweep waits for its lock A).
        await assert_eventually(lambda: sweepers.sweeps >= 3, timeout=10,
                                message="no sweep ran while the step was in flight")
        assert await lock_waiters(host, in_step) == 0, "a sweep tried a session mid-step"
        step_gate.open.set()
        return await drive(hosts[1], in_step, rng)

    async with sweepers:
        results = await asyncio.gather(
            asyncio.gather(*(start_and_drive(n) for n in range(8))),
            asyncio.gather(*(drive(hosts[i % 2], sid, rng, jitter=300)
                             for i, sid in enumerate(contested))),
            release_the_step(),
        )
        # Keep sweeping a little after the last feed, then stop.
        target = sweepers.sweeps + 3
        await assert_eventually(lambda: sweepers.sweeps >= target, timeout=10)
    active, contested_results, (step_event, _) = results

    counts = Counter(sweepers.reaped)
    ctx = f"(seed {seed}, {sweepers.sweeps} sweeps, reaped {dict(counts)})"
    assert all(n == 1 for n in counts.values()), f"a session was reaped twice {ctx}"
    for n, (sid, event) in enumerate(active):
        assert sid not in counts, f"active session act{n} reaped {ctx}"
        assert isinstance(event, Finished) and event.state is Phase.COMPLETED, (event, ctx)
        assert event.result == expected_result(f"act{n}", 3, 3), ctx
        assert event.metrics["auto"]["rounds"] == 3 and event.metrics["auto"]["llm_calls"] == 9, ctx
    assert in_step not in counts, f"the session mid-step was reaped {ctx}"
    assert isinstance(step_event, Finished) and step_event.state is Phase.COMPLETED, step_event
    assert step_event.result == expected_result("step", 2, 2)
    for sid in idle:
        assert counts[sid] == 1, f"idle {sid} not reaped exactly once {ctx}"
        event = await host.wait_event(sid)
        assert isinstance(event, Finished) and (event.state, event.error) == (
            Phase.FAILED, EXPIRED), event
    outcomes = check_contested(contested, contested_results, counts, ctx)
    print(f"\ngc race (injected clock): contested {dict(outcomes)} {ctx}")
    assert await host.client.xlen(host.keys.jobs) == 0
    assert await host.client.zcard(host.keys.deadlines) == 0
    assert await host.list_snapshots() == {}


# -- 2. the race made deterministic: activity lands after the sweep read the deadlines ----------


@pytest.mark.parametrize("landing", ["feed", "step"])
async def test_activity_after_the_sweep_read_its_deadline_keeps_the_session(
    fake_cluster: FakeCluster, gates: dict[str, Gate], landing: str
) -> None:
    host = fake_cluster.registry()
    worker = await fake_cluster.worker()
    sweeper = fake_cluster.registry(lock_wait_s=0.2)
    sid, first = await host.start_execution(
        "tgc-rounds", {"tag": "det", "rounds": 2, "width": 2}, ttl=TTL_S)
    assert isinstance(first, Paused)
    last = (await host.status(sid))["last_activity_at"]

    async def clock_moved_on() -> bool:
        return await server_ms(host.client) > last

    await assert_eventually(clock_moved_on, timeout=5)
    GATES["det/1"] = gate = Gate()
    feeding: list[asyncio.Task[Any]] = []
    execute = sweeper.redis.execute

    async def racing_read(*args: Any, **kwargs: Any) -> Any:
        due = await execute(*args, **kwargs)
        if args[0] != "ZRANGEBYSCORE":  # not the sweep reading the deadlines
            return due
        if sid.encode() in due and not feeding:
            # The sweep has read the session as due; now the host acts, before the expiry.
            assert await host.feed_response(sid, "q-0", answer_for(prompt("det", 0, 0))) == (
                Accepted(1))
            if landing == "step":  # the last answer: a worker starts the next step, gated
                feeding.append(asyncio.create_task(
                    host.feed_response(sid, "q-1", answer_for(prompt("det", 0, 1)))))
                await asyncio.wait_for(gate.entered.wait(), 5)
            else:
                feeding.append(asyncio.create_task(asyncio.sleep(0)))
        return due

    sweeper.redis.execute = racing_read  # type: ignore[method-assign]
    assert await sweeper.gc_sweep(now_ms=last + TTL_MS) == [], "an active session was reaped"
    assert feeding, "the sweep never read the session as due"
    status = await host.status(sid)
    assert status["phase"] == ("running" if landing == "step" else "paused"), status
    gate.open.set()
    if landing == "step":
        event = await feeding[0]
    else:
        event = await host.feed_response(sid, "q-1", answer_for(prompt("det", 0, 1)))
    assert event == Paused(tuple(LlmQuery(id=f"q-{i}", prompt=prompt("det", 1, i))
                                 for i in range(2))), event
    # Swept again at that clock: still alive (its deadline moved with the activity).
    assert await sweeper.gc_sweep(now_ms=last + TTL_MS) == []
    for i in range(2):
        event = await host.feed_response(sid, f"q-{i}", answer_for(prompt("det", 1, i)))
    assert isinstance(event, Finished) and event.result == expected_result("det", 2, 2), event
    assert worker.stats.dead_letters == 0 and worker.stats.fenced_rejections == 0


# -- 3. server clock: several sweepers, one reaps; waiters get a clear result -----------------


async def test_expired_sessions_are_reaped_once_among_concurrent_sweepers_and_waiters_told(
    any_cluster: Any, gates: dict[str, Gate]
) -> None:
    cluster = any_cluster
    host = cluster.registry()
    # The worker sweeps too (every 50 ms); one slot, so while a step is in flight the start
    # jobs queued behind it stay unread. They wait for a worker, not for their host: not idle,
    # however long past their ttl, while the paused sessions nobody answers are.
    worker = await cluster.worker(concurrency=1, gc_interval_s=0.05, lock_wait_s=0.2)
    # ttls (s): long enough for a loaded box to take the first steps before they run out
    first_step_ttl, queued_ttl = 1.0, 0.3

    paused = []
    for i in range(3):
        sid, event = await host.start_execution(
            "tgc-rounds", {"tag": f"p{i}", "rounds": 1, "width": 1}, ttl=first_step_ttl)
        assert isinstance(event, Paused)
        paused.append(sid)
    GATES["busy/0"] = gate = Gate()
    busy = await host.submit("tgc-rounds", {"tag": "busy", "rounds": 1, "width": 1},
                             ttl=first_step_ttl)
    await asyncio.wait_for(gate.entered.wait(), 5)
    queued = [await host.submit("tgc-rounds", {"tag": f"q{i}", "rounds": 1, "width": 1},
                                ttl=queued_ttl) for i in range(5)]
    # Past this server time, every session above has been around longer than its ttl.
    overdue_at = await server_ms(host.client) + int(first_step_ttl * 1000)
    waiters = [cluster.registry() for _ in range(2)]
    waits = [asyncio.create_task(w.wait_event(sid)) for w in waiters for sid in queued]
    busy_wait = asyncio.create_task(waiters[0].wait_event(busy))
    expiring = set(paused)

    sweeper_regs = [cluster.registry(lock_wait_s=0.2) for _ in range(4)]
    async with Sweepers(sweeper_regs, now_ms=None) as sweepers:

        def all_reaped() -> bool:
            return len(sweepers.reaped) + worker.sweeper.reaped_total >= len(expiring)

        await assert_eventually(all_reaped, timeout=15, interval=0.05,
                                message="the expired sessions were not all reaped")

        async def all_overdue() -> bool:
            return await server_ms(host.client) > overdue_at

        await assert_eventually(all_overdue, timeout=15, interval=0.05)
        target = sweepers.sweeps + 4
        await assert_eventually(lambda: sweepers.sweeps >= target, timeout=15)
        # The busy and queued sessions' ttls ran out, but a worker owes them a step: kept.
        for sid in (busy, *queued):
            assert (await host.status(sid))["phase"] == "running", sid
    counts = Counter(sweepers.reaped)
    ctx = (f"(registry sweeps {sweepers.sweeps}, registries reaped {dict(counts)}, the "
           f"worker's GC reaped {worker.sweeper.reaped_total})")
    assert len(sweepers.reaped) + worker.sweeper.reaped_total == len(expiring), ctx
    assert set(counts) <= expiring and all(n == 1 for n in counts.values()), ctx
    for sid in expiring:
        status = await host.status(sid)
        assert (status["phase"], status["error"]) == ("failed", EXPIRED), (sid, status, ctx)

    # Every caller who asks after an expiry gets a clear, final answer, from any registry.
    for w in waiters:
        for sid in expiring:
            event = await w.wait_event(sid)
            assert isinstance(event, Finished) and event.state is Phase.FAILED, event
            assert event.error == EXPIRED
            assert "expired" in event.to_json("s")["error"]
    assert not busy_wait.done() and not any(t.done() for t in waits)

    # The step in flight was never cut short: its commit lands (its pause reaches its waiter),
    # and the queued sessions then run to their first pause, which reaches theirs.
    gate.open.set()
    assert await asyncio.wait_for(busy_wait, 10) == Paused(
        (LlmQuery(id="q-0", prompt=prompt("busy", 0, 0)),))
    events = await asyncio.wait_for(asyncio.gather(*waits), 10)
    assert events == [Paused((LlmQuery(id="q-0", prompt=prompt(f"q{i}", 0, 0)),))
                      for _ in waiters for i in range(len(queued))]
    for sid in (busy, *queued):
        with contextlib.suppress(InvalidTransition):  # now idle: its ttl may run out again
            await host.cancel(sid)
    assert worker.stats.dead_letters == 0
    assert await host.client.xlen(host.keys.jobs) == 0
    assert [text(x) for x in await host.client.zrange(host.keys.deadlines, 0, -1)] == []


# -- 4. one corrupt session among the due ones -------------------------------------------------


async def test_a_corrupt_due_session_neither_breaks_the_sweep_nor_escapes_it(
    fake_cluster: FakeCluster,
) -> None:
    """A due session whose plain ``fence`` field is corrupt (so taking its lock A fails
    half-way) must not make the sweep raise and skip the other due sessions; it must be
    ended clearly itself, and its lock A not left held."""
    host = fake_cluster.registry()
    await fake_cluster.worker()
    sweeper = fake_cluster.registry(lock_wait_s=0.2)
    sids = []
    for i in range(3):
        sid, event = await host.start_execution(
            "tgc-rounds", {"tag": f"c{i}", "rounds": 1, "width": 1}, ttl=TTL_S)
        assert isinstance(event, Paused)
        sids.append(sid)
    bad = host.keys.session(sids[1])
    await host.client.hset(bad.session, "fence", "not-a-number")
    far = await server_ms(host.client) + 10 * TTL_MS
    try:
        reaped = await sweeper.gc_sweep(now_ms=far)
    except Exception as exc:
        raise AssertionError(
            f"one corrupt session made the whole sweep fail ({exc!r}); the due sessions "
            f"after it were not expired: "
            f"{[(await host.client.hget(host.keys.session(s).session, 'phase')) for s in sids]}"
            f"; its lock A is left held (pttl {await host.client.pttl(bad.lock)} ms)"
        ) from exc
    assert {sids[0], sids[2]} <= set(reaped), reaped
    for sid in (sids[0], sids[2]):
        assert (await host.status(sid))["phase"] == "failed"
    assert await host.client.hget(bad.session, "phase") == b"failed", (
        "the corrupt session escaped the sweep")
    assert await host.client.pttl(bad.lock) == -2, "lock A left held"
    assert await sweeper.gc_sweep(now_ms=far) == []
