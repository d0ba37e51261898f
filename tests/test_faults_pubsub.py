"""Lost pub/sub (issue 3, item 5): ``CLIENT KILL TYPE pubsub`` while a caller waits in
``feed_response`` / ``wait_event`` and while a worker holds a live execution. Both must still
get their events, promptly.

Pub/sub only wakes waiters; a waiter also re-checks Redis every ``wait_slice_s``. To prove the
multiplexer's own recovery (re-subscribe, then ``RESYNC`` to every waiter) and not the slice
timer, these tests set ``wait_slice_s`` to 30 s (and the waits' own timeout to 60 s) and
expect every event within 15 s: an event lost without a RESYNC shows as a timeout.

"Forced gap" tests block this process's event loop from the kill until the event has been
published (by another process, or by a feed run on another thread), so the event is sent
while this process's subscriptions are certainly down: the case a dropped connection creates.
Real redis-server (a private one: the kill hits every pub/sub client of the server);
registries and the live-holding worker run in this process so their counters are visible.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import redis

from coordinator.errors import WaitTimeout
from coordinator.models import Finished, LlmQuery, Paused
from coordinator.registry import SessionRegistry
from coordinator.settings import Settings
from coordinator.states import Phase
from coordinator.transport import RESYNC, Multiplexer, Target
from tests.helpers import GATES, Gate, assert_eventually
from tests.procs import FAST_ENV, InProcessCluster, WorkerPool
from tests.redis_proc import RedisProcess
from tests.strategies_mp import hold_keys
from workers import strategy
from workers.context import Context

pytestmark = [pytest.mark.redis]

#: Longer than every bound below: only a delivered message or a RESYNC can wake a waiter.
SLICE_S = 30.0
WAIT_TIMEOUT_S = 60.0
BOUND_S = 15.0


async def within(aw: Any, what: str, *muxes: Any) -> Any:
    """``aw``'s result within BOUND_S, or a failure saying what was missed."""
    try:
        return await asyncio.wait_for(aw, BOUND_S)
    except (TimeoutError, WaitTimeout) as exc:
        counts = ", ".join(str(m.reconnects) for m in muxes)
        raise AssertionError(
            f"{what} did not get its event within {BOUND_S:g} s after the pub/sub kill; it "
            f"was not told to re-check (multiplexer reconnects counted: {counts or '-'})"
        ) from exc




@strategy("tps-gated")
async def tps_gated(ctx: Context, tag: str = "", **_: Any) -> dict[str, str]:
    """Two questions; the live step after the first answer waits at the test's gate."""
    first = await ctx.llm(f"{tag} first")
    if not ctx.replaying and tag in GATES:
        GATES[tag].entered.set()
        await GATES[tag].open.wait()
    second = await ctx.llm(f"{tag} second after {first}")
    return {"first": first, "second": second}




class Cluster(InProcessCluster):
    """In-process registries and workers on a private server, and an admin connection."""

    def __init__(self, url: str) -> None:
        super().__init__(Settings(url=url, namespace=f"ps{secrets.token_hex(4)}",
                                  wait_slice_s=SLICE_S, wait_timeout_s=WAIT_TIMEOUT_S), url=url)
        self.admin = redis.Redis.from_url(url, socket_timeout=BOUND_S + 5)

    def kill_pubsub(self) -> int:
        """``CLIENT KILL TYPE pubsub``: drop every pub/sub connection of the server."""
        killed: int = self.admin.client_kill_filter(_type="pubsub")
        return killed

    def subscribers(self, channel: str) -> int:
        ((_, count),) = self.admin.pubsub_shardnumsub(channel)
        return int(count)

    async def aclose(self) -> None:
        await super().aclose()
        self.admin.close()


@pytest.fixture
async def cluster(redis_server: RedisProcess) -> AsyncIterator[Cluster]:
    c = Cluster(redis_server.url)
    try:
        yield c
    finally:
        await c.aclose()


@contextlib.asynccontextmanager
async def multiplexer(url: str, home: str, **options: Any) -> AsyncIterator[Multiplexer]:
    """A multiplexer on a pool of its own (as ``Transport.multiplexer`` builds one, with the
    options that does not expose); closed, with its pool, on exit."""
    target = Target.parse(url)
    pool = target.pool()
    mux = Multiplexer(pool, home, safe_url=target.safe_url, **options)
    try:
        yield mux
    finally:
        await mux.aclose()
        await pool.disconnect()


def expected_pause(tag: str, first: str) -> Paused:
    return Paused((LlmQuery(id="q-0", prompt=f"{tag} second after {first}"),))


# -- the multiplexer itself -------------------------------------------------------------------


