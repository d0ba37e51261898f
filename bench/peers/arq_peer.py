"""arq: a job per step, worker poll delay tuned to 5 ms.

Host: the session's start and each answer is one ``ArqRedis.enqueue_job("step", ...)``. arq's
own result wait, ``job.result()``, polls (GET + ZSCORE every ``poll_delay``, 0.5 s by
default); the host instead takes the faster equivalent: the job LPUSHes its return value to a
reply list of its session before returning, and the host BLPOPs it (push, no polling on the
host side). ``job.result(poll_delay=0.005)`` is measured too, for latency only, and reported
in the notes. Worker: ``arq.Worker`` with ``poll_delay=0.005`` and ``max_jobs`` above the
sessions in flight (the default 10 would cap a worker below the load, not measure it).
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Any

from ..stats import now
from . import (
    PeerConfig,
    PeerResult,
    Record,
    SessionFn,
    main,
    measure_latency,
    measure_throughput,
    queue_worker_args,
    run_prefix,
    versions,
    worker_pool,
)

MODULE = "bench.peers.arq_peer"
POLL_DELAY_S = 0.005
MAX_JOBS = 200
WAIT_TIMEOUT_S = 10
KEEP_RESULT_S = 60


async def step(ctx: dict[str, Any], i: int, k: int, answer: str | None, reply: str) -> str:
    """The strategy step: answer ``i - 1`` in, question ``i`` (or the end) out. The session's
    state travels in the job's arguments. With ``reply`` set it is also pushed there."""
    out = f"question {i}" if i < k else "done"
    if reply:
        await ctx["redis"].lpush(reply, out)
    return out


def _expected(i: int, k: int) -> str:
    return f"question {i}" if i < k else "done"


def make_session(pool: Any, replies: Any, prefix: str, k: int, mode: str) -> SessionFn:
    """``mode`` "reply": BLPOP the reply list; "result": ``await job.result(poll_delay)``."""

    async def ask(sid: str, i: int, answer: str | None) -> str:
        reply = f"{prefix}:reply:{sid}" if mode == "reply" else ""
        job = await pool.enqueue_job(
            "step", i, k, answer, reply, _job_id=f"{prefix}:{sid}:{i}", _queue_name=prefix
        )
        if job is None:
            raise RuntimeError(f"arq: job {prefix}:{sid}:{i} not enqueued")
        if mode == "reply":
            got = await replies.blpop([reply], timeout=WAIT_TIMEOUT_S)
            if got is None:
                raise TimeoutError(f"arq: no reply for {sid} step {i}")
            return str(got[1].decode())
        return str(await job.result(timeout=WAIT_TIMEOUT_S, poll_delay=POLL_DELAY_S))

    async def session(sid: str, record: Record) -> None:
        if await ask(sid, 0, None) != "question 0":
            raise RuntimeError(f"arq: no first question for {sid}")
        for i in range(1, k + 1):
            t0 = now()
            out = await ask(sid, i, "ok")
            record(now() - t0)
            if out != _expected(i, k):
                raise RuntimeError(f"arq: step {i} of {sid} gave {out!r}")

    return session


async def run(cfg: PeerConfig) -> PeerResult:
    from arq import create_pool
    from arq.connections import RedisSettings
    from redis.asyncio import Redis

    prefix = run_prefix("arq")
    pool = await create_pool(RedisSettings.from_dsn(cfg.redis_url))
    replies = Redis.from_url(cfg.redis_url, max_connections=cfg.in_flight + 8)
    session = make_session(pool, replies, prefix, cfg.k, "reply")
    polled = make_session(pool, replies, prefix, cfg.k, "result")
    worker_args = ["--redis", cfg.redis_url, "--queue", prefix]
    throughput: dict[int, float] = {}
    polled_tp = float("nan")
    try:
        async with worker_pool(cfg, MODULE, worker_args) as grow:
            await grow(1)
            latency = await measure_latency(session, cfg)
            polled_lat = await measure_latency(
                polled, dataclasses.replace(cfg, warmup_sessions=1, latency_sessions=10), "polled"
            )
            for n in sorted(cfg.workers):
                await grow(n)
                await measure_throughput(session, _short(cfg), tag=f"warm{n}")
                throughput[n] = await measure_throughput(session, cfg, tag=f"w{n}")
                if n == 1:
                    polled_tp = await measure_throughput(polled, cfg, tag="polled")
    finally:
        await _cleanup(replies, prefix)
        await replies.aclose()
        await pool.aclose()
    return PeerResult(
        name="arq",
        latency=latency,
        throughput=throughput,
        notes=(
            f"a job per step, worker poll_delay {POLL_DELAY_S * 1000:g} ms, max_jobs {MAX_JOBS}; "
            "host BLPOPs a reply list the job pushes to; with job.result(poll_delay="
            f"{POLL_DELAY_S * 1000:g} ms) instead: p50 {polled_lat.p50_ms:.2f} ms, "
            f"p99 {polled_lat.p99_ms:.2f} ms (n={polled_lat.n}), "
            f"{polled_tp:,.0f} steps/s with 1 worker"
        ),
        versions=versions("arq", "redis"),
    )


def _short(cfg: PeerConfig) -> PeerConfig:
    return dataclasses.replace(cfg, ramp_s=0.0, window_s=0.5)


async def _cleanup(client: Any, prefix: str) -> None:
    keys = [k async for k in client.scan_iter(match=f"*{prefix}*", count=1000)]
    for i in range(0, len(keys), 500):
        await client.delete(*keys[i : i + 500])


def worker_main(argv: list[str]) -> None:

    from arq.connections import RedisSettings
    from arq.worker import Worker, func

    a = queue_worker_args(argv)

    async def on_startup(ctx: dict[Any, Any]) -> None:
        print("ready", flush=True)  # arq calls this once its Redis pool is up

    worker = Worker(
        functions=[func(step, name="step")],
        queue_name=a.queue,
        redis_settings=RedisSettings.from_dsn(a.redis),
        poll_delay=POLL_DELAY_S,
        max_jobs=MAX_JOBS,
        keep_result=KEEP_RESULT_S,
        health_check_key=f"{a.queue}:health-check",
        on_startup=on_startup,
    )
    worker.run()


if __name__ == "__main__":
    if sys.argv[1:2] == ["worker"]:
        worker_main(sys.argv[2:])
    else:
        main(run)
