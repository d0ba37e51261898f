"""Isolation: strategy code cannot take a worker down (README, "Isolation model").

A strategy runs on its worker's event loop, so one that computes without awaiting, or blocks,
holds up everything else there. These tests show what the worker does about it:

1. in-process (no Redis): the watchdog interrupts a step that holds the loop past its limit,
   whatever the strategy does to stay (``except BaseException``, a blocking ``time.sleep``),
   and the time it held the loop does not count against a neighbour's step;
2. real ``coordinator worker`` processes under their supervising parent: a spinning strategy
   fails its own session with a ``step_timeout`` error while ordinary sessions, those held by
   the same worker included, finish exactly; every worker serves on, and stops on SIGTERM;
3. the same with steps the signal cannot stop (SIGUSR1 blocked; a C loop holding the GIL):
   the worker process is ended (by its own watchdog, or killed by its parent) and replaced,
   no process is left burning a core, and the session is dead-lettered after
   ``max_attempts``, while the sessions that were on the wedged workers finish: steps taken
   over from a dead worker run alone (``workers/quarantine.py``, tested in-process too).

No sleep stands in for synchronisation: the blocking strategy pushes its pid to Redis when it
starts blocking (the test BLPOPs it), processes are awaited by pidfd, and what cannot be
awaited (a process gone, a heartbeat) is polled by ``assert_eventually``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from coordinator.models import Finished, Paused
from coordinator.registry import SessionRegistry
from coordinator.states import Phase
from tests.helpers import assert_eventually
from tests.procs import FAST_SETTINGS, WAIT_S, WorkerPool, WorkerProc, answer_for
from tests.strategies_mp import block_keys, expected_rounds
from workers.context import Context
from workers.quarantine import Quarantine
from workers.runtime import Ask, Crash, Execution
from workers.watchdog import Watchdog

# -- 1. the watchdog, in-process ---------------------------------------------------------------

LIMIT_S = 0.3


@pytest.fixture
def watchdog() -> Iterator[Watchdog]:
    with Watchdog(LIMIT_S, "the test's limit") as dog:
        yield dog


async def spin_after_asking(ctx: Context) -> None:
    await ctx.llm("go?")
    while True:
        pass


async def test_a_step_holding_the_loop_is_cut_and_its_neighbour_is_spared(
    watchdog: Watchdog,
) -> None:
    waiting = asyncio.Event()

    async def neighbour(ctx: Context) -> str:
        waiting.set()
        await asyncio.sleep(0.05)  # what it waits on: a timer that comes due during the spin
        return await ctx.llm("after the timer")

    spinner = Execution(spin_after_asking, {})
    assert isinstance(await spinner.step(None, 30.0), Ask)
    # The neighbour's step has a timeout shorter than the spin: the spinner's time on the
    # loop is not the neighbour's, so its step still ends in its ask.
    calm = Execution(neighbour, {})
    calm_step = asyncio.create_task(calm.step(None, LIMIT_S * 0.8))
    await waiting.wait()
    started = time.monotonic()
    out = await spinner.step(["go"], 30.0)
    took = time.monotonic() - started
    assert isinstance(out, Crash), out
    assert out.error.startswith("step timeout: the strategy ran "), out.error
    assert f"at most {LIMIT_S:g} s at a time (the test's limit)" in out.error, out.error
    assert took < LIMIT_S + 2.0, f"the spin was cut after {took:.1f} s"
    calm_out = await calm_step
    assert isinstance(calm_out, Ask) and calm_out.queries[0].prompt == "after the timer", calm_out
    calm.close()


async def test_an_interrupt_cannot_be_swallowed_and_blocking_calls_are_cut_too(
    watchdog: Watchdog,
) -> None:
    async def swallower(ctx: Context) -> str:
        await ctx.llm("go?")
        try:
            while True:
                pass
        except BaseException:
            return "got away"

    async def sleeper(ctx: Context) -> str:
        await ctx.llm("go?")
        time.sleep(WAIT_S)  # noqa: ASYNC251 (the blocking call under test: the signal cuts it)
        return "woke up"

    for fn in (swallower, sleeper):
        ex = Execution(fn, {})
        assert isinstance(await ex.step(None, 30.0), Ask)
        started = time.monotonic()
        out = await ex.step(["go"], 30.0)
        took = time.monotonic() - started
        assert isinstance(out, Crash) and out.error.startswith("step timeout"), (fn, out)
        assert took < LIMIT_S + 2.0, f"{fn.__name__} was cut after {took:.1f} s"


async def test_a_step_past_its_deadline_is_cut_even_within_the_loop_limit(
    watchdog: Watchdog,
) -> None:
    """The step timeout holds for a strategy that waited most of its step and then holds
    the loop: the loop is not free to fire the timer, the watchdog does it."""

    async def late_spinner(ctx: Context) -> None:
        await asyncio.sleep(0.2)
        while True:
            pass

    out = await Execution(late_spinner, {}).step(None, 0.25)
    assert isinstance(out, Crash), out
    assert out.error.startswith("step timeout: the strategy neither asked nor returned within "
                                "0.25 s"), out.error


async def test_suspect_steps_run_alone_and_handed_steps_pass_by() -> None:
    """The gate behind "healthy sessions are not dead-lettered with a poisoned one"
    (``workers/quarantine.py``): a suspect waits for the steps in flight and runs with no
    other step from the stream, one suspect at a time, its wait for a busy lock included;
    steps handed over by a feed are never held back."""
    gate = Quarantine()
    inside: set[str] = set()
    seen: dict[str, set[str]] = {}  # who else was inside when each one came in
    release = {name: asyncio.Event() for name in ("o1", "s1", "s2", "o2", "h1", "o3")}
    entered = {name: asyncio.Event() for name in release}
    lock_free = asyncio.Event()

    async def step(name: str, suspect: bool = False, handed: bool = False) -> None:
        async with gate.step(suspect, handed=handed):
            seen[name] = set(inside)
            inside.add(name)
            entered[name].set()
            if name == "s1":  # its lock is busy: it waits aside for it
                inside.discard(name)
                async with gate.aside():
                    await lock_free.wait()
                seen["s1 again"] = set(inside)
                inside.add(name)
            await release[name].wait()
            inside.discard(name)

    tasks = [asyncio.create_task(step("o1"))]
    await entered["o1"].wait()
    tasks += [asyncio.create_task(step("s1", suspect=True)),
              asyncio.create_task(step("s2", suspect=True)),
              asyncio.create_task(step("o2")),
              asyncio.create_task(step("h1", handed=True))]
    await entered["h1"].wait()  # handed over: in at once, beside o1
    assert seen == {"o1": set(), "h1": {"o1"}}, seen
    release["o1"].set()
    await entered["s1"].wait()  # o1 done: the first suspect, with no stream step beside it
    await entered["o2"].wait()  # s1 waits for its lock aside: ordinary steps go on...
    tasks.append(asyncio.create_task(step("o3")))
    await entered["o3"].wait()
    assert not entered["s2"].is_set()  # ...but not the other suspect
    for name in ("o2", "o3"):
        release[name].set()
    lock_free.set()
    release["s1"].set()
    await entered["s2"].wait()
    release["s2"].set()
    release["h1"].set()
    await asyncio.gather(*tasks)
    assert seen["s1"] <= {"h1"} and seen["s1 again"] <= {"h1"}, seen
    assert seen["s2"] <= {"h1"}, seen


# -- real worker processes under their supervisors ----------------------------------------------


def children(pid: int) -> list[int]:
    """The processes ``pid`` started (Linux /proc): a supervisor's worker child."""
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


def exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def only_child(wp: WorkerProc) -> int:
    """The supervisor's one worker child (once it has exactly one)."""
    await assert_eventually(lambda: len(children(wp.pid)) == 1, timeout=WAIT_S,
                            message=f"supervisor {wp.pid} has not one child")
    (child,) = children(wp.pid)
    return child


@pytest.fixture
def supervised(worker_pool: WorkerPool) -> Iterator[WorkerPool]:
    """The worker pool, whose processes are supervisors: at teardown their children are
    killed first (a SIGKILLed parent's child would only stop at its next beat, and a wedged
    one never)."""
    try:
        yield worker_pool
    finally:
        for wp in worker_pool.procs:
            for child in children(wp.pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child, signal.SIGKILL)


#: The workers' settings (with FAST_ENV). A 4 s lease: a step may hold the loop for the step
#: timeout itself (2 s, not half the lease), as with the default settings; and a step that
#: wedges its worker has it ended (after 2 + 1 s) or killed (after 2 + 3 s) while it still
#: holds lock A, so what it held is taken over at once, all together, by a rescue.
ENV = {"ALC_SUPERVISE": "1", "ALC_STEP_TIMEOUT_S": "2", "ALC_LEASE_MS": "4000"}


@pytest.fixture
async def reg(redis_url: str, namespace: str) -> AsyncIterator[SessionRegistry]:
    # The same lease as the workers': a feed that hands a step to a worker sets its lease.
    async with SessionRegistry.from_url(redis_url, namespace=namespace,
                                        **{**FAST_SETTINGS, "lease_ms": 4000}) as registry:
        yield registry


