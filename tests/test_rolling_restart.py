"""Graceful shutdown: SIGTERM lets a worker finish its in-flight steps, and a rolling restart
of every worker harms no session."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator
from typing import Any

import pytest

from coordinator import Finished, Paused, SessionRegistry, Settings
from coordinator.transport import Transport
from tests.helpers import assert_eventually
from tests.procs import FAST_SETTINGS, WAIT_S, WorkerPool, answer_for
from tests.strategies_mp import expected_rounds

pytestmark = [pytest.mark.redis, pytest.mark.slow]


@pytest.fixture
async def registry(redis_url: str, namespace: str) -> AsyncIterator[SessionRegistry]:
    reg = SessionRegistry(Transport.from_url(redis_url),
                          settings=Settings(namespace=namespace, **FAST_SETTINGS))
    yield reg
    await reg.aclose()


async def drive(reg: SessionRegistry, sid: str, first: Any, progress: list[int]) -> Finished:
    res = first
    while isinstance(res, Paused):
        for q in res.queries:
            res = await reg.feed_response(sid, q.id, answer_for(q.prompt), timeout=WAIT_S)
        progress.append(1)
    assert isinstance(res, Finished), res
    return res


async def test_sigterm_finishes_the_step_in_flight(
    worker_pool: WorkerPool, registry: SessionRegistry
) -> None:
    worker = await worker_pool.start(concurrency=2)
    sid, first = await registry.start_execution("mp-slow", {"tag": "t", "delay": 1.0},
                                                timeout=WAIT_S)
    assert isinstance(first, Paused)
    await registry.feed_response(sid, "q-0", "a")
    # The last answer starts a step that sleeps 1 s; SIGTERM arrives while it runs.
    feeding = asyncio.create_task(registry.feed_response(sid, "q-1", "b", timeout=WAIT_S))

    async def running() -> bool:
        return (await registry.status(sid))["phase"] == "running"

    await assert_eventually(running, timeout=WAIT_S, message="the step never started")
    worker.signal(signal.SIGTERM)
    nxt = await feeding
    assert isinstance(nxt, Paused) and nxt.queries[0].prompt == "t second"
    assert await asyncio.wait_for(worker.wait_exit(), WAIT_S) == 0
    assert "stopped" in worker.log_text()
    # The worker is gone; a new one picks the session up (by replay) and finishes it.
    await worker_pool.start(concurrency=2)
    done = await registry.feed_response(sid, nxt.queries[0].id, "c", timeout=WAIT_S)
    assert isinstance(done, Finished)
    assert done.result == {"tag": "t", "first": ["a", "b"], "second": "c"}


async def test_rolling_restart_of_every_worker_harms_no_session(
    worker_pool: WorkerPool, registry: SessionRegistry
) -> None:
    old = [await worker_pool.start(concurrency=4) for _ in range(2)]
    sessions, rounds, width = 12, 6, 2
    progress: list[int] = []
    starts = [await registry.start_execution("mp-rounds", {"tag": f"r{n}", "rounds": rounds,
                                                           "width": width}, timeout=WAIT_S)
              for n in range(sessions)]
    drivers = [asyncio.create_task(drive(registry, sid, first, progress))
               for sid, first in starts]
    total = sessions * rounds
    for n, worker in enumerate(old, start=1):
        # Restart one worker each time another share of the rounds is done, mid-run.
        while len(progress) < total * n // (len(old) + 1):
            await asyncio.wait(drivers, timeout=0.05)
        await worker_pool.start(concurrency=4)
        worker.signal(signal.SIGTERM)
        assert await asyncio.wait_for(worker.wait_exit(), WAIT_S) == 0, worker.log_tail()
    results = await asyncio.wait_for(asyncio.gather(*drivers), WAIT_S * 2)
    for n, done in enumerate(results):
        assert done.state.value == "completed", (done, worker_pool.logs())
        assert done.result == {"tag": f"r{n}", "rounds": expected_rounds(
            f"r{n}", rounds, width, answer_for)}
        assert done.metrics["auto"]["rounds"] == rounds
    assert all(not w.alive for w in old)
