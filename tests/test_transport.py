"""The one seam to Redis (``coordinator.transport``) against a real redis-server.

What it promises (``coordinator/transport/client.py``, ``pipe.py``): commands issued together
share one connection and each caller gets its own reply; error replies come back typed and
leave the connection in step; a broken connection fails the calls in flight, they are retried
within the call's budget and the next call reconnects; a flushed script is loaded again; a
push frame is never taken for a reply; and every call is bounded, raising only
``SessionError`` subclasses (``Unavailable``, ``Misconfigured``, ``InvalidInput``).

Timing asserts here are generous upper bounds that prove a call is bounded, not speed.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from coordinator.errors import (
    InvalidInput,
    Misconfigured,
    SessionError,
    Unavailable,
    WaitTimeout,
)
from coordinator.keys import Keys
from coordinator.registry import SessionRegistry
from coordinator.scripts import Scripts
from coordinator.settings import Settings
from coordinator.transport import Target, Transport
from coordinator.transport.pipe import Pipe, pack
from tests.helpers import free_port
from tests.redis_proc import RedisProcess

pytestmark = pytest.mark.redis

ECHO = "return {KEYS[1], ARGV[1], tonumber(ARGV[2]) * 2}"
#: The bound the freeze tests give each call, and the slack a slow box gets on top of it.
TIMEOUT_S = 1.5
SLACK_S = 3.0


@contextlib.asynccontextmanager
async def transport(url: str, timeout_s: float = 5.0) -> AsyncIterator[Transport]:
    t = Transport.from_url(url, timeout_s=timeout_s)
    try:
        yield t
    finally:
        await t.aclose()


# -- pipelining, replies, errors -------------------------------------------------------------


async def test_concurrent_calls_each_get_their_own_reply(redis_url: str) -> None:
    async with transport(redis_url) as t:
        sha = await t.execute("SCRIPT", "LOAD", ECHO)
        replies = await asyncio.gather(*(
            t.execute("EVALSHA", sha, 1, f"k{i}", f"v{i}" * (i % 7), i) for i in range(500)
        ))
        assert replies == [[f"k{i}".encode(), (f"v{i}" * (i % 7)).encode(), 2 * i]
                           for i in range(500)]
        # and they were pipelined: one connection carried them all
        observer = Redis.from_url(redis_url)
        try:
            clients = await observer.client_list()
        finally:
            await observer.aclose()
        assert sum(1 for c in clients if c.get("cmd") == "evalsha") == 1


async def test_a_batch_gets_every_reply_in_order_with_errors_as_objects(redis_url: str) -> None:
    async with transport(redis_url) as t:
        replies = await t.execute_many([
            ("SET", "tr:a", "1"),
            ("EVAL", "return redis.error_reply('ERR nope')", 0),
            ("INCR", "tr:a"),
            ("GET", "tr:a"),
        ])
        assert replies[0] == b"OK"
        assert isinstance(replies[1], ResponseError) and "nope" in str(replies[1])
        assert replies[2:] == [2, b"2"]
        assert await t.execute_many([]) == []


async def test_errors_come_back_typed_and_the_connection_stays_in_step(redis_url: str) -> None:
    async with transport(redis_url) as t:
        bad, good = await asyncio.gather(
            t.execute("EVAL", "return redis.error_reply('ERR nope')", 0),
            t.execute("EVAL", "return 7", 0), return_exceptions=True)
        # an error reply is a SessionError (not redis-py's), and the next reply is not shifted
        assert isinstance(bad, SessionError) and "nope" in str(bad)
        assert good == 7
        assert await t.execute("PING") == b"PONG"
        # WRONGTYPE means a key holds data we did not write
        await t.execute("SET", "tr:str", "x")
        with pytest.raises(SessionError, match="WRONGTYPE"):
            await t.execute("HGETALL", "tr:str")


async def test_the_trace_hook_sees_each_command_once_its_reply_came(redis_url: str) -> None:
    async with transport(redis_url) as t:
        seen: list[tuple[Any, ...]] = []
        t.trace = seen.append
        await t.execute("SET", "tr:t", "1")
        await t.execute_many([("GET", "tr:t"), ("DEL", "tr:t")])
        assert seen == [("SET", "tr:t", "1"), ("GET", "tr:t"), ("DEL", "tr:t")]


async def test_a_killed_connection_is_replaced_and_calls_in_flight_are_retried(
    redis_url: str,
) -> None:
    killer = Redis.from_url(redis_url)
    try:
        async with transport(redis_url) as t:
            await t.execute("SET", "tr:n", 0)
            # a blocked call, and 200 queued behind it on the same connection (Redis reads
            # them only once the BLPOP returns), when the connection is cut
            blocked = asyncio.ensure_future(t.execute("BLPOP", "tr:never", 1))
            calls = [asyncio.ensure_future(t.execute("INCR", "tr:n")) for _ in range(200)]
            await _until_blocked(killer)
            killed = await killer.execute_command("CLIENT", "KILL", "TYPE", "normal",
                                                  "SKIPME", "yes")
            assert killed >= 1
            results = await asyncio.gather(*calls)
            assert await blocked is None  # retried on the new connection, timed out empty
            # every queued call failed with the connection and was sent again, exactly once
            assert sorted(results) == list(range(1, 201))
            assert int(await t.execute("GET", "tr:n")) == 200
    finally:
        await killer.aclose()


async def test_a_broken_pipe_fails_calls_in_flight_and_the_next_call_reconnects(
    redis_url: str,
) -> None:
    """The pipe itself (no retries: those are the transport's): a cut connection fails every
    call waiting on it with ``ConnectionError``, and the next call opens a new one."""
    pool = Target.parse(redis_url).pool()
    pipe = Pipe(pool, reply_timeout_s=5.0, connect_timeout_s=2.0)
    killer = Redis.from_url(redis_url)
    try:
        assert await pipe.call(pack(("CLIENT", "ID"))) > 0
        first_id = await pipe.call(pack(("CLIENT", "ID")))
        blocked = asyncio.ensure_future(pipe.call(pack(("BLPOP", "tr:never", 5))))
        behind = [asyncio.ensure_future(pipe.call(pack(("PING",)))) for _ in range(10)]
        await _until_blocked(killer)
        await killer.execute_command("CLIENT", "KILL", "ID", first_id)
        for call in (blocked, *behind):
            with pytest.raises(RedisConnectionError):
                await asyncio.wait_for(call, 4)
        assert await pipe.call(pack(("PING",))) == b"PONG"
        assert await pipe.call(pack(("CLIENT", "ID"))) != first_id  # a fresh connection
    finally:
        await pipe.aclose()
        await pool.disconnect()
        await killer.aclose()


async def test_calls_without_a_reply_time_out_and_the_connection_is_replaced(
    redis_url: str,
) -> None:
    """One watchdog bounds every call in flight: a server that stops answering (here a
    BLOCKing call outliving the bound) drops the connection and fails the calls."""
    pool = Target.parse(redis_url).pool()
    pipe = Pipe(pool, reply_timeout_s=0.4, connect_timeout_s=2.0)
    try:
        first_id = await pipe.call(pack(("CLIENT", "ID")))
        blocked = asyncio.ensure_future(pipe.call(pack(("BLPOP", "tr:never", 5))))
        behind = asyncio.ensure_future(pipe.call(pack(("PING",))))
        for call in (blocked, behind):
            with pytest.raises(RedisTimeoutError):
                await asyncio.wait_for(call, 4)
        assert await pipe.call(pack(("PING",))) == b"PONG"
        assert await pipe.call(pack(("CLIENT", "ID"))) != first_id
    finally:
        await pipe.aclose()
        await pool.disconnect()


async def test_a_call_that_gives_up_leaves_the_connection_in_step(redis_url: str) -> None:
    """A caller's own shorter timeout abandons its reply, not the connection: the reply
    still comes in order and is dropped, and the next caller gets its own."""
    async with transport(redis_url) as t:
        first_id = await t.execute("CLIENT", "ID")
        started = time.monotonic()
        with pytest.raises(Unavailable):
            await t.execute("BLPOP", "tr:never", 1, timeout=0.3)
        assert time.monotonic() - started < 0.3 + SLACK_S
        assert await t.execute("ECHO", "mine") == b"mine"
        assert await t.execute("CLIENT", "ID") == first_id  # the same connection


async def test_scripts_reload_after_a_script_flush(redis_url: str) -> None:
    async with transport(redis_url) as t:
        seen: list[tuple[Any, ...]] = []
        t.trace = seen.append
        scripts = Scripts(t, Keys("tr"))
        assert await scripts.lock_release("tr:lock", token=b"token",
                                          released_channel="tr:chan") is False
        assert [c[:2] for c in seen] == [("SCRIPT", "LOAD"), ("EVALSHA", seen[-1][1])]
        seen.clear()
        assert await scripts.lock_release("tr:lock", token=b"token",
                                          released_channel="tr:chan") is False
        assert [c[0] for c in seen] == ["EVALSHA"]  # loaded: no second load
        await t.execute("SCRIPT", "FLUSH")
        seen.clear()
        # NOSCRIPT -> SCRIPT LOAD -> EVALSHA again, invisibly to the caller
        assert await scripts.lock_release("tr:lock", token=b"token",
                                          released_channel="tr:chan") is False
        assert [c[0] for c in seen] == ["SCRIPT", "EVALSHA"]


async def test_the_in_memory_transport_takes_the_same_path() -> None:
    import fakeredis

    t = Transport.in_memory(fakeredis.FakeServer())
    try:
        assert await t.execute("SET", "k", "v") == b"OK"
        bad, good = await asyncio.gather(t.execute("HGETALL", "k"), t.execute("GET", "k"),
                                         return_exceptions=True)
        assert isinstance(bad, SessionError) and good == b"v"
        assert await t.client.get("k") == b"v"
        scripts = Scripts(t, Keys("tr"))
        assert await scripts.lock_release("tr:lock", token=b"t", released_channel="c") is False
    finally:
        await t.aclose()


# -- push frames -----------------------------------------------------------------------------


class PushingServer:
    """Enough RESP2 for redis-py's handshake (every command it does not know is ``+OK``);
    ``GET k`` is answered with a RESP3 push frame first, then the real reply."""

    PUSH = b">2\r\n$10\r\ninvalidate\r\n*1\r\n$1\r\nk\r\n"

    def __init__(self) -> None:
        self.commands: list[list[bytes]] = []
        self._server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> None:
        self.port = free_port()
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                command = await _read_command(reader)
                if command is None:
                    break
                self.commands.append(command)
                name = command[0].upper()
                if name == b"GET" and command[1:] == [b"k"]:
                    writer.write(self.PUSH + b"$1\r\nv\r\n")
                elif name == b"GET":
                    writer.write(b"$1\r\nw\r\n")
                elif name == b"PING":
                    writer.write(b"+PONG\r\n")
                else:
                    writer.write(b"+OK\r\n")
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()


async def _read_command(reader: asyncio.StreamReader) -> list[bytes] | None:
    line = await reader.readline()
    if not line:
        return None
    assert line.startswith(b"*"), line
    args = []
    for _ in range(int(line[1:])):
        size = int((await reader.readline())[1:])
        args.append((await reader.readexactly(size + 2))[:-2])
    return args


async def test_a_push_frame_is_never_taken_for_a_reply() -> None:
    server = PushingServer()
    await server.start()
    try:
        async with transport(f"redis://127.0.0.1:{server.port}/0", timeout_s=3.0) as t:
            assert await t.execute("GET", "k") == b"v"
            assert await t.execute("GET", "other") == b"w"  # its own reply, not a shifted one
            assert await t.execute("PING") == b"PONG"
            # and pipelined: the push between two replies shifts neither
            assert await asyncio.gather(t.execute("GET", "k"), t.execute("GET", "x"),
                                        t.execute("GET", "k")) == [b"v", b"w", b"v"]
        assert [b"GET", b"k"] in server.commands
    finally:
        await server.close()


# -- bounds: a frozen server, a closed port --------------------------------------------------


async def _until_blocked(client: Redis) -> None:
    for _ in range(500):
        if any(c.get("cmd") == "blpop" for c in await client.client_list()):
            return
        await asyncio.sleep(0.01)  # polling the server's client list, not a sync stand-in
    raise AssertionError("the BLPOP never reached the server")


async def _bounded(call: Callable[[], Awaitable[Any]], bound: float, what: str) -> Unavailable:
    """``call()`` raises ``Unavailable`` (nothing else) in under ``bound`` seconds."""
    started = time.monotonic()
    try:
        await asyncio.wait_for(call(), bound + 5)
    except Unavailable as exc:
        elapsed = time.monotonic() - started
        assert elapsed < bound, f"{what} took {elapsed:.1f} s to fail (bound {bound:g} s)"
        return exc
    except BaseException as exc:
        raise AssertionError(f"{what} raised {type(exc).__name__}: {exc}, not Unavailable") \
            from exc
    raise AssertionError(f"{what} returned instead of raising Unavailable")


async def test_a_frozen_server_fails_calls_within_their_bound(redis_server: RedisProcess) -> None:
    async with transport(redis_server.url, timeout_s=TIMEOUT_S) as t:
        assert await t.execute("PING") == b"PONG"  # connected before the freeze
        redis_server.pause()
        try:
            exc = await _bounded(lambda: t.execute("PING"), TIMEOUT_S + SLACK_S, "PING")
            assert exc.url == redis_server.url and exc.cause
            assert redis_server.url in str(exc)
            await _bounded(lambda: t.execute_many([("GET", "a"), ("GET", "b")]),
                           TIMEOUT_S + SLACK_S, "a batch")
        finally:
            redis_server.resume()
        assert await t.execute("PING") == b"PONG"  # and back once the server is


async def test_a_frozen_server_fails_a_fresh_connection_within_its_bound(
    redis_server: RedisProcess,
) -> None:
    redis_server.pause()
    try:
        async with transport(redis_server.url, timeout_s=TIMEOUT_S) as t:
            await _bounded(lambda: t.execute("PING"), TIMEOUT_S + SLACK_S, "PING")
            await _bounded(lambda: t.multiplexer("tr:home").subscribe("tr:c"),
                           TIMEOUT_S + SLACK_S, "subscribe")
    finally:
        redis_server.resume()


async def test_every_registry_call_on_a_frozen_server_raises_unavailable_within_its_bound(
    redis_server: RedisProcess,
) -> None:
    settings = Settings(url=redis_server.url, namespace=f"tr{secrets.token_hex(3)}",
                        redis_timeout_s=TIMEOUT_S, wait_slice_s=0.2)
    reg = SessionRegistry(Transport.from_url(redis_server.url, timeout_s=TIMEOUT_S),
                          settings=settings)
    try:
        sid = await reg.submit("any", {"task": "t"})  # no worker: it never settles
        assert (await reg.status(sid))["session_id"] == sid
        with pytest.raises(WaitTimeout):  # warm: the pub/sub connection is up
            await reg.wait_event(sid, timeout=0.1)
        redis_server.pause()
        try:
            calls: dict[str, tuple[Callable[[], Awaitable[Any]], float]] = {
                "feed_response": (lambda: reg.feed_response(sid, "q-0", "a", timeout=1), 1),
                "feed_response (new session)": (
                    lambda: reg.feed_response("s-0-" + "0" * 32, "q-0", "a", timeout=1), 1),
                "wait_event": (lambda: reg.wait_event(sid, timeout=1), 1),
                "wait_event (new session)": (
                    lambda: reg.wait_event("s-1-" + "0" * 32, timeout=1), 1),
                "submit": (lambda: reg.submit("other", {"task": "t"}), 0),
                "status": (lambda: reg.status(sid), 0),
                "list_snapshots": (lambda: reg.list_snapshots(), 0),
                "cancel": (lambda: reg.cancel(sid), 0),
            }
            for what, (call, own) in calls.items():
                exc = await _bounded(call, TIMEOUT_S + own + SLACK_S, what)
                assert exc.url == redis_server.url, what
        finally:
            redis_server.resume()
        # the registry works again once the server is back (what the frozen server had
        # already buffered, such as the cancel, may still have run: Unavailable promises
        # only that a retry is safe)
        assert (await reg.status(sid))["session_id"] == sid
    finally:
        await reg.aclose()


async def test_a_closed_port_is_unavailable_within_the_bound_and_the_password_is_masked(
) -> None:
    port = free_port()
    for url, shown in ((f"redis://127.0.0.1:{port}/0", f"redis://127.0.0.1:{port}/0"),
                       (f"redis://:secret@127.0.0.1:{port}/0",
                        f"redis://:***@127.0.0.1:{port}/0")):
        async with transport(url, timeout_s=TIMEOUT_S) as t:
            exc = await _bounded(lambda t=t: t.execute("PING"), TIMEOUT_S + SLACK_S, url)
            assert shown in str(exc) and exc.url == shown
            assert "secret" not in str(exc) and "secret" not in exc.url
            assert "secret" not in exc.cause and "secret" not in repr(exc.to_json())
            await _bounded(lambda t=t: t.multiplexer("tr:home").subscribe("tr:c"),
                           TIMEOUT_S + SLACK_S, f"subscribe at {url}")


@pytest.mark.parametrize("url", [
    "notaurl", "redis://", "redis://h:99999/0", "redis://127.0.0.1:6379/abc", "",
    "http://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0?sockettimeout=1",
])
def test_bad_urls_are_refused_at_once(url: str) -> None:
    started = time.monotonic()
    with pytest.raises(InvalidInput):
        Transport.from_url(url)
    assert time.monotonic() - started < 1.0


def test_a_bad_url_never_shows_its_password() -> None:
    with pytest.raises(InvalidInput) as info:
        Transport.from_url("redis://:secret@127.0.0.1:6379/abc")
    assert "secret" not in str(info.value)
    with pytest.raises(InvalidInput) as info:
        Transport.from_url("redis://:secret@h:99999/0")
    assert "secret" not in str(info.value)


async def test_a_database_the_server_does_not_have_is_misconfigured(redis_url: str) -> None:
    url = redis_url.rsplit("/", 1)[0] + "/99"
    async with transport(url, timeout_s=TIMEOUT_S) as t:
        started = time.monotonic()
        with pytest.raises(Misconfigured, match="database") as info:
            await t.execute("PING")
        assert time.monotonic() - started < TIMEOUT_S + SLACK_S
        assert "/99" in str(info.value)


# -- the server's configuration --------------------------------------------------------------


@pytest.mark.redis
async def test_a_server_that_evicts_keys_is_refused_unless_allowed(
    redis_server_factory: Callable[..., RedisProcess],
) -> None:
    """Evicted session keys break sessions silently, so an evicting ``maxmemory-policy`` is
    refused on every new connection with a message that says how to fix it."""
    server = redis_server_factory(extra_args=["--maxmemory-policy", "allkeys-lru"])
    transport = Transport.from_url(server.url, timeout_s=2.0)
    try:
        with pytest.raises(Misconfigured, match=r"maxmemory-policy allkeys-lru.*noeviction"):
            await transport.execute("PING")
    finally:
        await transport.aclose()
    allowed = Transport.from_url(server.url, timeout_s=2.0, allow_eviction=True)
    try:
        assert await allowed.execute("PING") == b"PONG"
    finally:
        await allowed.aclose()


@pytest.mark.redis
async def test_a_full_server_is_a_typed_error_not_a_raw_one(
    redis_server_factory: Callable[..., RedisProcess],
) -> None:
    server = redis_server_factory(extra_args=["--maxmemory", "2mb"])
    transport = Transport.from_url(server.url, timeout_s=2.0)
    try:
        with pytest.raises(Unavailable, match="full"):
            for n in range(10_000):
                await transport.execute("SET", f"k{n}", "x" * 1000)
        with pytest.raises(Unavailable, match="full"):  # a script's write, the same
            await transport.evalsha(*_script("return redis.call('SET', KEYS[1], ARGV[1])"),
                                    ["big"], ["x" * 100_000])
    finally:
        await transport.aclose()


def _script(source: str) -> tuple[str, str]:
    import hashlib

    return hashlib.sha1(source.encode()).hexdigest(), source


def test_noreplicas_is_unavailable_and_says_nothing_was_written() -> None:
    """A primary under ``min-replicas-to-write`` without its replicas refuses writes: a
    transient condition (retry once a replica is back), so ``Unavailable`` (HTTP 503)."""
    from redis.exceptions import ResponseError

    from coordinator.errors import Unavailable
    from coordinator.transport.client import _refusal

    err = _refusal(ResponseError("NOREPLICAS Not enough good replicas to write."), "a script")
    assert isinstance(err, Unavailable) and "nothing was written" in err.message
