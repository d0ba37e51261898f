"""A primary with a replica behind Redis Sentinel, reached by one ``redis+sentinel://`` URL.

The transport asks the sentinels for the primary on every connect, so registries, workers
and their pub/sub follow a failover: Sentinel closes the clients of the old primary, a
demoted primary's READONLY drops a connection, and the next attempt (within the call's
budget) lands on the new primary.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Iterator
from typing import Any

import pytest
import redis

import tests.strategies_mp  # noqa: F401  (registers mp-rounds)
from coordinator import Finished, NotReplicated, Paused, Settings
from coordinator.states import Phase
from coordinator.transport import Target
from tests.helpers import assert_eventually
from tests.procs import InProcessCluster, answer_for
from tests.strategies_mp import expected_rounds, prompt_for
from tests.topology import SentinelGroup, running

pytestmark = pytest.mark.redis


@pytest.fixture(scope="module")
def sentinel_group() -> Iterator[SentinelGroup]:
    with running(SentinelGroup()) as group:
        yield group


def settings() -> Settings:
    return Settings(namespace=f"ts{secrets.token_hex(4)}", wait_slice_s=0.1,
                    wait_timeout_s=30.0, redis_timeout_s=8.0)


def test_sentinel_urls_are_checked() -> None:
    target = Target.parse("redis+sentinel://u:pw@127.0.0.1:1,127.0.0.1/alc/2"
                          "?sentinel_password=sp")
    assert target.sentinels == (("127.0.0.1", 1), ("127.0.0.1", 26379))
    assert (target.service, target.db) == ("alc", 2)
    assert "pw" not in target.safe_url and "sp" not in target.safe_url


async def test_sessions_run_through_sentinel_and_finish_exactly_across_a_failover(
    sentinel_group: SentinelGroup,
) -> None:
    cluster = InProcessCluster.real(sentinel_group.url, settings())
    try:
        await cluster.worker(concurrency=8)
        reg = cluster.registry()
        before = sentinel_group.primary_port()
        rounds = 8
        tags = [f"s{n}" for n in range(12)]
        started, switched = asyncio.Event(), asyncio.Event()

        async def host(n: int, tag: str) -> Any:
            """Even hosts keep answering through the switch (thinking 50 ms a round); odd
            ones stop at round 3 until it is over, so both sides of it are exercised."""
            sid, event = await reg.start_execution(
                "mp-rounds", {"tag": tag, "rounds": rounds, "width": 3})
            started.set()
            done = 0
            while isinstance(event, Paused):
                if n % 2 and done == 3:
                    await switched.wait()
                await asyncio.sleep(0.05)  # the host thinking, not synchronisation
                for q in reversed(event.queries):
                    event = await reg.feed_response(sid, q.id, answer_for(q.prompt))
                done += 1
            return event

        runs = [asyncio.create_task(host(n, tag)) for n, tag in enumerate(tags)]
        await started.wait()
        sentinel_group.failover()
        await assert_eventually(lambda: sentinel_group.primary_port() != before, timeout=15,
                                message="Sentinel did not fail over")
        switched.set()
        assert not all(run.done() for run in runs), "every session ended before the switch"
        results = await asyncio.gather(*runs)
        for tag, event in zip(tags, results, strict=True):
            assert isinstance(event, Finished) and event.state is Phase.COMPLETED, event
            assert event.result["rounds"] == expected_rounds(tag, rounds, 3, answer_for), tag
        # And the next session goes to the new primary at once.
        _, event = await reg.start_execution("mp-rounds", {"tag": "after", "rounds": 1,
                                                           "width": 1})
        assert isinstance(event, Paused)
    finally:
        await cluster.aclose()


async def test_with_wait_replicas_every_acknowledged_change_is_on_the_replica(
    sentinel_group: SentinelGroup,
) -> None:
    """``wait_replicas=1``: a session runs as usual, and what a caller was told is on the
    replica by then; with the replica frozen, a feed is applied but the caller gets the
    typed ``NotReplicated`` (not a hang, not a raw error), so does a caller waiting for the
    pause a worker then commits, and the session carries on once the replica is back."""
    sentinel_group.wait_linked()

    def replicating() -> bool:  # the replica acknowledges writes (settled after a failover)
        with redis.Redis(host="127.0.0.1", port=sentinel_group.primary_port(),
                         socket_timeout=3) as r:
            r.set("tsentinel:probe", "1")
            return bool(r.execute_command("WAIT", 1, 500) >= 1)

    await assert_eventually(replicating, timeout=20, message="the replica acknowledges WAIT")
    cluster = InProcessCluster.real(sentinel_group.url, settings().with_(
        wait_replicas=1, wait_replicas_timeout_ms=1500))
    replica = sentinel_group.current_replica()
    try:
        await cluster.worker(concurrency=4)
        reg = cluster.registry()
        sid, event = await reg.start_execution("mp-rounds", {"tag": "w", "rounds": 2,
                                                             "width": 1})
        assert isinstance(event, Paused)
        with redis.Redis(host="127.0.0.1", port=replica.port, socket_timeout=2) as r:
            assert r.hget(reg.keys.session(sid).session, "phase") == b"paused"
        replica.pause()
        try:
            with pytest.raises(NotReplicated, match="replica"):
                await reg.feed_response(sid, "q-0", answer_for(event.queries[0].prompt))
            # A worker applies the round on the primary, but no host is told its next pause
            # while the replica lacks it: a failover now would take it back.
            with pytest.raises(NotReplicated, match="replica"):
                await reg.wait_event(sid, timeout=20)
            assert await reg.redis.execute("HGET", reg.keys.session(sid).session,
                                           "asked") == b"2", "the worker's step never landed"
        finally:
            replica.resume()
        event = await reg.wait_event(sid, timeout=20)  # the answer was applied all the same
        assert isinstance(event, Paused) and event.queries[0].prompt == prompt_for("w", 1, 0)
        done = await reg.feed_response(sid, "q-0", answer_for(event.queries[0].prompt))
        assert isinstance(done, Finished) and done.state is Phase.COMPLETED, done
        assert done.result["rounds"] == expected_rounds("w", 2, 1, answer_for)
    finally:
        await cluster.aclose()
