"""``GET /events``: the namespace's activity as server-sent events (``coordinator.http_activity``).

Each test runs on fakeredis, on a 4-shard namespace, on a real redis-server and on a Redis
Cluster, with an in-process worker behind the app: a start, a pause, a round answered
(only its last answer moves the session), the end and a cancel each arrive as one ``session``
event with the right phase, and the counts follow. The stream coalesces its counts, and when
its client goes it ends and leaves no subscription behind (``PUBSUB SHARDNUMSUB``), through
the ASGI disconnect here and through a real socket under uvicorn.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest

from coordinator.http_activity import activity_stream
from coordinator.http_api import create_app
from coordinator.registry import SessionRegistry
from tests.asgi_stream import KEEPALIVE, AsgiStream
from tests.conftest import FakeCluster
from tests.helpers import assert_eventually
from workers import strategy
from workers.context import Context

ON_BOTH_SERVERS = True
SHARDED_TOO = True
ON_CLUSTER_TOO = True

WAIT_S = 20.0
ROUNDS = "tact-rounds"
ZERO = {"running": 0, "paused": 0, "completed": 0, "failed": 0, "cancelled": 0}


@strategy(ROUNDS)
async def tact_rounds(ctx: Context, **_: Any) -> str:
    """A batch of three, then one more question, then the end."""
    first = await ctx.llm_batch(["a?", "b?", "c?"])
    return await ctx.llm("d?") + "|" + ",".join(first)


class RawSse(AsgiStream):
    """``GET /events`` straight on the ASGI app: the test decides when the client goes
    (``close`` sends ``http.disconnect`` and returns once the handler has finished)."""

    def __init__(self, app: Any, path: str = "/events") -> None:
        super().__init__(app, path, wait_s=WAIT_S)

    async def next(self) -> tuple[str, Any] | None:
        """The next (event, data), ("keep-alive", None), or None at the stream's end."""
        fields = await self.block()
        if fields is None or fields == KEEPALIVE:
            return None if fields is None else (KEEPALIVE, None)
        assert isinstance(fields, dict) and set(fields) == {"event", "data"}, fields  # no ids
        return fields["event"], json.loads(fields["data"])

    async def session(self) -> tuple[str, str]:
        """The next ``session`` event as (session id, phase), past counts and keep-alives."""
        while True:
            item = await self.next()
            assert item is not None, "the stream ended"
            if item[0] == "session":
                assert set(item[1]) == {"session_id", "phase"}, item
                return item[1]["session_id"], item[1]["phase"]

    async def counts_until(self, want: dict[str, int]) -> None:
        """Read on until a ``counts`` event shows ``want``; fails (bounded) otherwise."""
        seen: list[Any] = []

        async def read() -> None:
            while True:
                item = await self.next()
                assert item is not None, f"the stream ended; counts seen: {seen}"
                if item[0] == "counts":
                    seen.append(item[1])
                    if item[1] == {"counts": want,
                                   "active_sessions": want["running"] + want["paused"]}:
                        return

        try:
            await asyncio.wait_for(read(), WAIT_S)
        except TimeoutError:
            raise AssertionError(f"no counts event showed {want}; seen: {seen}") from None


@asynccontextmanager
async def app_on(cluster: FakeCluster) -> AsyncIterator[tuple[Any, httpx.AsyncClient]]:
    """The API over ``cluster`` (lifespan run), and an httpx client on it."""
    app = create_app(lambda: cluster.registry(), keepalive_s=0.3)
    async with (app.router.lifespan_context(app),
                httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                  base_url="http://api", timeout=WAIT_S) as c):
        yield app, c


def counts(**nonzero: int) -> dict[str, int]:
    return {**ZERO, **nonzero}


async def subscribers(reg: SessionRegistry) -> list[int]:
    """Subscribers of each shard's activity channel."""
    shards = await reg.services.ready()
    out = []
    for shard in shards.keys:
        _, n = await reg.redis.execute("PUBSUB", "SHARDNUMSUB", shard.activity)
        out.append(int(n))
    return out


async def test_each_phase_change_is_one_session_event_and_the_counts_follow(
    fake_cluster: FakeCluster,
) -> None:
    await fake_cluster.worker()
    async with app_on(fake_cluster) as (app, c):
        stream = RawSse(app)
        try:
            assert await asyncio.wait_for(stream.status, WAIT_S) == 200
            assert await stream.next() == ("counts", {"counts": ZERO, "active_sessions": 0})

            res = await c.post("/sessions", json={"strategy": ROUNDS, "input": {}})
            assert res.status_code == 201, res.text
            sid = res.json()["session_id"]
            assert await stream.session() == (sid, "running")  # the start
            assert await stream.session() == (sid, "paused")  # its first pause
            await stream.counts_until(counts(paused=1))

            # two answers of three change no phase; the third moves it on
            for qid in ("q-2", "q-0", "q-1"):
                res = await c.post(f"/sessions/{sid}/responses",
                                   json={"query_id": qid, "response": qid})
                assert res.status_code == 200, res.text
            assert res.json()["status"] == "needs_response"
            assert await stream.session() == (sid, "running")
            assert await stream.session() == (sid, "paused")
            res = await c.post(f"/sessions/{sid}/responses", json={"response": "d"})
            assert res.json()["status"] == "completed", res.text
            assert await stream.session() == (sid, "running")
            assert await stream.session() == (sid, "completed")
            await stream.counts_until(counts(completed=1))

            other = (await c.post("/sessions", json={"strategy": ROUNDS,
                                                     "input": {}})).json()["session_id"]
            assert await stream.session() == (other, "running")
            assert await stream.session() == (other, "paused")
            assert (await c.delete(f"/sessions/{other}")).status_code == 200
            assert await stream.session() == (other, "cancelled")
            await stream.counts_until(counts(completed=1, cancelled=1))
        finally:
            await stream.close()


