"""``Pipe``: one connection that carries every command of a process component, pipelined.

Every step costs the host one script call (``feed``) and the worker one (``commit_step``).
Through redis-py's client each call costs ~50-75 µs of CPU (pool checkout, retry wrapper,
response callbacks); over one long-lived connection with the replies matched in order it
costs a few µs. So commands share one connection, **multiplexed** (replies come back in the
order commands were written, so each caller's future is the next in line) and
**auto-pipelined** (commands issued in the same event-loop turn leave in one write).

Only redis-py's public connection API is used: ``ConnectionPool.make_connection``,
``Connection.connect`` (the handshake: TLS, AUTH, SELECT, every URL option),
``send_packed_command`` and ``read_response``, with hiredis packing the commands. One reader
task reads replies in order. Push frames (RESP3 ``>``) are never taken for replies: redis-py's
parser skips them, and so does the reader, should an older parser hand one up.

Bounds: a connect (handshake included) is cut at its timeout; while calls wait, a watchdog
drops the connection when no reply has come for ``reply_timeout_s`` (replies are matched by
order, so a lost one poisons the connection), failing every call in flight with
``TimeoutError``. One timer for all calls, not one per call. The retry policy is not here:
``coordinator.transport.client`` owns it, one budget per call.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any

import hiredis
from redis.asyncio import ConnectionPool
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import AuthenticationError, InvalidResponse, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

#: hiredis >= 3.2 gives push frames their own type; older ones cannot be told apart (and
#: redis-py's RESP2 connections never receive one: see ``target.PROTOCOL``).
_PUSH: type | None = getattr(hiredis, "PushNotification", None)


def pack(args: tuple[Any, ...]) -> bytes:
    packed: bytes = hiredis.pack_command(args)
    return packed


class _Entry:
    """One write's worth of commands; their replies resolve one future (a single reply, or a
    list with errors as exception objects when ``batch``)."""

    __slots__ = ("batch", "fut", "replies", "size")

    def __init__(self, fut: asyncio.Future[Any], size: int, batch: bool) -> None:
        self.fut = fut
        self.size = size
        self.batch = batch
        self.replies: list[Any] = []


class Pipe:
    def __init__(self, pool: ConnectionPool, *, reply_timeout_s: float,
                 connect_timeout_s: float,
                 on_refused: Callable[[BaseException], Exception] | None = None,
                 on_connected: Callable[[AbstractConnection], Awaitable[None]] | None = None,
                 ) -> None:
        self.reply_timeout_s = reply_timeout_s
        self._on_refused = on_refused
        #: Runs on each new connection before it carries calls (checks of the server).
        self._on_connected = on_connected
        self.connect_timeout_s = connect_timeout_s
        self._pool = pool
        self._conn: AbstractConnection | None = None
        self._reader: asyncio.Task[None] | None = None
        self._pending: collections.deque[_Entry] = collections.deque()
        self._out: list[bytes] = []
        self._flushing = False
        self._last_progress = 0.0
        self._watchdog: asyncio.TimerHandle | None = None
        self._connecting = asyncio.Lock()
        self._closed = False

    async def call(self, packed: bytes, size: int = 1, *, batch: bool = False,
                   timeout: float | None = None) -> Any:
        """Send ``size`` packed commands; their reply (a list when ``batch``). Raises
        redis-py's ``ConnectionError``/``TimeoutError`` when the connection fails or stalls,
        ``ResponseError`` for an error reply (not in a batch)."""
        conn = self._conn
        if conn is None or self._reader is None or self._reader.done():
            conn = await self._connect(timeout)
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()
        entry = _Entry(fut, size, batch)
        if not self._pending and not self._out and not self._flushing:
            # Idle: nothing to batch with, so no event-loop turn of delay either.
            self._last_progress = loop.time()
            self._pending.append(entry)
            await self._write(conn, packed)
        else:
            self._pending.append(entry)
            self._out.append(packed)
            if not self._flushing:
                # The first caller of a busy turn sends what the turn collected.
                self._flushing = True
                try:
                    await asyncio.sleep(0)
                finally:
                    self._flushing = False
                out, self._out = self._out, []
                if out and conn is self._conn:
                    await self._write(conn, b"".join(out))
        if self._watchdog is None:
            self._watchdog = loop.call_later(self.reply_timeout_s / 4, self._watch, loop)
        if timeout is None or timeout >= self.reply_timeout_s:
            return await fut
        try:
            async with asyncio.timeout(timeout):
                return await fut
        except TimeoutError:
            # ``fut`` is cancelled: its reply still comes in order and is dropped, and the
            # connection stays good.
            raise RedisTimeoutError(f"no reply from redis within {timeout:g} s") from None

    async def _write(self, conn: AbstractConnection, data: bytes) -> None:
        try:
            await conn.send_packed_command(data, check_health=False)
        except Exception as exc:
            self._broken(conn, exc)

    async def _connect(self, timeout: float | None) -> AbstractConnection:
        async with self._connecting:
            if self._conn is not None and self._reader is not None and not self._reader.done():
                return self._conn
            if self._closed:
                raise RedisConnectionError("this client was closed")
            bound = self.connect_timeout_s if timeout is None else min(
                timeout, self.connect_timeout_s)
            conn: AbstractConnection = self._pool.make_connection()  # type: ignore[no-untyped-call]
            try:
                async with asyncio.timeout(bound):
                    await conn.connect()  # type: ignore[no-untyped-call]
                    if self._on_connected is not None:
                        await self._on_connected(conn)
            except TimeoutError:
                await _close(conn)
                raise RedisTimeoutError(
                    f"connecting to redis took longer than {bound:g} s") from None
            except (AuthenticationError, ResponseError) as exc:
                # The server answered the handshake with a refusal: not a passing fault.
                await _close(conn)
                if self._on_refused is None:
                    raise
                raise self._on_refused(exc) from None
            except BaseException:
                await _close(conn)
                raise
            if self._closed:  # aclose ran while we connected: it waits for us, we close
                await _close(conn)
                raise RedisConnectionError("this client was closed")
            self._conn = conn
            self._reader = asyncio.create_task(self._read_loop(conn), name="redis-pipe")
            return conn

    async def _read_loop(self, conn: AbstractConnection) -> None:
        loop = asyncio.get_running_loop()
        pending = self._pending
        try:
            while True:
                try:
                    reply = await conn.read_response()
                except ResponseError as exc:  # an error reply: the connection is fine
                    reply = exc
                self._last_progress = loop.time()
                if _PUSH is not None and isinstance(reply, _PUSH):
                    continue  # out-of-band: never a reply to anyone's command
                if not pending:
                    raise InvalidResponse("reply without a request")
                head = pending[0]
                if head.batch:
                    head.replies.append(reply)
                    if len(head.replies) < head.size:
                        continue
                    reply = head.replies
                pending.popleft()
                if head.fut.done():  # its caller gave up (timeout, cancel): dropped
                    continue
                if isinstance(reply, Exception):
                    head.fut.set_exception(reply)
                else:
                    head.fut.set_result(reply)
        except asyncio.CancelledError:
            await _close(conn)
            raise
        except BaseException as exc:  # every failure ends this connection
            await _close(conn)
            self._broken(conn, exc)

    def reset(self, exc: BaseException) -> None:
        """Drop the connection (the next call opens a new one)."""
        if self._conn is not None:
            self._broken(self._conn, exc)

    def _watch(self, loop: asyncio.AbstractEventLoop) -> None:
        self._watchdog = None
        if not self._pending:
            return
        if loop.time() - self._last_progress > self.reply_timeout_s and self._conn is not None:
            self._broken(self._conn, RedisTimeoutError(
                f"no reply from redis within {self.reply_timeout_s:g} s"))
            return
        self._watchdog = loop.call_later(self.reply_timeout_s / 4, self._watch, loop)

    def _broken(self, conn: AbstractConnection, exc: BaseException) -> None:
        """Fail every call in flight on ``conn``; the next call reconnects."""
        if conn is not self._conn:
            return
        self._conn = None
        reader, self._reader = self._reader, None
        if reader is not None and not reader.done() and reader is not asyncio.current_task():
            reader.cancel()  # its read is cut, and it closes the connection
        pending, self._pending = self._pending, collections.deque()
        self._out.clear()
        err = exc if isinstance(exc, RedisConnectionError | RedisTimeoutError) else \
            RedisConnectionError(f"connection to redis lost: {exc or type(exc).__name__}")
        for entry in pending:
            if not entry.fut.done():
                entry.fut.set_exception(err)

    async def aclose(self) -> None:
        self._closed = True
        conn = self._conn
        reader = self._reader
        if conn is not None:  # cancels the reader, which closes the connection
            self._broken(conn, RedisConnectionError("this client was closed"))
        if reader is not None:
            with contextlib.suppress(BaseException):
                await reader
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        # A connect in flight (bounded by its timeout) ends before the caller closes the pool
        # under it: through Sentinel it may still open connections (to a sentinel, then to
        # the primary) that nothing would close once the pool is gone.
        async with self._connecting:
            pass


async def _close(conn: AbstractConnection) -> None:
    with contextlib.suppress(Exception):
        await conn.disconnect(nowait=True)