ROUNDS, WIDTH = 3, 2


async def start_rounds(reg: SessionRegistry, tag: str) -> tuple[str, Paused]:
    sid, event = await reg.start_execution(
        "mp-rounds", {"tag": tag, "rounds": ROUNDS, "width": WIDTH}, timeout=WAIT_S)
    assert isinstance(event, Paused), event
    return sid, event


async def finish_rounds(reg: SessionRegistry, tag: str, sid: str, event: Any) -> None:
    """Answer each round to the end; the result must be exactly the answers, once each."""
    while isinstance(event, Paused):
        for q in event.queries:
            event = await reg.feed_response(sid, q.id, answer_for(q.prompt), timeout=WAIT_S)
    assert isinstance(event, Finished) and event.state is Phase.COMPLETED, (tag, event)
    assert event.result == {"tag": tag,
                            "rounds": expected_rounds(tag, ROUNDS, WIDTH, answer_for)}, event


async def holder(reg: SessionRegistry, sid: str) -> str:
    raw = await reg.client.hget(reg.keys.session(sid).session, "holder")
    return (raw or b"").decode()


async def paused_beside(
    reg: SessionRegistry, worker: str, n: int
) -> dict[str, tuple[str, Paused]]:
    """``n`` ordinary sessions paused at their first round, and more until two of them are
    held by ``worker`` (about to be frozen): their next rounds are handed to it."""
    ordinary: dict[str, tuple[str, Paused]] = {}
    while len(ordinary) < n or sum(
            [await holder(reg, s) == worker for s, _ in ordinary.values()]) < 2:
        assert len(ordinary) < 40, "the sessions all went to the other worker"
        tag = f"o{len(ordinary)}"
        ordinary[tag] = await start_rounds(reg, tag)
    return ordinary


async def blocked_pid(reg: SessionRegistry, tag: str) -> int:
    """The pid of the next process whose step starts blocking (it pushes it first)."""
    popped = await reg.client.blpop([block_keys(tag)["pids"]], timeout=WAIT_S)
    assert popped is not None, f"no step of {tag} started blocking within {WAIT_S:g} s"
    return int(popped[1])


async def stop(wp: WorkerProc) -> None:
    """SIGTERM the supervisor: it forwards it, its child drains and exits, and so does it."""
    child = await only_child(wp)
    wp.signal(signal.SIGTERM)
    assert await asyncio.wait_for(wp.wait_exit(), WAIT_S) == 0, wp.log_tail()
    assert not exists(child), f"supervisor {wp.pid} exited, its child {child} did not"


# -- 2. a spinning strategy fails alone ----------------------------------------------------------


@pytest.mark.redis
@pytest.mark.slow
async def test_a_spinning_strategy_fails_alone_and_every_worker_serves_on(
    redis_url: str, supervised: WorkerPool, reg: SessionRegistry,
) -> None:
    workers = [await supervised.start(concurrency=4, **ENV) for _ in range(2)]
    kids = {wp.pid: await only_child(wp) for wp in workers}
    ids = {wp.worker_id: wp for wp in workers}

    sid, first = await reg.start_execution("mp-block", {"tag": "spin", "url": redis_url},
                                           timeout=WAIT_S)
    assert isinstance(first, Paused), first
    spinner_worker = await holder(reg, sid)
    ordinary = await paused_beside(reg, spinner_worker, 10)

    started = time.monotonic()
    spinning = asyncio.create_task(reg.feed_response(sid, "q-0", "go", timeout=WAIT_S))
    spinner_pid = await blocked_pid(reg, "spin")
    assert spinner_pid == kids[ids[spinner_worker].pid], (spinner_pid, kids)
    await asyncio.gather(*(finish_rounds(reg, tag, s, ev) for tag, (s, ev) in ordinary.items()))
    event = await spinning
    took = time.monotonic() - started

    assert isinstance(event, Finished) and event.state is Phase.FAILED, event
    assert event.error is not None and event.error.startswith(
        "step timeout: the strategy ran "), event.error
    assert "at most 2 s at a time (the step timeout)" in event.error, event.error
    assert took < 2 + 4, f"the spinning session failed after {took:.1f} s"
    # It spun once, on its own worker: nobody took the step over and spun it again; nothing
    # was restarted (the same children, alive); the interrupt was the watchdog's.
    assert await reg.client.llen(block_keys("spin")["pids"]) == 0, "the spin spread"
    assert {wp.pid: await only_child(wp) for wp in workers} == kids
    assert "interrupting it" in ids[spinner_worker].log_text()
    assert "starting a new one" not in supervised.logs()

    # Each worker serves on. The other one stops on SIGTERM (forwarded to its child), so the
    # next session can only be served by the worker that was frozen.
    other = next(wp for wid, wp in ids.items() if wid != spinner_worker)
    await stop(other)
    sid2, ev2 = await start_rounds(reg, "after")
    await finish_rounds(reg, "after", sid2, ev2)
    assert await holder(reg, sid2) == spinner_worker
    await stop(ids[spinner_worker])


