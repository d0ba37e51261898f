"""``Wire``: one pipelined connection for the hot path's script calls.

Every step costs the host one script call (``feed.lua``) and the worker one (``commit_step``),
and through redis-py's pool each call costs ~75 µs of CPU (connection checkout with a
liveness probe, retry wrapper, Python command packing) against ~15 µs for the same trip on a
bare socket: on a 2-core machine that overhead is a third of a step. So script calls go over
one connection per process component, multiplexed (replies come back in the order commands
were written, so each caller's future is the next in line) and auto-pipelined (commands
issued in the same event-loop turn leave in one write).

The connection itself is opened by redis-py (``coordinator.takeover``), so every URL option
(ACL user, password, TLS, database) applies as for any other command; only the command/reply
loop is ours, with hiredis doing both packing and parsing. A broken connection fails every
call in flight with ``ConnectionError``, and calls are retried with the pool's own ``Retry``
policy, exactly as redis-py retries them: every script is safe to repeat (feeds carry a
per-call token, commits a fence).
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Awaitable, Callable
from typing import Any

import hiredis
from redis._parsers.base import BaseParser
from redis.asyncio import Redis
from redis.asyncio.connection import AbstractConnection
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import InvalidResponse
from redis.exceptions import TimeoutError as RedisTimeoutError

from .takeover import abandon, on_socket, take_over

#: Longest a call waits for its reply before the connection is deemed broken.
REPLY_TIMEOUT_S = 30.0


class _Batch:
    """Several commands sent together whose replies resolve one future, as a list (errors
    as exception objects in it, like a redis-py pipeline with ``raise_on_error=False``)."""

    __slots__ = ("fut", "replies", "size")

    def __init__(self, fut: asyncio.Future[Any], size: int) -> None:
        self.fut = fut
        self.size = size
        self.replies: list[Any] = []


class _Protocol(asyncio.Protocol):
    def __init__(self, wire: Wire) -> None:
        self._wire = wire
        self._loop = asyncio.get_running_loop()
        self._reader = hiredis.Reader(protocolError=InvalidResponse,
                                      replyError=BaseParser.parse_error)

    def data_received(self, data: bytes) -> None:
        reader = self._reader
        reader.feed(data)
        self._wire._last_progress = self._loop.time()
        pending = self._wire._pending
        while (reply := reader.gets()) is not False:
            if not pending:
                self._wire._broken(InvalidResponse("reply without a request"))
                return
            head = pending[0]
            if isinstance(head, _Batch):
                head.replies.append(reply)
                if len(head.replies) < head.size:
                    continue
                pending.popleft()
                if not head.fut.done():
                    head.fut.set_result(head.replies)
                continue
            pending.popleft()
            fut = head
            if fut.done():  # its caller gave up (timeout, cancel): the reply is dropped
                continue
            if isinstance(reply, Exception):
                fut.set_exception(reply)
            else:
                fut.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self._wire._broken(exc or RedisConnectionError("connection closed by server"))


class Wire:
    """Calls in flight are bounded by one watchdog, not a timer each: when no reply has come
    for ``reply_timeout_s`` while calls wait, the connection is dropped and they fail with
    ``TimeoutError`` (then are retried like any connection failure)."""

    def __init__(self, client: Redis, *, reply_timeout_s: float = REPLY_TIMEOUT_S) -> None:
        self.reply_timeout_s = reply_timeout_s
        self._last_progress = 0.0
        self._watchdog: asyncio.TimerHandle | None = None
        self._client = client
        retry = client.connection_pool.connection_kwargs.get("retry")
        self._retry: Retry = retry if isinstance(retry, Retry) else Retry(NoBackoff(), 0)
        self._conn: AbstractConnection | None = None
        self._transport: asyncio.Transport | None = None
        self._pending: collections.deque[asyncio.Future[Any] | _Batch] = collections.deque()
        self._out: list[bytes] = []
        self._flush_scheduled = False
        self._connecting = asyncio.Lock()
        self._closed = False

    @classmethod
    def for_client(cls, client: Redis) -> Wire | None:
        """A wire for a client on a real socket; None for in-memory fakes (fakeredis), which
        keep going through redis-py."""
        return cls(client) if on_socket(client) else None

    async def execute(self, *args: Any) -> Any:
        """Send one command and return its reply (redis-py's error classes on error)."""
        return await self._retry.call_with_retry(lambda: self._once(args), _no_op)

    async def execute_many(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        """Send ``commands`` in one write; their replies in order, errors as exception
        objects. For reads: a batch cut by a broken connection is sent again whole."""
        if not commands:
            return []
        return await self._retry.call_with_retry(lambda: self._batch(commands), _no_op)

    async def _batch(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        packed = b"".join([hiredis.pack_command(c) for c in commands])
        return await self._send(_Batch(fut, len(commands)), fut, packed)  # type: ignore[no-any-return]

    async def _once(self, args: tuple[Any, ...]) -> Any:
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        return await self._send(fut, fut, hiredis.pack_command(args))

    async def _send(self, entry: asyncio.Future[Any] | _Batch, fut: asyncio.Future[Any],
                    packed: bytes) -> Any:
        transport = self._transport
        if transport is None or transport.is_closing():
            transport = await self._connect()
        loop = asyncio.get_running_loop()
        if not self._pending and not self._out:
            # Idle connection: nothing to batch with, so no event-loop turn of delay either.
            self._last_progress = loop.time()
            self._pending.append(entry)
            transport.write(packed)
        else:
            self._pending.append(entry)
            self._out.append(packed)
            if not self._flush_scheduled:
                self._flush_scheduled = True
                loop.call_soon(self._flush)
        if self._watchdog is None:
            self._watchdog = loop.call_later(self.reply_timeout_s / 4, self._watch, loop)
        return await fut

    def _watch(self, loop: asyncio.AbstractEventLoop) -> None:
        self._watchdog = None
        if not self._pending:
            return
        if loop.time() - self._last_progress > self.reply_timeout_s:
            # Replies are matched by order, so a lost one poisons the connection: drop it.
            self._broken(RedisTimeoutError(
                f"no reply from redis within {self.reply_timeout_s:g} s"))
            return
        self._watchdog = loop.call_later(self.reply_timeout_s / 4, self._watch, loop)

    def _flush(self) -> None:
        self._flush_scheduled = False
        out, self._out = self._out, []
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write(b"".join(out))
        elif out:
            self._broken(RedisConnectionError("connection lost before the command was sent"))

    async def _connect(self) -> asyncio.Transport:
        async with self._connecting:
            if self._transport is not None and not self._transport.is_closing():
                return self._transport
            if self._closed:
                raise RedisConnectionError("this client was closed")
            self._conn, transport = await take_over(self._client, _Protocol(self))
            self._transport = transport
            return transport

    def _broken(self, exc: BaseException) -> None:
        """Fail every call in flight; the next call reconnects."""
        transport, self._transport = self._transport, None
        conn, self._conn = self._conn, None
        if transport is not None:
            transport.abort()
        abandon(conn)
        pending, self._pending = self._pending, collections.deque()
        self._out.clear()
        err = exc if isinstance(exc, RedisConnectionError | RedisTimeoutError) else \
            RedisConnectionError(f"connection to redis lost: {exc}")
        for entry in pending:
            fut = entry.fut if isinstance(entry, _Batch) else entry
            if not fut.done():
                fut.set_exception(err)

    async def aclose(self) -> None:
        # Not ``conn.disconnect()``: it would wait for its stream protocol to hear the close,
        # and that protocol was swapped for ours, so it never does (a 5 s stall).
        self._closed = True
        conn, self._conn = self._conn, None
        transport, self._transport = self._transport, None
        if transport is not None:
            transport.close()
        abandon(conn)
        self._broken(RedisConnectionError("this client was closed"))


async def _no_op(_: Exception) -> None:
    """The retry loop's failure hook: the broken connection is already dropped."""


def checked(replies: list[Any]) -> list[Any]:
    """A batch's replies, raising the first that is an error (for callers that need all)."""
    for reply in replies:
        if isinstance(reply, Exception):
            raise reply
    return replies


def batcher(client: Redis, wire: Wire | None) -> Callable[[list[tuple[Any, ...]]],
                                                          Awaitable[list[Any]]]:
    """Runs command batches over ``wire``, or a redis-py pipeline where there is none."""
    if wire is not None:
        return wire.execute_many

    async def run(commands: list[tuple[Any, ...]]) -> list[Any]:
        pipe = client.pipeline(transaction=False)
        for command in commands:
            pipe.execute_command(*command)
        return await pipe.execute(raise_on_error=False)

    return run
