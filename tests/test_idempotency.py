"""A client's idempotency key on start: the same key (and request) within the retention is
the same session, whoever repeats it and whenever; another request under it is refused."""

from __future__ import annotations

from typing import Any

import pytest

from coordinator import Finished, Paused, SessionRegistry
from coordinator.errors import IdempotencyConflict, InvalidInput
from workers import strategy
from workers.context import Context

ON_BOTH_SERVERS = True
SHARDED_TOO = True
ON_CLUSTER_TOO = True


@strategy("tidem-ask")
async def ask(ctx: Context, task: str = "", **_: Any) -> str:
    return await ctx.llm(f"do {task}")


async def test_the_same_key_is_the_same_session(registry: SessionRegistry,
                                                worker: Any) -> None:
    sid, first = await registry.start_execution("tidem-ask", {"task": "x"},
                                                idempotency_key="order-17")
    assert isinstance(first, Paused)
    again, event = await registry.start_execution("tidem-ask", {"task": "x"},
                                                  idempotency_key="order-17")
    assert again == sid and event == first
    assert (await registry.counts())["paused"] == 1
    done = await registry.feed_response(sid, "q-0", "done")
    assert isinstance(done, Finished)
    # repeated after the end (within retention): the same session, its end
    later, end = await registry.start_execution("tidem-ask", {"task": "x"},
                                                idempotency_key="order-17")
    assert later == sid and end == done
    other = await registry.submit("tidem-ask", {"task": "x"}, idempotency_key="order-18")
    assert other != sid


async def test_another_request_under_a_used_key_is_refused(registry: SessionRegistry,
                                                           worker: Any) -> None:
    sid = await registry.submit("tidem-ask", {"task": "x"}, idempotency_key="k-1")
    with pytest.raises(IdempotencyConflict) as info:
        await registry.submit("tidem-ask", {"task": "y"}, idempotency_key="k-1")
    assert info.value.session_id == sid and info.value.http_status == 409
    counts = await registry.counts()
    assert counts["running"] + counts["paused"] == 1
    with pytest.raises(InvalidInput):
        await registry.submit("tidem-ask", {"task": "x"}, idempotency_key="")


async def test_keys_are_scoped_by_namespace(registry: SessionRegistry, worker: Any) -> None:
    shards = await registry.services.ready()
    sid = await registry.submit("tidem-ask", {"task": "x"}, idempotency_key="shared")
    assert sid == shards.session_id_for("shared")
    assert shards.of(sid) is not None  # it lands in one of the namespace's shards
    other_ns = type(shards).single("another").session_id_for("shared")
    assert other_ns != sid