async def test_an_expired_session_is_a_failed_event(fake_cluster: FakeCluster) -> None:
    await fake_cluster.worker()
    async with app_on(fake_cluster) as (app, c):
        stream = RawSse(app)
        try:
            assert (await stream.next() or ("",))[0] == "counts"
            sid = (await c.post("/sessions", json={"strategy": ROUNDS, "input": {},
                                                   "ttl": 60})).json()["session_id"]
            assert await stream.session() == (sid, "running")
            assert await stream.session() == (sid, "paused")
            reg = fake_cluster.registry()
            # the GC's clock an hour on: the idle session expires (terminate.lua's expire)
            at = int(await reg.redis.execute("HGET", reg.keys.session(sid).session,
                                             "last_activity_at"))
            assert await reg.gc_sweep(now_ms=at + 3_600_000) == [sid]
            assert await stream.session() == (sid, "failed")
            await stream.counts_until(counts(failed=1))
        finally:
            await stream.close()


async def test_counts_are_coalesced_and_session_events_are_not(
    fake_cluster: FakeCluster,
) -> None:
    """With the counts held back (at most one an hour), a burst of starts is a session
    event each and no counts: a quiet slice after it is a keep-alive."""
    reg = fake_cluster.registry()
    events = activity_stream(reg, keepalive_s=0.2, counts_every_s=3600.0)
    try:
        first = await asyncio.wait_for(anext(events), WAIT_S)
        assert first.startswith("event: counts\n")
        sids = [str(await reg.submit(ROUNDS, {})) for _ in range(20)]  # no worker
        got = [await asyncio.wait_for(anext(events), WAIT_S) for _ in sids]
        assert [frame.split("\n")[0] for frame in got] == ["event: session"] * 20
        assert [json.loads(frame.split("data: ", 1)[1]) for frame in got] == [
            {"session_id": sid, "phase": "running"} for sid in sids]
        assert await asyncio.wait_for(anext(events), WAIT_S) == ": keep-alive\n\n"
    finally:
        await events.aclose()
    assert (await reg.counts())["running"] == 20


async def test_a_quiet_stream_sends_counts_only_when_they_changed(
    fake_cluster: FakeCluster,
) -> None:
    """A change the stream did not hear of (here: an index written behind its back, as a
    message lost to a reconnect would leave it) shows up at the next quiet slice's
    re-check; an unchanged namespace is keep-alives only."""
    reg = fake_cluster.registry()
    events = activity_stream(reg, keepalive_s=0.1)
    try:
        assert (await asyncio.wait_for(anext(events), WAIT_S)).startswith("event: counts\n")
        assert await asyncio.wait_for(anext(events), WAIT_S) == ": keep-alive\n\n"
        shard = (await reg.services.ready()).keys[0]
        await reg.redis.execute("ZADD", shard.running, 1, "s-ghost")
        frame = await asyncio.wait_for(anext(events), WAIT_S)
        assert frame.startswith("event: counts\n"), frame
        assert json.loads(frame.split("data: ", 1)[1])["counts"]["running"] == 1
    finally:
        await events.aclose()


async def test_the_stream_ends_with_its_client_and_unsubscribes(
    fake_cluster: FakeCluster,
) -> None:
    reg = fake_cluster.registry()
    async with app_on(fake_cluster) as (app, _):
        stream = RawSse(app)
        assert (await stream.next() or ("",))[0] == "counts"
        # subscribed on every shard before the counts were read
        assert all(n == 1 for n in await subscribers(reg)), await subscribers(reg)
        await stream.close()  # returns once the handler has finished
        assert stream.task.done() and stream.task.exception() is None
        # released: after the multiplexer's linger, Redis counts nobody on the channels
        await assert_eventually(lambda: _all_zero(reg), timeout=WAIT_S,
                                message="activity subscriptions left after the client went")


async def _all_zero(reg: SessionRegistry) -> bool:
    return all(n == 0 for n in await subscribers(reg))


@pytest.mark.redis
async def test_a_real_client_going_away_ends_the_stream(redis_url: str) -> None:
    """Under uvicorn, with a real socket: the client reads the first counts and goes; the
    server's stream ends and its subscription is released."""
    import secrets

    from tests.test_http_api import served

    ns = f"t{secrets.token_hex(4)}"
    app = create_app(lambda: SessionRegistry.from_url(redis_url, namespace=ns),
                     keepalive_s=0.2)
    async with (SessionRegistry.from_url(redis_url, namespace=ns) as probe, served(app) as base,
                httpx.AsyncClient(base_url=base, timeout=WAIT_S) as c):
        async with c.stream("GET", "/events") as res:
            assert res.status_code == 200
            assert res.headers["content-type"].startswith("text/event-stream")
            lines = res.aiter_lines()
            assert await anext(lines) == "event: counts"
            assert json.loads((await anext(lines)).removeprefix("data: ")) == {
                "counts": ZERO, "active_sessions": 0}
            assert await subscribers(probe) == [1]
        # the response is closed: the server notices, and lets go of the channel
        await assert_eventually(lambda: _all_zero(probe), timeout=WAIT_S,
                                message="the server kept its activity subscription")
