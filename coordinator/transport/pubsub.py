"""One pub/sub connection per process, fanned out to in-process waiters.

Pub/sub only wakes a waiter; the Redis keys hold the truth. The protocol every waiter follows:
subscribe (and wait for Redis to confirm it), check the state, wait a bounded slice, re-check.
Messages can be lost when the connection drops, so after a reconnect every subscription gets
a ``RESYNC`` marker once its channel is confirmed again, telling its waiter to re-check now.

Unsubscribing lingers a few seconds, because a host usually waits on the same session again
right after (the next round), and a warm subscription saves a round trip per step.

The connection is redis-py's (public API: ``make_connection``, ``connect``,
``send_packed_command``, ``read_response``), so every URL option applies and the same code
serves a real server and fakeredis. One task reads pushes and hands each message to its
waiters straight from the read: no queue, no response dict per message.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from collections.abc import Callable
from typing import Any, Final

from redis.asyncio import ConnectionPool
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from ..errors import Unavailable
from .pipe import pack

log = logging.getLogger(__name__)


class _Resync:
    def __repr__(self) -> str:
        return "RESYNC"


RESYNC: Final = _Resync()
_QUEUE_CAP = 64  # wake-ups only: an old one is as good as a new one


class Subscription:
    """One waiter's view of a channel; use as an async context manager.

    A waiter parks on a bare future with one timer, and a message resolves it directly;
    later messages wait in a short deque (wake-ups only: an old one is as good as a new
    one). No ``asyncio.Queue`` and no ``asyncio.timeout`` scope: the host waits once per
    step, so their bookkeeping showed in its profile.

    With ``on_message``, messages are handed to that callback as they are parsed (no task
    wake-up: a worker's nudges start steps straight from the connection); RESYNC still
    goes to the waiter, for a loop that re-checks.
    """

    def __init__(
        self, mux: Multiplexer, channel: str,
        on_message: Callable[[bytes], None] | None = None,
    ) -> None:
        self.channel = channel
        self._mux = mux
        self._on_message = on_message
        self._items: collections.deque[bytes | _Resync] = collections.deque(maxlen=_QUEUE_CAP)
        self._waiter: asyncio.Future[bytes | _Resync | None] | None = None

    def _put(self, item: bytes | _Resync) -> None:
        if self._on_message is not None and isinstance(item, bytes):
            try:
                self._on_message(item)
            except Exception:  # the connection's parser must go on whatever a handler does
                log.exception("message handler for %s failed", self.channel)
            return
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(item)
        else:
            self._items.append(item)

    async def get(self, timeout: float) -> bytes | _Resync | None:
        """The next message, ``RESYNC``, or None when ``timeout`` seconds pass."""
        if self._items:
            return self._items.popleft()
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[bytes | _Resync | None] = loop.create_future()
        self._waiter = waiter
        timer = loop.call_later(max(timeout, 0.0), _expire, waiter)
        try:
            return await waiter
        finally:
            timer.cancel()
            self._waiter = None

    def close(self) -> None:
        self._mux._release(self)

    async def __aenter__(self) -> Subscription:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()


def _expire(waiter: asyncio.Future[bytes | _Resync | None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


class _Listener:
    """A subscribed connection and the task that reads its pushes. Opened with redis-py's
    public connection API (``make_connection``, ``connect``: every URL option applies),
    written with ``send_packed_command`` and read with ``read_response``."""

    def __init__(self, conn: AbstractConnection, on_push: Callable[[Any], None]) -> None:
        self._conn = conn
        self._on_push = on_push
        #: Resolves (to the cause, if any) when the connection is gone.
        self.lost: asyncio.Future[BaseException | None] = (
            asyncio.get_running_loop().create_future())
        self._task = asyncio.create_task(self._read(), name="redis-pubsub")

    @classmethod
    async def open(cls, pool: ConnectionPool, on_push: Callable[[Any], None],
                   timeout_s: float) -> _Listener:
        conn: AbstractConnection = pool.make_connection()  # type: ignore[no-untyped-call]
        try:
            async with asyncio.timeout(timeout_s):
                await conn.connect()  # type: ignore[no-untyped-call]
        except TimeoutError:
            await _close(conn)
            raise RedisTimeoutError(f"connecting to redis took longer than {timeout_s:g} s") \
                from None
        except BaseException:
            await _close(conn)
            raise
        return cls(conn, on_push)

    async def send(self, command: str, *channels: str) -> None:
        if self.lost.done():
            return  # the reconnect subscribes every channel anew
        try:
            await self._conn.send_packed_command(pack((command, *channels)), check_health=False)
        except Exception as exc:
            self._done(exc)

    async def _read(self) -> None:
        try:
            while True:
                self._on_push(await self._conn.read_response())
        except asyncio.CancelledError:
            self._done(None)
            raise
        except BaseException as exc:  # every failure ends this connection
            self._done(exc)

    def _done(self, exc: BaseException | None) -> None:
        if not self.lost.done():
            self.lost.set_result(exc)
        if not self._task.done() and self._task is not asyncio.current_task():
            self._task.cancel()

    async def close(self) -> None:
        self._done(None)
        with contextlib.suppress(BaseException):
            await self._task
        await _close(self._conn)


async def _close(conn: AbstractConnection) -> None:
    with contextlib.suppress(Exception):
        await conn.disconnect(nowait=True)


class Multiplexer:
    def __init__(
        self,
        pool: ConnectionPool,
        home_channel: str,
        *,
        safe_url: str = "redis",
        timeout_s: float = 5.0,
        linger_s: float = 5.0,
    ) -> None:
        self._pool = pool
        self._home = home_channel
        self._safe_url = safe_url
        self._timeout_s = timeout_s
        self._linger_s = linger_s
        self._conn: _Listener | None = None  # the live connection, None while down
        self._subs: dict[str, set[Subscription]] = {}
        self._confirmed: set[str] = set()
        self._confirm_waiters: dict[str, asyncio.Event] = {}
        self._linger: dict[str, asyncio.TimerHandle] = {}
        self._resync_pending: set[str] = set()
        self._requested: set[str] = set()  # SUBSCRIBE sent, confirmation not yet seen
        self._keeper: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        self._closed = False
        self.reconnects = 0

    async def start(self) -> None:
        # Under the lock, and the keeper set only once connected: two first subscribes racing
        # here would otherwise each open a connection and one SUBSCRIBE would go unread.
        async with self._lock:
            if self._keeper is not None:
                return
            loop = asyncio.get_running_loop()
            deadline = loop.time() + self._timeout_s
            backoff = 0.02
            while True:  # within the transport's budget, as every other call
                try:
                    async with asyncio.timeout(max(0.01, deadline - loop.time())):
                        await self._reconnect()
                    break
                except (TimeoutError, RedisError, OSError) as exc:
                    if loop.time() + backoff >= deadline:
                        raise Unavailable(
                            f"redis at {self._safe_url} is unavailable: cannot subscribe "
                            f"within {self._timeout_s:g} s (last error: {_cause(exc)})",
                            url=self._safe_url, cause=_cause(exc)) from None
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, 0.5)
            self._keeper = asyncio.create_task(self._keep_connected(),
                                               name=f"pubsub:{self._home}")

    async def subscribe(
        self, channel: str, on_message: Callable[[bytes], None] | None = None
    ) -> Subscription:
        """A subscription whose channel Redis has confirmed: nothing published after
        this returns can be missed (short of a dropped connection, see RESYNC). Raises
        ``Unavailable`` when Redis cannot confirm it within the transport's bound."""
        if self._keeper is None:
            await self.start()
        sub = Subscription(self, channel, on_message)
        handle = self._linger.pop(channel, None)
        if handle is not None:
            handle.cancel()
        subs = self._subs.setdefault(channel, set())
        subs.add(sub)
        if channel in self._confirmed:
            return sub
        event = self._confirm_waiters.setdefault(channel, asyncio.Event())
        try:
            async with asyncio.timeout(self._timeout_s):
                async with self._lock:
                    if channel not in self._confirmed and channel not in self._requested:
                        self._requested.add(channel)
                        if self._conn is not None and not self._conn.lost.done():
                            await self._conn.send("SUBSCRIBE", channel)
                        else:  # down: reconnect now (which subscribes this channel too)
                            await self._reconnect()
                await event.wait()
        except BaseException as exc:
            self._requested.discard(channel)  # so the next subscribe sends SUBSCRIBE again
            self._release(sub)
            if isinstance(exc, TimeoutError | RedisError | OSError):
                raise Unavailable(
                    f"redis at {self._safe_url} did not confirm the subscription to "
                    f"{channel} within {self._timeout_s:g} s ({_cause(exc)}); is it reachable?",
                    url=self._safe_url, cause=_cause(exc)) from None
            raise
        return sub
    def _release(self, sub: Subscription) -> None:
        subs = self._subs.get(sub.channel)
        if subs is None or sub not in subs:
            return
        subs.discard(sub)
        if subs or self._closed:
            return
        loop = asyncio.get_running_loop()
        self._linger[sub.channel] = loop.call_later(
            self._linger_s, lambda: asyncio.ensure_future(self._unsubscribe(sub.channel))
        )

    async def drop(self, channel: str) -> None:
        """Stop hearing ``channel`` now, whoever still listens in this process: a worker
        leaving must not be counted as a receiver (``feed.lua`` hands steps to receivers)."""
        for sub in list(self._subs.get(channel, ())):
            self._subs[channel].discard(sub)
        await self._unsubscribe(channel)

    async def _unsubscribe(self, channel: str) -> None:
        self._linger.pop(channel, None)
        async with self._lock:
            # Re-checked under the lock: a subscribe may have come in while we waited.
            if self._subs.get(channel) or self._keeper is None or self._closed:
                return
            self._subs.pop(channel, None)
            self._confirmed.discard(channel)
            self._requested.discard(channel)
            self._resync_pending.discard(channel)
            self._confirm_waiters.pop(channel, None)
            if self._conn is not None:
                await self._conn.send("UNSUBSCRIBE", channel)

    # -- the connection ------------------------------------------------------------------

    async def _reconnect(self) -> None:
        """Under the lock: a new connection, subscribed to every channel in use (lingering
        ones too: their RESYNC may be pending, and their waiter may come back)."""
        if self._conn is not None:
            if not self._conn.lost.done():
                return
            await self._lost(self._conn)
        conn = await _Listener.open(self._pool, self._on_push, self._timeout_s)
        if self._closed:  # aclose ran while we connected: it could not close this one
            await conn.close()
            raise RedisConnectionError("the multiplexer is closed")
        channels = {self._home, *self._subs}
        self._requested |= channels
        self._conn = conn
        await conn.send("SUBSCRIBE", *channels)

    async def _lost(self, conn: _Listener) -> None:
        if conn is not self._conn:
            return  # already handled (by a subscribe that found the connection down)
        self._conn = None
        await conn.close()
        cause = conn.lost.result() if conn.lost.done() else None
        self._on_broken(cause or RedisConnectionError("closed by the server"))

    async def _keep_connected(self) -> None:
        backoff = 0.05
        while not self._closed:
            if (conn := self._conn) is not None:
                await asyncio.shield(conn.lost)  # aclose cancels us, not the connection's fate
                async with self._lock:
                    await self._lost(conn)
                backoff = 0.05
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 2.0)
            async with self._lock:
                try:
                    await self._reconnect()
                except (RedisError, OSError) as exc:
                    self._on_unreachable(exc)

    def _on_push(self, reply: Any) -> None:
        if not (isinstance(reply, list) and len(reply) == 3):
            if not (isinstance(reply, list) and reply and reply[0] == b"pong"):
                log.warning("unexpected reply on the pub/sub connection: %r", reply)
            return
        kind, raw, data = reply
        channel = raw.decode()
        if kind == b"message":
            for sub in self._subs.get(channel, ()):
                sub._put(data)
        elif kind == b"subscribe":
            self._on_confirmed(channel)
        elif kind == b"unsubscribe":
            self._confirmed.discard(channel)

    # -- both -----------------------------------------------------------------------------

    def _on_broken(self, exc: BaseException) -> None:
        if not self._resync_pending:
            self.reconnects += 1
            log.warning("pub/sub connection lost (%s); reconnecting", exc)
        # Only channels that were heard can have lost messages (a subscribe still waiting
        # for its confirmation gets it on the new connection); their RESYNC waits for that
        # confirmation: a waiter re-checking before it could still miss what is published.
        self._resync_pending |= self._confirmed.intersection(self._subs)
        self._confirmed.clear()
        self._requested.clear()
        for event in self._confirm_waiters.values():
            event.clear()

    def _on_unreachable(self, exc: Exception) -> None:
        """Redis cannot be reached for now: waiters re-check at once, so they (and their
        callers) meet the outage instead of waiting out their slice."""
        log.debug("pub/sub reconnect failed: %s", exc)
        for subs in self._subs.values():
            for sub in subs:
                sub._put(RESYNC)

    def _on_confirmed(self, channel: str) -> None:
        self._confirmed.add(channel)
        self._requested.discard(channel)
        self._confirm_waiters.setdefault(channel, asyncio.Event()).set()
        if channel in self._resync_pending:
            self._resync_pending.discard(channel)
            for sub in list(self._subs.get(channel, ())):
                sub._put(RESYNC)

    async def aclose(self) -> None:
        self._closed = True
        for handle in self._linger.values():
            handle.cancel()
        self._linger.clear()
        if self._keeper is not None:
            self._keeper.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._keeper
        # UNSUBSCRIBE explicitly, not only by closing: nobody should count this process as
        # a listener for a moment longer than it is one.
        if self._conn is not None:
            conn, self._conn = self._conn, None
            with contextlib.suppress(Exception):
                async with asyncio.timeout(1.0):
                    await conn.send("UNSUBSCRIBE")
            await conn.close()


def _cause(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError) and not str(exc):
        return "timed out"
    return str(exc) or type(exc).__name__
