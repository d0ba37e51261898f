"""Routing by strategy: a job is only ever run by a worker that has its strategy.

Workers started with different ``--import`` lists read one job stream. A worker handed a
session whose strategy it lacks passes the job on to a live worker that offers it (their
heartbeats list what they offer), and fails the session (``unknown_strategy``, saying which
worker lacked it and how to start one that has it) only when no live worker offers it.

Two real worker processes on a real Redis: one imports this module (``rt-extra``), the other
does not. Each worker also publishes its catalog: description and parameters per strategy.
"""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path
from typing import Any

import pytest

from coordinator import Finished, Paused, Phase, SessionRegistry
from coordinator.codec import unpack
from tests.conftest import FakeCluster
from tests.helpers import assert_eventually
from tests.procs import WAIT_S, WorkerPool
from workers import catalog, strategy
from workers.context import Context

MODULE = "tests.test_routing"
SESSIONS = 24


@strategy("rt-extra")
async def rt_extra(ctx: Context, tag: str, rounds: int = 2, **_: Any) -> list[str]:
    """Asks ``rounds`` questions, one after another; returns the answers.

    Only workers that import tests.test_routing offer it."""
    return [await ctx.llm(f"{tag} question {n}") for n in range(rounds)]


@pytest.mark.slow
async def test_workers_with_different_imports_route_every_session_to_one_that_has_it(
        redis_url: str, namespace: str, tmp_path: Path) -> None:
    having = WorkerPool(redis_url, namespace, tmp_path / "having", imports=(MODULE,))
    lacking = WorkerPool(redis_url, namespace, tmp_path / "lacking", imports=())
    (tmp_path / "having").mkdir()
    (tmp_path / "lacking").mkdir()
    reg = SessionRegistry.from_url(redis_url, namespace=namespace)
    try:
        full = await having.start(concurrency=4)
        bare = await lacking.start(concurrency=4)

        async def one(n: int) -> tuple[str, Any]:
            sid, event = await reg.start_execution("rt-extra", {"tag": f"s{n}"},
                                                   timeout=WAIT_S)
            while isinstance(event, Paused):
                (q,) = event.queries
                event = await reg.feed_response(sid, q.id, q.prompt[::-1], timeout=WAIT_S)
            return sid, event

        results = await asyncio.gather(*(one(n) for n in range(SESSIONS)))
        logs = f"{having.logs()}\n{lacking.logs()}"
        for sid, event in results:
            assert isinstance(event, Finished), (sid, event)
            assert event.state is Phase.COMPLETED, (sid, event.error, logs)
        tags = {event.result[0].split(" ")[-1][::-1] for _, event in results}
        assert tags == {f"s{n}" for n in range(SESSIONS)}

        # The worker without the strategy was handed some of them, and passed them on.
        async def passed_on() -> int:
            report = (await reg.worker_stats()).get(bare.worker_id, {})
            return int(report.get("passed_on", 0))

        await assert_eventually(passed_on, timeout=WAIT_S, message=logs)
        stats = await reg.worker_stats()
        assert "rt-extra" in stats[full.worker_id]["strategies"]
        assert "rt-extra" not in stats[bare.worker_id]["strategies"]
        assert "cot" in stats[bare.worker_id]["strategies"]

        # With only the worker that lacks it alive, a session of it fails at once, typed,
        # saying which worker lacked it and what to start.
        full.signal(signal.SIGTERM)
        assert await asyncio.wait_for(full.wait_exit(), WAIT_S) == 0
        fresh = SessionRegistry.from_url(redis_url, namespace=namespace)  # nothing cached
        try:
            sid = await fresh.submit("rt-extra", {"tag": "alone"})
        finally:
            await fresh.aclose()
        assert sid.live_workers == 0
        event = await reg.wait_event(sid, timeout=WAIT_S)
        assert isinstance(event, Finished) and event.state is Phase.FAILED, event
        assert event.error_type == "unknown_strategy", event
        assert bare.worker_id in (event.error or "") and "--import" in (event.error or "")
        assert event.to_json(sid)["type"] == "unknown_strategy"
    finally:
        await reg.aclose()
        having.close()
        lacking.close()


# -- the catalog each worker publishes ---------------------------------------------------------


async def test_a_worker_publishes_its_catalog_and_what_it_offers(
        fake_cluster: FakeCluster) -> None:
    w = await fake_cluster.worker()
    client = fake_cluster.client()
    stored = {k.decode(): unpack(v) for k, v in
              (await client.hgetall(w.keys.catalog)).items()}
    assert set(stored) == set(catalog.names())
    assert stored["rt-extra"] == {
        "description": "Asks ``rounds`` questions, one after another; returns the answers.",
        "params": [
            {"name": "tag", "required": True, "default": None, "annotation": "str"},
            {"name": "rounds", "required": False, "default": 2, "annotation": "int"},
        ]}
    assert stored["cot"]["params"][0]["name"] == "task"
    assert w.report()["strategies"] == catalog.names()


#: A default no JSON can carry.
OPAQUE = object()


def test_describe_reads_the_signature_and_the_first_paragraph() -> None:
    async def plain(ctx, a, b=None, *rest, c: list[int] | None = None, d=OPAQUE, **kw):
        return None

    described = catalog.describe_one(plain)
    assert described["description"] == ""
    assert described["params"] == [
        {"name": "a", "required": True, "default": None, "annotation": None},
        {"name": "b", "required": False, "default": None, "annotation": None},
        {"name": "c", "required": False, "default": None, "annotation": "list[int] | None"},
        # a default JSON cannot carry is shown as none
        {"name": "d", "required": False, "default": None, "annotation": None},
    ]
