"""DBOS: a durable workflow that does K ``DBOS.recv()``, each answered by the host's ``send``.

Worker processes run DBOS (``DBOS.launch()``) on a PostgreSQL system database created for the
run, and take sessions from a DBOS queue. The host is a separate process that talks to them the
way DBOS documents for outside callers, a ``DBOSClient``: ``enqueue_async`` starts a session,
``send_async`` answers, and ``get_event_async`` waits for the next question.

How the host learns the next question: the workflow ``set_event("q<i>", question)`` right
before each ``recv``, and the host waits on ``get_event("q<i>")`` (a key per question, so a
wait can never see the previous one). That is DBOS's own workflow -> outside-world channel;
with the client's LISTEN/NOTIFY listener on, a waiting ``get_event`` wakes on a notification
instead of polling. After the K-th answer the workflow sets ``q<K> = "done"`` and returns.

Tuning: DBOS pushes event notifications from a background notifier that coalesces them every
``notification_coalesce_sec`` (10 ms by default); it is set to 1 ms here, DBOS's documented
minimum, in the spirit of arq's 5 ms poll delay. The queue is polled every 5 ms (1 s by
default; it only delays a session's start). The host's thread pool (the client's async calls
run in threads) is sized to the sessions in flight.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import signal
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ..stats import now
from . import (
    PeerConfig,
    PeerResult,
    Record,
    SessionFn,
    fresh_database,
    main,
    measure_latency,
    measure_throughput,
    run_prefix,
    versions,
    worker_pool,
    worker_processes,
)

MODULE = "bench.peers.dbos_peer"
APP = "alc-bench"
APP_VERSION = "alc-bench-1"
QUEUE = "alc_bench_sessions"
WORKFLOW = "alc_bench_session"
TOPIC = "answer"
COALESCE_S = 0.001
QUEUE_POLL_S = 0.005
WAIT_TIMEOUT_S = 30.0
DATABASE = "alc_bench_dbos"
CLIENT_POOL = 20  # PostgreSQL allows 100 connections; workers keep DBOS's default 20 each


def make_session(client: Any, prefix: str, k: int) -> SessionFn:
    async def session(sid: str, record: Record) -> None:
        wfid = f"{prefix}-{sid}"
        await client.enqueue_async(
            {
                "queue_name": QUEUE,
                "workflow_name": WORKFLOW,
                "workflow_id": wfid,
                "app_version": APP_VERSION,
            },
            k,
        )
        q = await client.get_event_async(wfid, "q0", timeout_seconds=WAIT_TIMEOUT_S)
        if q != "question 0":
            raise RuntimeError(f"dbos: no first question for {sid}: {q!r}")
        for i in range(1, k + 1):
            t0 = now()
            await client.send_async(wfid, "ok", topic=TOPIC)
            q = await client.get_event_async(wfid, f"q{i}", timeout_seconds=WAIT_TIMEOUT_S)
            record(now() - t0)
            want = f"question {i}" if i < k else "done"
            if q != want:
                raise RuntimeError(f"dbos: step {i} of {sid} gave {q!r}")

    return session


async def run(cfg: PeerConfig) -> PeerResult:
    from dbos import DBOSClient

    loop = asyncio.get_running_loop()
    pool = ThreadPoolExecutor(max_workers=cfg.in_flight + 8, thread_name_prefix="dbos-host")
    loop.set_default_executor(pool)
    throughput: dict[int, float] = {}
    async with fresh_database(cfg, DATABASE, create=False) as url:
        worker_args = ["--db", url]
        client: Any = None
        try:
            async with worker_pool(cfg, MODULE, worker_args) as grow:
                # The first worker creates and migrates the system database; then the client.
                await grow(1)
                client = DBOSClient(
                    system_database_url=url,
                    use_listen_notify=True,
                    system_database_pool_size=CLIENT_POOL,
                    application_name=APP,
                )
                session = make_session(client, run_prefix("dbos"), cfg.k)
                latency = await measure_latency(session, _lat(cfg))
                # No separate warm-up run here (a session takes seconds at 50 in flight): the
                # ramp left out of the window covers a new worker's start.
                for n in sorted(cfg.workers):
                    await grow(n)
                    throughput[n] = await measure_throughput(session, cfg, tag=f"w{n}")
            # DBOS out of the box (notifications coalesced every 10 ms), for latency only.
            async with worker_processes(cfg, MODULE, [*worker_args, "--coalesce", "0.01"], 1):
                default_lat = await measure_latency(
                    session, dataclasses.replace(cfg, warmup_sessions=1, latency_sessions=6), "dflt"
                )
        finally:
            if client is not None:
                client.destroy()
    return PeerResult(
        name="dbos",
        latency=latency,
        throughput=throughput,
        notes=(
            "workflow: set_event(q<i>) then recv(); host: DBOSClient send + get_event "
            f"(LISTEN/NOTIFY); notification_coalesce_sec {COALESCE_S:g}, queue poll "
            f"{QUEUE_POLL_S:g} s; with the default 10 ms coalescing: p50 "
            f"{default_lat.p50_ms:.2f} ms, p99 {default_lat.p99_ms:.2f} ms (n={default_lat.n})"
        ),
        versions=versions("dbos", "psycopg", "SQLAlchemy"),
    )


def _lat(cfg: PeerConfig) -> PeerConfig:
    """At ~15 ms a step, 25 sessions (250 steps) keep DBOS's whole run near 30 s."""
    return dataclasses.replace(cfg, latency_sessions=min(cfg.latency_sessions, 25))


def worker_main(argv: list[str]) -> None:
    from dbos import DBOS

    p = argparse.ArgumentParser()
    p.add_argument("--db", required=True)
    p.add_argument("--index", type=int, default=0)
    p.add_argument("--coalesce", type=float, default=COALESCE_S)
    a = p.parse_args(argv)

    @DBOS.workflow(name=WORKFLOW)
    async def bench_session(k: int) -> str:
        for i in range(k):
            await DBOS.set_event_async(f"q{i}", f"question {i}")
            answer = await DBOS.recv_async(TOPIC, timeout_seconds=WAIT_TIMEOUT_S)
            if answer != "ok":
                raise RuntimeError(f"answer {i} was {answer!r}")
        await DBOS.set_event_async(f"q{k}", "done")
        return "done"

    DBOS(
        config={
            "name": APP,
            "system_database_url": a.db,
            "application_version": APP_VERSION,
            "executor_id": f"bench-w{a.index}",
            "log_level": "WARNING",
            "notification_coalesce_sec": a.coalesce,
        }
    )
    DBOS.launch()
    DBOS.register_queue(QUEUE, polling_interval_sec=QUEUE_POLL_S)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    print("ready", flush=True)
    stop.wait(timeout=3600)
    DBOS.destroy(workflow_completion_timeout_sec=5)


if __name__ == "__main__":
    if sys.argv[1:2] == ["worker"]:
        worker_main(sys.argv[2:])
    else:
        main(run)
