"""The coordinator under the benchmark's workload: step latency and throughput."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from coordinator import Finished, Paused, SessionRegistry

from .stats import Latency, now

K = 10


@dataclass(frozen=True, slots=True)
class LatencyRun:
    step: Latency
    start: Latency


async def step_latency(reg: SessionRegistry, sessions: int, *, strategy: str = "bench-seq",
                       width: int = 1) -> LatencyRun:
    """One session at a time: feed -> next question, and start -> first question."""
    steps: list[float] = []
    starts: list[float] = []
    for n in range(sessions + 2):
        t0 = now()
        sid, res = await reg.start_execution(strategy, {"k": K, "width": width})
        if n >= 2:
            starts.append(now() - t0)
        while isinstance(res, Paused):
            ids = [q.id for q in res.queries]
            for qid in ids[:-1]:
                await reg.feed_response(sid, qid, "ok")
            t0 = now()
            res = await reg.feed_response(sid, ids[-1], "ok")
            if n >= 2:  # the first sessions warm connections, scripts and subscriptions
                steps.append(now() - t0)
        assert isinstance(res, Finished) and res.state.value == "completed", res
    return LatencyRun(Latency.of(steps), Latency.of(starts))


async def throughput(reg: SessionRegistry, inflight: int, seconds: float, *,
                     strategy: str = "bench-seq", width: int = 1) -> float:
    """Completed steps per second with ``inflight`` sessions driven at once by this host."""
    done = 0
    counting = False
    stop = asyncio.Event()

    async def one() -> None:
        nonlocal done
        while not stop.is_set():
            sid, res = await reg.start_execution(strategy, {"k": K, "width": width})
            while isinstance(res, Paused):
                for q in res.queries:
                    nxt = await reg.feed_response(sid, q.id, "ok")
                res = nxt
                if counting:
                    done += 1

    tasks = [asyncio.create_task(one()) for _ in range(inflight)]
    await asyncio.sleep(min(2.0, seconds / 3))  # warm-up, not measured
    counting, start = True, now()
    await asyncio.sleep(seconds)
    counting = False
    elapsed = now() - start
    stop.set()
    await asyncio.wait_for(asyncio.gather(*tasks), 60)
    return done / elapsed