async def test_multiplexer_counts_the_reconnect_and_resyncs_its_waiters(
    cluster: Cluster,
) -> None:
    channel = f"{cluster.settings.namespace}:test-channel"
    async with multiplexer(cluster.url, f"{cluster.settings.namespace}:proc:test") as mux:
        sub = await mux.subscribe(channel)
        assert mux.reconnects == 0
        assert cluster.kill_pubsub() == 1
        got = await sub.get(BOUND_S)
        assert got is RESYNC, (
            f"after its pub/sub connection was killed the waiter got {got!r}, not RESYNC "
            f"(reconnects={mux.reconnects}): a message published in the gap would be lost "
            "until the waiter's wait slice ends"
        )
        assert mux.reconnects == 1
        # The subscription is live again: the next message arrives.
        assert cluster.subscribers(channel) == 1
        cluster.admin.spublish(channel, b"after")
        assert await sub.get(BOUND_S) == b"after"
        sub.close()


async def test_multiplexer_keeps_lingering_channels_warm_across_kills(cluster: Cluster) -> None:
    """A lingering (released, not yet unsubscribed) channel is re-subscribed with the rest, so
    it stays warm and its pending RESYNC cannot stop later reconnects from being counted; on
    close, Redis no longer counts the multiplexer as a listener."""
    warm, live = (f"{cluster.settings.namespace}:{name}" for name in ("warm", "live"))
    home = f"{cluster.settings.namespace}:proc:test"
    async with multiplexer(cluster.url, home, linger_s=600) as mux:
        (await mux.subscribe(warm)).close()
        sub = await mux.subscribe(live)
        for kills in (1, 2):
            assert cluster.kill_pubsub() == 1
            assert await sub.get(BOUND_S) is RESYNC
            assert mux.reconnects == kills
            # One SUBSCRIBE carried every channel: confirmed one, confirmed all.
            assert cluster.subscribers(warm) == 1
        async with await mux.subscribe(warm) as again:
            cluster.admin.spublish(warm, b"still warm")
            assert await again.get(BOUND_S) == b"still warm"
    await assert_eventually(lambda: cluster.subscribers(live) == 0, timeout=BOUND_S,
                            message="the closed multiplexer is still subscribed")


async def test_subscribe_racing_a_kill_is_confirmed_on_the_new_connection(
    cluster: Cluster,
) -> None:
    """SUBSCRIBE written to a connection that is already dead (its loss not yet seen) is sent
    again on the new one: the caller gets a working subscription, not a WaitTimeout."""
    channel = f"{cluster.settings.namespace}:late"
    async with multiplexer(cluster.url, f"{cluster.settings.namespace}:proc:test") as mux:
        await mux.start()
        assert cluster.kill_pubsub() == 1  # this loop has not run since: the loss is unseen
        sub = await within(mux.subscribe(channel), "the racing subscribe", mux)
        assert mux.reconnects == 1
        cluster.admin.spublish(channel, b"hello")
        assert await sub.get(BOUND_S) == b"hello"


async def test_multiplexer_reads_bursts_and_large_messages(cluster: Cluster) -> None:
    """Many pushes in one read and one push over many reads are all delivered, in order."""
    channel = f"{cluster.settings.namespace}:burst"
    sent = [b"small-%d" % n for n in range(20)] + [b"x" * (3 * 1024 * 1024)] + [b"last"]
    home = f"{cluster.settings.namespace}:proc:test"
    async with multiplexer(cluster.url, home) as mux, await mux.subscribe(channel) as sub:
        pipe = cluster.admin.pipeline(transaction=False)
        for payload in sent:
            pipe.spublish(channel, payload)
        pipe.execute()
        got = [await sub.get(BOUND_S) for _ in sent]
        assert got == sent


# -- natural timing: kill while they wait -------------------------------------------------------


async def test_waiting_callers_and_the_live_holder_get_their_events_after_pubsub_kills(
    cluster: Cluster, gates: dict[str, Gate]
) -> None:
    feeder, watcher = cluster.registry(), cluster.registry()
    worker = await cluster.worker()
    tag = "natural"
    sid, first = await feeder.start_execution("tps-gated", {"tag": tag})
    assert first == Paused((LlmQuery(id="q-0", prompt=f"{tag} first"),))
    channel = feeder.keys.session(sid).channel

    # 1. Callers waiting: one in feed_response (it fed the last answer), one in wait_event,
    #    while the worker's step runs; then every pub/sub connection is killed.
    GATES[tag] = gate = Gate()
    feeding = asyncio.create_task(feeder.feed_response(sid, "q-0", "A1"))
    await asyncio.wait_for(gate.entered.wait(), BOUND_S)
    waiting = asyncio.create_task(watcher.wait_event(sid))
    await assert_eventually(lambda: cluster.subscribers(channel) == 2, timeout=BOUND_S,
                            message="the two callers are not both subscribed")
    assert cluster.kill_pubsub() >= 3  # the two callers' and the worker's connections
    gate.open.set()
    expected = expected_pause(tag, "A1")
    assert await within(feeding, "the caller in feed_response", feeder.mux) == expected
    assert await within(waiting, "the caller in wait_event", watcher.mux) == expected

    # 2. The worker holds the paused execution live; kill again, then feed: its nudge must
    #    reach it (after re-subscribing, or through a RESYNC re-check of the stream).
    assert (await feeder.status(sid))["phase"] == "paused"
    assert cluster.kill_pubsub() >= 1
    done = await within(feeder.feed_response(sid, "q-0", "A2"),
                        "the worker holding the live execution", worker.mux)
    assert isinstance(done, Finished) and done.state is Phase.COMPLETED, done
    assert done.result == {"first": "A1", "second": "A2"}
    assert (worker.stats.live_resumes, worker.stats.replays) == (2, 0), worker.stats
    assert await watcher.wait_event(sid) == done

    for name, mux in (("feeder", feeder.mux), ("watcher", watcher.mux),
                      ("worker", worker.mux)):
        assert mux.reconnects >= 1, f"the {name}'s multiplexer did not count its reconnect"


