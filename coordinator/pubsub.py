"""One pub/sub connection per process, fanned out to in-process queues.

Pub/sub only wakes a waiter; the Redis keys hold the truth. The protocol every waiter follows:
subscribe (and wait for Redis to confirm it), check the state, wait a bounded slice, re-check.
Messages can be lost when the connection drops, so after a reconnect every subscription gets
a ``RESYNC`` marker once its channel is confirmed again, telling its waiter to re-check now.

Unsubscribing lingers a few seconds, because a host usually waits on the same session again
right after (the next round), and a warm subscription saves a round trip per step.

Every live step wakes one waiter on the host and one on the worker, so the read path is on
the critical path of step latency. On a real Redis the connection is opened by redis-py (so
every URL option applies: ACL user, password, TLS, database, timeouts) and then taken over:
hiredis parses pushes right in the transport's ``data_received``, with no task wake-up and
no response dict per message (about a third of redis-py's per-message CPU). In-memory
servers (fakeredis) have no socket to take over and keep redis-py's ``PubSub``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from collections.abc import Callable
from typing import Any, Final

import hiredis
from redis.asyncio import Redis
from redis.asyncio.client import PubSub
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from .errors import WaitTimeout
from .takeover import abandon, on_socket, take_over

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


class _Wire(asyncio.Protocol):
    """A redis-py connection after its handshake, with its transport taken over."""

    def __init__(self, on_push: Callable[[Any], None]) -> None:
        self._conn: AbstractConnection | None = None
        self._transport: asyncio.Transport  # set by open(), before any use
        self._parser = hiredis.Reader()
        self._on_push = on_push
        #: Resolves (to the cause, if any) when the connection is gone.
        self.lost: asyncio.Future[Exception | None] = asyncio.get_running_loop().create_future()

    @classmethod
    async def open(cls, client: Redis, on_push: Callable[[Any], None]) -> _Wire:
        wire = cls(on_push)
        wire._conn, wire._transport = await take_over(client, wire)
        return wire

    def send(self, command: str, *channels: str) -> None:
        args: tuple[Any, ...] = (command, *channels)  # hiredis's stub wants a 1-tuple
        self._transport.write(hiredis.pack_command(args))

    def data_received(self, data: bytes) -> None:
        parser = self._parser
        parser.feed(data)
        try:
            while (reply := parser.gets()) is not False:
                self._on_push(reply)
        except hiredis.ProtocolError as exc:
            self.connection_lost(exc)
            self._transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.lost.done():
            self.lost.set_result(exc)

    def close(self) -> None:
        self._transport.close()
        abandon(self._conn)


class Multiplexer:
    def __init__(
        self,
        client: Redis,
        home_channel: str,
        *,
        linger_s: float = 5.0,
        confirm_timeout_s: float = 10.0,
    ) -> None:
        self._client = client
        self._home = home_channel
        self._linger_s = linger_s
        self._confirm_timeout_s = confirm_timeout_s
        self._raw = on_socket(client)
        self._wire: _Wire | None = None  # real Redis: the live connection, None while down
        self._ps: PubSub | None = None  # in-memory server
        self._subs: dict[str, set[Subscription]] = {}
        self._confirmed: set[str] = set()
        self._confirm_waiters: dict[str, asyncio.Event] = {}
        self._linger: dict[str, asyncio.TimerHandle] = {}
        self._resync_pending: set[str] = set()
        self._requested: set[str] = set()  # SUBSCRIBE sent, confirmation not yet seen
        self._reader: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        self._closed = False
        self.reconnects = 0

    async def start(self) -> None:
        # Under the lock, and the reader set only once connected: two first subscribes racing
        # here would otherwise each open a connection and one SUBSCRIBE would go unread.
        async with self._lock:
            if self._reader is not None:
                return
            if self._raw:
                await self._reconnect()
                loop = self._keep_connected()
            else:
                ps = self._client.pubsub()
                await ps.subscribe(self._home)
                self._ps = ps
                loop = self._read_loop()
            self._reader = asyncio.create_task(loop, name=f"pubsub:{self._home}")

    async def subscribe(
        self, channel: str, on_message: Callable[[bytes], None] | None = None
    ) -> Subscription:
        """A subscription whose channel Redis has confirmed: nothing published after
        this returns can be missed (short of a dropped connection, see RESYNC)."""
        if self._reader is None:
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
        async with self._lock:
            if channel not in self._confirmed and channel not in self._requested:
                self._requested.add(channel)
                if self._ps is not None:
                    await self._ps.subscribe(channel)
                elif self._wire is not None and not self._wire.lost.done():
                    self._wire.send("SUBSCRIBE", channel)
                else:  # down: reconnect now, as redis-py's own subscribe would
                    try:
                        await self._reconnect()  # which subscribes this channel too
                    except BaseException:
                        self._requested.discard(channel)
                        self._release(sub)
                        raise
        try:
            await asyncio.wait_for(event.wait(), self._confirm_timeout_s)
        except TimeoutError:
            self._requested.discard(channel)  # so the next subscribe sends SUBSCRIBE again
            self._release(sub)
            raise WaitTimeout(
                f"redis did not confirm the subscription to {channel} within "
                f"{self._confirm_timeout_s} s; is the server reachable?"
            ) from None
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
            if self._subs.get(channel) or self._reader is None or self._closed:
                return
            self._subs.pop(channel, None)
            self._confirmed.discard(channel)
            self._requested.discard(channel)
            self._resync_pending.discard(channel)
            self._confirm_waiters.pop(channel, None)
            if self._wire is not None:
                self._wire.send("UNSUBSCRIBE", channel)
            elif self._ps is not None:
                with contextlib.suppress(RedisConnectionError, RedisTimeoutError, OSError):
                    await self._ps.unsubscribe(channel)

    # -- real Redis: our own connection ---------------------------------------------------

    async def _connect(self) -> _Wire:
        return await _Wire.open(self._client, self._on_push)

    async def _reconnect(self) -> None:
        """Under the lock: a new connection, subscribed to every channel in use (lingering
        ones too: their RESYNC may be pending, and their waiter may come back)."""
        if self._wire is not None:
            if not self._wire.lost.done():
                return
            self._lost(self._wire)
        wire = await self._connect()
        if self._closed:  # aclose ran while we connected: it could not close this one
            wire.close()
            raise RedisConnectionError("the multiplexer is closed")
        channels = {self._home, *self._subs}
        self._requested |= channels
        wire.send("SUBSCRIBE", *channels)
        self._wire = wire

    def _lost(self, wire: _Wire) -> None:
        if wire is not self._wire:
            return  # already handled (by a subscribe that found the connection down)
        self._wire = None
        wire.close()
        self._on_broken(wire.lost.result() or RedisConnectionError("closed by the server"))

    async def _keep_connected(self) -> None:
        backoff = 0.05
        while not self._closed:
            if (wire := self._wire) is not None:
                await asyncio.shield(wire.lost)  # aclose cancels us, not the connection's fate
                self._lost(wire)
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

    # -- in-memory server: redis-py's PubSub ----------------------------------------------

    async def _read_loop(self) -> None:
        assert self._ps is not None
        backoff = 0.05
        while not self._closed:
            try:
                msg = await self._ps.get_message(ignore_subscribe_messages=False, timeout=None)
            except asyncio.CancelledError:
                raise
            except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
                self._on_broken(exc)
                self._on_unreachable(exc)  # redis-py's Retry has given up
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
                continue
            backoff = 0.05
            if msg is not None:
                self._dispatch(msg)

    def _dispatch(self, msg: dict[str, object]) -> None:
        kind = msg.get("type")
        raw = msg.get("channel")
        channel = raw.decode() if isinstance(raw, bytes) else str(raw)
        if kind == "message":
            data = msg.get("data")
            payload = data if isinstance(data, bytes) else str(data).encode()
            for sub in list(self._subs.get(channel, ())):
                sub._put(payload)
        elif kind == "subscribe":
            if channel in self._confirmed and channel not in self._requested:
                # Confirmed again without our asking: redis-py reconnected and re-subscribed
                # by itself, so messages may have been lost in between.
                if channel == self._home:  # re-subscribed first: count the reconnect once
                    self.reconnects += 1
                    log.warning("pub/sub connection was re-established; waiters re-check")
                self._resync_pending.add(channel)
            self._on_confirmed(channel)
        elif kind == "unsubscribe":
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
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reader
        # UNSUBSCRIBE explicitly, not only by closing: a pooled or in-memory connection may
        # outlive this object, and nobody should count it as a listener.
        if self._wire is not None:
            self._wire.send("UNSUBSCRIBE")
            self._wire.close()
            self._wire = None
        if self._ps is not None:
            with contextlib.suppress(Exception):
                await self._ps.unsubscribe()
            with contextlib.suppress(Exception):
                await self._ps.aclose()  # type: ignore[no-untyped-call]
        self._ps = None
