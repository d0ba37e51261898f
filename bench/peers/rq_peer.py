"""RQ: a job per step on SimpleWorker processes (no fork per job).

Host: the session's start and each answer is one ``Queue.enqueue`` of :func:`step`; the host
then blocks on ``job.latest_result(timeout=...)``, RQ's own result wait (an ``XREAD BLOCK`` on
the job's result stream: push, not polling, so no faster reply path is needed). RQ's client is
synchronous, so the host runs each in-flight session in a thread of its own (50 threads for
50 sessions), all in one host process. Worker: ``rq``'s ``SimpleWorker`` on one queue, logging
at WARNING (no per-job log line).
"""

from __future__ import annotations

import asyncio
import sys
from concurrent.futures import ThreadPoolExecutor

from ..stats import now
from . import (
    PeerConfig,
    PeerResult,
    Record,
    main,
    measure_latency,
    measure_throughput,
    queue_worker_args,
    run_prefix,
    versions,
    worker_pool,
)

MODULE = "bench.peers.rq_peer"
STEP = f"{MODULE}.step"
RESULT_TIMEOUT_S = 10
RESULT_TTL_S = 60


def step(i: int, k: int, answer: str | None) -> str:
    """The strategy step, run by the worker: answer ``i - 1`` in, question ``i`` (or the end) out.

    The session's state travels in the job's arguments: the least work a worker can do."""
    return f"question {i}" if i < k else "done"


def _session(queue: object, prefix: str, sid: str, k: int, record: Record) -> None:
    from rq import Queue

    assert isinstance(queue, Queue)
    job = queue.enqueue(STEP, 0, k, None, job_id=f"{prefix}-{sid}-0", result_ttl=RESULT_TTL_S)
    res = job.latest_result(timeout=RESULT_TIMEOUT_S)
    if res is None or res.return_value != "question 0":
        raise RuntimeError(f"rq: no first question for {sid}: {res!r}")
    for i in range(1, k + 1):
        t0 = now()
        job = queue.enqueue(STEP, i, k, "ok", job_id=f"{prefix}-{sid}-{i}", result_ttl=RESULT_TTL_S)
        res = job.latest_result(timeout=RESULT_TIMEOUT_S)
        record(now() - t0)
        expected = f"question {i}" if i < k else "done"
        if res is None or res.return_value != expected:
            raise RuntimeError(f"rq: step {i} of {sid} gave {res!r}")


async def run(cfg: PeerConfig) -> PeerResult:
    from redis import Redis
    from rq import Queue

    prefix = run_prefix("rq")
    conn = Redis.from_url(cfg.redis_url, max_connections=cfg.in_flight + 8)
    queue = Queue(prefix, connection=conn)
    pool = ThreadPoolExecutor(max_workers=cfg.in_flight, thread_name_prefix="rq-host")
    loop = asyncio.get_running_loop()

    async def session(sid: str, record: Record) -> None:
        await loop.run_in_executor(pool, _session, queue, prefix, sid, cfg.k, record)

    worker_args = ["--redis", cfg.redis_url, "--queue", prefix]
    throughput: dict[int, float] = {}
    try:
        async with worker_pool(cfg, MODULE, worker_args) as grow:
            await grow(1)
            latency = await measure_latency(session, cfg)
            for n in sorted(cfg.workers):
                await grow(n)
                await measure_throughput(session, _short(cfg), tag=f"warm{n}")
                throughput[n] = await measure_throughput(session, cfg, tag=f"w{n}")
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
        await asyncio.to_thread(_cleanup, conn, prefix)
        conn.close()
    return PeerResult(
        name="rq",
        latency=latency,
        throughput=throughput,
        notes=(
            "SimpleWorker, a job per step; host waits with job.latest_result(timeout) "
            f"(XREAD BLOCK on the result stream); {cfg.in_flight} host threads"
        ),
        versions=versions("rq", "redis"),
    )


def _short(cfg: PeerConfig) -> PeerConfig:
    """A brief unmeasured run that brings a fresh worker set to a steady state."""
    from dataclasses import replace

    return replace(cfg, ramp_s=0.0, window_s=0.5)


def _cleanup(conn: object, prefix: str) -> None:
    from redis import Redis

    assert isinstance(conn, Redis)
    keys = list(conn.scan_iter(match=f"*{prefix}*", count=1000))
    for i in range(0, len(keys), 500):
        conn.delete(*keys[i : i + 500])
    conn.srem("rq:queues", f"rq:queue:{prefix}")  # RQ's index of queues
    conn.delete("rq:clean_groups")  # RQ's maintenance throttle (it would expire in 10 min)


def worker_main(argv: list[str]) -> None:

    from redis import Redis
    from rq import Queue, SimpleWorker

    a = queue_worker_args(argv)
    conn = Redis.from_url(a.redis)
    worker = SimpleWorker(
        [Queue(a.queue, connection=conn)], connection=conn, name=f"{a.queue}-w{a.index}"
    )
    print("ready", flush=True)  # the queue is a list: jobs pushed before work() starts wait
    worker.work(logging_level="WARNING", with_scheduler=False)


if __name__ == "__main__":
    if sys.argv[1:2] == ["worker"]:
        worker_main(sys.argv[2:])
    else:
        main(run)