# -- forced gap: the event is published while this process's subscriptions are down -----------


def publish_seen(url: str, channel: str, trigger: Any) -> bytes:
    """Subscribe a fresh (untouched) connection to ``channel``, call ``trigger()``, and block
    until a message arrives on it: the event this process's own waiters should get."""
    client = redis.Redis.from_url(url, socket_timeout=BOUND_S + 5)
    ps = client.pubsub()
    try:
        ps.ssubscribe(channel)
        while (msg := ps.get_message(timeout=BOUND_S)) is not None and msg["type"] != "ssubscribe":
            pass
        trigger()
        while (msg := ps.get_message(timeout=BOUND_S)) is not None:
            if msg["type"] == "smessage":
                data: bytes = msg["data"]
                return data
        raise AssertionError(f"nothing was published on {channel}")
    finally:
        ps.close()
        client.close()


@pytest.mark.slow
async def test_event_published_while_callers_are_disconnected_still_reaches_them(
    cluster: Cluster, tmp_path: Path
) -> None:
    pool = WorkerPool(cluster.url, cluster.settings.namespace, tmp_path, env=dict(FAST_ENV))
    feeder, watcher = cluster.registry(), cluster.registry()
    try:
        await pool.start(concurrency=2)
        tag = f"{cluster.settings.namespace}-gap"
        hold = hold_keys(tag)
        sid, first = await feeder.start_execution("mp-hold", {"tag": tag, "url": cluster.url})
        assert isinstance(first, Paused), first
        channel = feeder.keys.session(sid).channel
        feeding = asyncio.create_task(feeder.feed_response(sid, "q-0", "A1"))
        entered = await asyncio.to_thread(cluster.admin.blpop, [hold["entered"]], BOUND_S)
        assert entered is not None, pool.logs()
        waiting = asyncio.create_task(watcher.wait_event(sid))
        await assert_eventually(lambda: cluster.subscribers(channel) == 2, timeout=BOUND_S)

        # Blocking this event loop: kill, let the worker process commit, see it published.
        assert cluster.kill_pubsub() >= 2
        event = publish_seen(cluster.url, channel,
                             lambda: cluster.admin.rpush(hold["go"], "go"))
        assert event, "the worker's commit published nothing"

        expected = Paused((LlmQuery(id="q-0", prompt=f"{tag} second after A1"),))
        assert await within(feeding, "the caller in feed_response", feeder.mux) == expected
        assert await within(waiting, "the caller in wait_event", watcher.mux) == expected
        done = await feeder.feed_response(sid, "q-0", "A2")
        assert isinstance(done, Finished) and done.result == {
            "tag": tag, "first": "A1", "second": "A2"}, done
    finally:
        pool.close()


async def test_nudge_published_while_the_live_holder_is_disconnected_still_reaches_it(
    cluster: Cluster,
) -> None:
    host = cluster.registry(wait_slice_s=1.0)  # only the worker's recovery is under test
    worker = await cluster.worker()
    tag = "gap-holder"
    sid, first = await host.start_execution("tps-gated", {"tag": tag})
    assert isinstance(first, Paused)
    done1 = await host.feed_response(sid, "q-0", "A1")
    assert done1 == expected_pause(tag, "A1")
    assert worker.stats.live_resumes == 1

    async def feed_elsewhere() -> None:
        async with SessionRegistry.from_url(cluster.url, namespace=cluster.settings.namespace,
                                            wait_slice_s=0.05) as other:
            # WaitTimeout expected: the worker cannot step while this loop is blocked.
            with contextlib.suppress(WaitTimeout):
                await other.feed_response(sid, "q-0", "A2", timeout=0.3)

    # Blocking this event loop: kill, then feed the last answer from another thread (its own
    # loop and connections): the nudge goes out while the worker cannot hear it.
    assert cluster.kill_pubsub() >= 2
    feeder = threading.Thread(target=lambda: asyncio.run(feed_elsewhere()))
    feeder.start()
    feeder.join(BOUND_S)
    assert not feeder.is_alive()
    assert (await host.status(sid))["phase"] == "running"

    done = await within(host.wait_event(sid), "the worker holding the live execution",
                        worker.mux)
    assert isinstance(done, Finished) and done.state is Phase.COMPLETED, done
    assert done.result == {"first": "A1", "second": "A2"}
    assert (worker.stats.live_resumes, worker.stats.replays) == (2, 0), worker.stats
    assert worker.mux.reconnects >= 1
