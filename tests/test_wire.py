"""The pipelined script connection (``coordinator.wire``) against a real redis-server."""

from __future__ import annotations

import asyncio

import pytest
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from coordinator.scripts import Scripts
from coordinator.settings import connect
from coordinator.wire import Wire

pytestmark = pytest.mark.redis

ECHO = "return {KEYS[1], ARGV[1], tonumber(ARGV[2]) * 2}"


async def test_concurrent_calls_each_get_their_own_reply(redis_url: str) -> None:
    client = connect(redis_url)
    wire = Wire.for_client(client)
    assert wire is not None
    try:
        sha = await client.script_load(ECHO)
        replies = await asyncio.gather(*(
            wire.execute("EVALSHA", sha, 1, f"k{i}", f"v{i}" * (i % 7), i) for i in range(500)
        ))
        assert replies == [[f"k{i}".encode(), (f"v{i}" * (i % 7)).encode(), 2 * i]
                           for i in range(500)]
    finally:
        await wire.aclose()
        await client.aclose()


async def test_errors_come_back_typed_and_the_connection_stays_in_step(redis_url: str) -> None:
    client = connect(redis_url)
    wire = Wire.for_client(client)
    assert wire is not None
    try:
        bad, good = await asyncio.gather(
            wire.execute("EVAL", "return redis.error_reply('ERR nope')", 0),
            wire.execute("EVAL", "return 7", 0), return_exceptions=True)
        assert isinstance(bad, ResponseError) and "nope" in str(bad)
        assert good == 7
    finally:
        await wire.aclose()
        await client.aclose()


async def test_a_killed_connection_is_replaced_and_calls_in_flight_are_retried(
    redis_url: str,
) -> None:
    client = connect(redis_url)
    wire = Wire.for_client(client)
    killer = Redis.from_url(redis_url)
    assert wire is not None
    try:
        await wire.execute("SET", "wire:n", 0)
        # a blocked call, and 200 queued behind it on the same connection (Redis reads them
        # only once the BLPOP returns), when the connection is cut
        blocked = asyncio.ensure_future(wire.execute("BLPOP", "wire:never", 1))
        calls = [asyncio.ensure_future(wire.execute("INCR", "wire:n")) for _ in range(200)]

        async def blocked_on_server() -> bool:
            return any(c.get("cmd") == "blpop" for c in await killer.client_list())

        for _ in range(500):
            if await blocked_on_server():
                break
            await asyncio.sleep(0.01)  # polling the server's client list, not a sync stand-in
        killed = await killer.execute_command("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes")
        assert killed >= 1
        results = await asyncio.gather(*calls)
        assert await blocked is None  # retried on the new connection, timed out empty
        # every queued call failed with the connection and was sent again, exactly once
        assert sorted(results) == list(range(1, 201))
        assert int(await wire.execute("GET", "wire:n")) == 200
    finally:
        await wire.aclose()
        await client.aclose()
        await killer.aclose()


async def test_scripts_reload_after_a_script_flush(redis_url: str) -> None:
    client = connect(redis_url)
    scripts = Scripts(client)
    try:
        reply = await scripts.call_raw("lock_release", ["wire:lock"], ["token", "wire:chan"])
        assert reply == 0  # not held: nothing released
        await client.script_flush()
        assert await scripts.call_raw("lock_release", ["wire:lock"], ["token", "wire:chan"]) == 0
    finally:
        await scripts.aclose()
        await client.aclose()


def test_fakeredis_clients_keep_going_through_redis_py() -> None:
    import fakeredis

    assert Wire.for_client(fakeredis.FakeAsyncRedis()) is None


async def test_calls_without_a_reply_time_out_and_the_connection_is_replaced(
    redis_url: str,
) -> None:
    """One watchdog bounds every call in flight: a server that stops answering (here a
    BLOCKing call outliving the bound) drops the connection and fails the calls."""
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff
    from redis.exceptions import TimeoutError as RedisTimeoutError

    client = connect(redis_url)
    wire = Wire(client, reply_timeout_s=0.4)
    wire._retry = Retry(NoBackoff(), 0)  # see the failure itself, not its retry
    try:
        blocked = asyncio.ensure_future(wire.execute("BLPOP", "wire:never", 5))
        behind = asyncio.ensure_future(wire.execute("PING"))
        for call in (blocked, behind):
            with pytest.raises(RedisTimeoutError):
                await asyncio.wait_for(call, 4)
        assert await wire.execute("PING") == b"PONG"  # a fresh connection
    finally:
        await wire.aclose()
        await client.aclose()
