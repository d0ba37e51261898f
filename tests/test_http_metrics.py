"""``GET /metrics``: Prometheus text from the official client, scraped before and after a
session that a real worker process runs: the session, the worker's counters and the API's
own counters all move, and the route label is the path template, not the path.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families

from coordinator.http_api import create_app
from coordinator.registry import SessionRegistry
from tests.helpers import assert_eventually
from tests.procs import FAST_SETTINGS, WorkerPool

pytestmark = [pytest.mark.redis, pytest.mark.slow]

WAIT_S = 30.0
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@asynccontextmanager
async def api(redis_url: str, ns: str, token: str | None = None
              ) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(lambda: SessionRegistry.from_url(redis_url, namespace=ns,
                                                      **FAST_SETTINGS), token)
    async with (app.router.lifespan_context(app),
                httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                  base_url="http://api", timeout=WAIT_S) as c):
        yield c


async def scrape(c: httpx.AsyncClient, **headers: str) -> Samples:
    res = await c.get("/metrics", headers=headers)
    assert res.status_code == 200, res.text
    assert res.headers["content-type"] == CONTENT_TYPE_LATEST
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(res.text) for s in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


async def test_scrape_before_and_after_a_session(redis_url: str,
                                                 worker_pool: WorkerPool) -> None:
    worker = await worker_pool.start()
    wid = worker.worker_id
    assert wid
    async with api(redis_url, worker_pool.namespace) as c:
        before = await scrape(c)
        assert value(before, "alc_live_workers") == 1
        for phase in ("running", "paused", "completed", "failed", "cancelled"):
            assert (("alc_sessions", frozenset({("phase", phase)})) in before), phase
        assert ("alc_dead_letters", frozenset()) in before
        assert ("alc_worker_steps_total", frozenset({("worker", wid)})) in before

        # one round of two queries, then the end
        first = (await c.post("/sessions", json={"strategy": "mp-rounds", "input": {
            "tag": "m", "rounds": 1, "width": 2}})).json()
        sid = first["session_id"]
        done = (await c.post(f"/sessions/{sid}/responses", json={"responses": [
            {"query_id": "q-0", "response": "4"}, {"query_id": "q-1", "response": "4"}]})).json()
        assert done["status"] == "completed"

        after: Samples = {}

        async def heartbeat_caught_up() -> bool:  # a worker reports at its next heartbeat
            nonlocal after
            after = await scrape(c)
            return value(after, "alc_worker_steps_total", worker=wid) >= \
                value(before, "alc_worker_steps_total", worker=wid) + 2

        await assert_eventually(heartbeat_caught_up, timeout=WAIT_S,
                                message="the worker's steps counter moves")

    completed = value(after, "alc_sessions", phase="completed")
    assert completed == value(before, "alc_sessions", phase="completed") + 1
    assert value(after, "alc_sessions", phase="paused") == 0
    assert value(after, "alc_api_feeds_total") == value(before, "alc_api_feeds_total") + 2
    requests: dict[str, Any] = {"method": "POST", "status": "201", "route": "/sessions"}
    assert value(after, "alc_api_requests_total", **requests) == 1
    assert value(after, "alc_api_requests_total", method="POST", status="200",
                 route="/sessions/{session_id}/responses") == 1
    assert value(after, "alc_api_requests_total", method="GET", status="200",
                 route="/metrics") >= 2
    for name in ("alc_worker_replays_total", "alc_worker_claims_total",
                 "alc_worker_fenced_rejections_total", "alc_worker_dead_letters_total"):
        assert (name, frozenset({("worker", wid)})) in after, name


async def test_metrics_needs_the_token_and_labels_unknown_paths_once(
    redis_url: str, worker_pool: WorkerPool
) -> None:
    await worker_pool.start()
    async with api(redis_url, worker_pool.namespace, token="s3cret") as c:
        refused = await c.get("/metrics")
        assert refused.status_code == 401 and refused.json()["type"] == "unauthorized"
        for path in ("/nowhere", "/elsewhere"):
            assert (await c.get(path)).status_code == 404
        samples = await scrape(c, Authorization="Bearer s3cret")
    assert value(samples, "alc_api_requests_total", method="GET", status="401",
                 route="/metrics") == 1
    assert value(samples, "alc_api_requests_total", method="GET", status="404",
                 route="<unmatched>") == 2
    assert not any("/nowhere" in dict(labels).get("route", "") for _, labels in samples)
