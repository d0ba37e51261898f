"""Per-query deadlines: ``ctx.llm(..., deadline_s=..., on_timeout=...)``.

A question the host does not answer in time gets its default answer, or fails the session
(error type ``deadline``), through the GC sweep, exactly once; an answer in time wins. The
sweeps here run with an injected clock (``gc_sweep(now_ms=...)``), so no test waits for a
deadline to pass.
"""

from __future__ import annotations

from typing import Any

import pytest

from coordinator import Finished, Paused, Phase, SessionRegistry
from coordinator.errors import AlreadyResponded, InvalidTransition, StaleRound
from coordinator.records import now_ms
from tests.conftest import FakeCluster
from workers import strategy
from workers.context import Context

ON_BOTH_SERVERS = True
SHARDED_TOO = True

MINUTE_MS = 60_000


@strategy("tdl-one")
async def one(ctx: Context, default: str | None = "fallback", **_: Any) -> dict[str, Any]:
    first = await ctx.llm("answer within a minute", deadline_s=60, on_timeout=default)
    second = await ctx.llm(f"after {first!r}")
    return {"first": first, "second": second}


@strategy("tdl-batch")
async def batch(ctx: Context, **_: Any) -> list[str]:
    return await ctx.llm_batch([
        {"prompt": "soon", "deadline_s": 10, "on_timeout": "soon-default"},
        {"prompt": "later", "deadline_s": 100, "on_timeout": "later-default"},
        "no deadline",
    ])


async def test_a_default_answers_a_query_past_its_deadline_once(
        registry: SessionRegistry, worker: Any) -> None:
    sid, first = await registry.start_execution("tdl-one")
    assert isinstance(first, Paused) and first.queries[0].deadline_at is not None
    assert await registry.gc_sweep(now_ms=now_ms() + MINUTE_MS // 2) == []  # not yet due
    assert (await registry.status(sid))["round"] == 1
    await registry.gc_sweep(now_ms=now_ms() + 2 * MINUTE_MS)
    nxt = await registry.wait_event(sid)
    assert isinstance(nxt, Paused) and nxt.queries[0].prompt == "after 'fallback'"
    # the host's late answer to the first question is refused: that round is over
    with pytest.raises(StaleRound):
        await registry.feed_response(sid, "q-0", "late", round=1)
    await registry.gc_sweep(now_ms=now_ms() + 3 * MINUTE_MS)  # nothing due any more
    done = await registry.feed_response(sid, "q-0", "two")
    assert isinstance(done, Finished) and done.result == {"first": "fallback", "second": "two"}


async def test_an_answer_in_time_wins(registry: SessionRegistry, worker: Any) -> None:
    sid, _ = await registry.start_execution("tdl-one")
    nxt = await registry.feed_response(sid, "q-0", "mine")
    assert isinstance(nxt, Paused)
    await registry.gc_sweep(now_ms=now_ms() + 2 * MINUTE_MS)
    done = await registry.feed_response(sid, "q-0", "two")
    assert isinstance(done, Finished) and done.result == {"first": "mine", "second": "two"}


async def test_without_a_default_the_session_fails_with_deadline(
        registry: SessionRegistry, worker: Any) -> None:
    sid, _ = await registry.start_execution("tdl-one", {"default": None})
    await registry.gc_sweep(now_ms=now_ms() + 2 * MINUTE_MS)
    done = await registry.wait_event(sid)
    assert isinstance(done, Finished) and done.state is Phase.FAILED
    assert done.error_type == "deadline" and "q-0" in (done.error or "")
    assert done.to_json(sid)["type"] == "deadline"
    with pytest.raises(InvalidTransition):
        await registry.feed_response(sid, "q-0", "too late")


async def test_each_query_of_a_batch_keeps_its_own_deadline(
        registry: SessionRegistry, worker: Any) -> None:
    sid, _ = await registry.start_execution("tdl-batch")
    await registry.gc_sweep(now_ms=now_ms() + 20_000)  # the first only
    snap = await registry.status(sid, "meta")
    assert [p["query_id"] for p in snap["pending"]] == ["q-1", "q-2"]
    with pytest.raises(AlreadyResponded):
        await registry.feed_response(sid, "q-0", "too late")
    await registry.gc_sweep(now_ms=now_ms() + 200_000)  # the second; the third has none
    snap = await registry.status(sid, "meta")
    assert [p["query_id"] for p in snap["pending"]] == ["q-2"]
    done = await registry.feed_response(sid, "q-2", "host")
    assert isinstance(done, Finished)
    assert done.result == ["soon-default", "later-default", "host"]


async def test_the_default_resumes_on_another_worker_that_replays(
        fake_cluster: FakeCluster) -> None:
    """The worker that asked is gone when the deadline passes; another worker, with nothing
    in memory, replays the journal, default answer included, and carries on exactly."""
    reg = fake_cluster.registry()
    first = await fake_cluster.worker()
    sid, _ = await reg.start_execution("tdl-one")
    await fake_cluster.stop_worker(first)
    second = await fake_cluster.worker()
    await reg.gc_sweep(now_ms=now_ms() + 2 * MINUTE_MS)
    nxt = await reg.wait_event(sid)
    assert isinstance(nxt, Paused) and nxt.queries[0].prompt == "after 'fallback'"
    done = await reg.feed_response(sid, "q-0", "two")
    assert isinstance(done, Finished) and done.result == {"first": "fallback", "second": "two"}
    assert second.stats.replays >= 1