# -- 3. steps the signal cannot stop ---------------------------------------------------------------


@pytest.mark.redis
@pytest.mark.slow
async def test_a_step_wedging_its_worker_is_dead_lettered_and_the_workers_replaced(
    redis_url: str, supervised: WorkerPool, reg: SessionRegistry,
) -> None:
    max_attempts = 2
    env = {**ENV, "ALC_MAX_ATTEMPTS": str(max_attempts)}
    workers = [await supervised.start(concurrency=4, **env) for _ in range(2)]
    first_kids = {await only_child(wp) for wp in workers}
    # Attempt 1 blocks SIGUSR1 then spins (its watchdog ends the process); attempt 2 runs a C
    # loop holding the GIL (the watchdog cannot run: the supervisor kills the child).
    await reg.client.rpush(block_keys("wedge")["modes"], "masked", "gil")
    sid, first = await reg.start_execution("mp-block", {"tag": "wedge", "url": redis_url},
                                           timeout=WAIT_S)
    assert isinstance(first, Paused), first
    ordinary = await paused_beside(reg, await holder(reg, sid), 6)

    wedged = asyncio.create_task(reg.feed_response(sid, "q-0", "go", timeout=2 * WAIT_S))
    pids = [await blocked_pid(reg, "wedge")]
    # Rounds handed to the wedged worker cost their sessions an attempt when it goes; taken
    # over with the wedging step, they run after it, alone (quarantine.py), not beside it.
    await asyncio.gather(*(finish_rounds(reg, tag, s, ev) for tag, (s, ev) in ordinary.items()))
    pids.append(await blocked_pid(reg, "wedge"))
    event = await wedged

    assert isinstance(event, Finished) and event.state is Phase.FAILED, (event, supervised.logs())
    assert event.error == (
        f"job failed {max_attempts} times in a row (max_attempts {max_attempts}); "
        "last error: the worker died mid-step"), event.error
    total, letters = await reg.dead_letters()
    assert total == 1 and letters[0]["sid"] == sid, letters
    assert pids[0] in first_kids and len(set(pids)) == 2, (pids, first_kids)

    # No process is left holding a core: both blocked children are gone (reaped by their
    # supervisors), and each supervisor runs a new child that serves.
    await assert_eventually(lambda: not any(exists(p) for p in pids), timeout=WAIT_S,
                            message=f"a wedged child is still there: {pids}")
    for wp in workers:
        assert wp.alive, wp.log_tail()
        assert await only_child(wp) not in pids
    logs = supervised.logs()
    assert "ending this worker process (exit 70)" in logs, logs
    assert "its event loop has been silent for" in logs, logs
    assert logs.count("starting a new one") >= 2, logs

    async def two_live_workers() -> bool:
        return len(await reg.worker_stats()) == 2

    await assert_eventually(two_live_workers, timeout=WAIT_S,
                            message="the replaced workers did not come back")
    for n in range(2):
        sid2, ev2 = await start_rounds(reg, f"after{n}")
        await finish_rounds(reg, f"after{n}", sid2, ev2)
    assert await reg.client.llen(block_keys("wedge")["pids"]) == 0, "a third attempt ran"
    for wp in workers:
        await stop(wp)
