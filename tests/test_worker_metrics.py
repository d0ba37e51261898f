"""A worker's Prometheus metrics: scraped before and after a session, its counters and the
step histogram go up, and the gauges say what it holds; ``close`` stops the endpoint.

In-process (the endpoint of ``workers.metrics.start_metrics_server``), and once through the
CLI (``coordinator worker --metrics-port``) on a real worker process.
"""

from __future__ import annotations

import asyncio
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from coordinator import Finished, Paused, SessionRegistry
from tests.conftest import FakeCluster
from tests.helpers import free_port
from tests.procs import WAIT_S, WorkerPool
from workers import strategy
from workers.context import Context
from workers.metrics import start_metrics_server

COUNTERS = ("alc_steps_total", "alc_replays_total", "alc_claims_total", "alc_rescues_total",
            "alc_fenced_rejections_total", "alc_dead_letters_total", "alc_step_errors_total")
GAUGES = ("alc_steps_in_flight", "alc_live_executions")


@strategy("twm-two")
async def twm_two(ctx: Context, **_: Any) -> list[str]:
    return [await ctx.llm("first"), await ctx.llm("second")]


async def scrape(port: int) -> dict[str, float]:
    """Every sample of ``http://127.0.0.1:port/metrics``, by name (and ``le`` for buckets)."""

    def get() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
            body: bytes = resp.read()
            return body.decode()

    out: dict[str, float] = {}
    for family in text_string_to_metric_families(await asyncio.to_thread(get)):
        for s in family.samples:
            key = s.name if "le" not in s.labels else f"{s.name}{{le={s.labels['le']}}}"
            out[key] = s.value
    return out


async def test_scrapes_before_and_after_a_session_show_its_steps(
        fake_cluster: FakeCluster, registry: SessionRegistry) -> None:
    worker = await fake_cluster.worker()
    server = await asyncio.to_thread(start_metrics_server, worker, 0, "127.0.0.1")
    try:
        before = await scrape(server.port)
        for name in (*COUNTERS, *GAUGES, "alc_step_seconds_count", "alc_step_seconds_sum"):
            assert before[name] == 0, (name, before)

        sid, first = await registry.start_execution("twm-two", {})
        assert isinstance(first, Paused)
        paused = await scrape(server.port)
        assert paused["alc_steps_total"] == 1 and paused["alc_live_executions"] == 1, paused
        assert await registry.feed_response(sid, "q-0", "a") is not None
        done = await registry.feed_response(sid, "q-0", "b")
        assert isinstance(done, Finished) and done.result == ["a", "b"]

        after = await scrape(server.port)
        assert after["alc_steps_total"] == 3, after
        assert after["alc_step_seconds_count"] == 3 and after["alc_step_seconds_sum"] > 0
        assert after["alc_step_seconds_bucket{le=+Inf}"] == 3
        assert after["alc_live_executions"] == 0  # it ended: nothing held for it
        assert after["alc_steps_in_flight"] == 0
    finally:
        await asyncio.to_thread(server.close)
    assert worker.step_observer is None  # the steps stop feeding a closed endpoint
    with pytest.raises(urllib.error.URLError):
        await scrape(server.port)


@pytest.mark.slow
async def test_a_worker_process_serves_its_metrics_on_the_port_it_is_given(
        redis_url: str, namespace: str, tmp_path: Path) -> None:
    port = free_port()
    pool = WorkerPool(redis_url, namespace, tmp_path, imports=("tests.test_worker_metrics",),
                      args=("--metrics-port", str(port)))
    reg = SessionRegistry.from_url(redis_url, namespace=namespace)
    try:
        w = await pool.start()
        before = await scrape(port)
        sid, first = await reg.start_execution("twm-two", {}, timeout=WAIT_S)
        assert isinstance(first, Paused)
        await reg.feed_response(sid, "q-0", "a", timeout=WAIT_S)
        done = await reg.feed_response(sid, "q-0", "b", timeout=WAIT_S)
        assert isinstance(done, Finished), w.log_tail()
        after = await scrape(port)
        assert after["alc_steps_total"] == before["alc_steps_total"] + 3, (before, after)
        assert after["alc_step_seconds_count"] == before["alc_step_seconds_count"] + 3
    finally:
        await reg.aclose()
        pool.close()
