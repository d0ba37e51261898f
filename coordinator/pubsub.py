"""One pub/sub connection per process, fanned out to in-process queues.

Pub/sub only wakes a waiter; the Redis keys hold the truth. The protocol every waiter follows:
subscribe (and wait for Redis to confirm it), check the state, wait a bounded slice, re-check.
Messages can be lost when the connection drops, so after a reconnect every subscription gets
a ``RESYNC`` marker once its channel is confirmed again, telling its waiter to re-check now.

Unsubscribing lingers a few seconds, because a host usually waits on the same session again
right after (the next round), and a warm subscription saves a round trip per step.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Final

from redis.asyncio import Redis
from redis.asyncio.client import PubSub
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from .errors import WaitTimeout

log = logging.getLogger(__name__)


class _Resync:
    def __repr__(self) -> str:
        return "RESYNC"


RESYNC: Final = _Resync()
_QUEUE_CAP = 64  # wake-ups only: an old one is as good as a new one


class Subscription:
    """One waiter's view of a channel; use as an async context manager."""

    def __init__(self, mux: Multiplexer, channel: str) -> None:
        self.channel = channel
        self._mux = mux
        self.queue: asyncio.Queue[bytes | _Resync] = asyncio.Queue()

    def _put(self, item: bytes | _Resync) -> None:
        if self.queue.qsize() >= _QUEUE_CAP:
            with contextlib.suppress(asyncio.QueueEmpty):
                self.queue.get_nowait()
        self.queue.put_nowait(item)

    async def get(self, timeout: float) -> bytes | _Resync | None:
        """The next message, ``RESYNC``, or None when ``timeout`` seconds pass."""
        if not self.queue.empty():
            return self.queue.get_nowait()
        try:
            async with asyncio.timeout(max(timeout, 0.0)):  # no extra task, unlike wait_for
                return await self.queue.get()
        except TimeoutError:
            return None

    def close(self) -> None:
        self._mux._release(self)

    async def __aenter__(self) -> Subscription:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()


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
        self._ps: PubSub | None = None
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
        # Under the lock, and _ps set only once connected: two first subscribes racing here
        # would otherwise each open a connection and one SUBSCRIBE would go unread.
        async with self._lock:
            if self._ps is not None:
                return
            ps = self._client.pubsub()
            await ps.subscribe(self._home)
            self._ps = ps
            self._reader = asyncio.create_task(self._read_loop(), name=f"pubsub:{self._home}")

    async def subscribe(self, channel: str) -> Subscription:
        """A subscription whose channel Redis has confirmed: nothing published after
        this returns can be missed (short of a dropped connection, see RESYNC)."""
        if self._ps is None:
            await self.start()
        sub = Subscription(self, channel)
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
                assert self._ps is not None
                self._requested.add(channel)
                await self._ps.subscribe(channel)
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
            if self._subs.get(channel) or self._ps is None or self._closed:
                return
            self._subs.pop(channel, None)
            self._confirmed.discard(channel)
            self._requested.discard(channel)
            self._confirm_waiters.pop(channel, None)
            with contextlib.suppress(RedisConnectionError, RedisTimeoutError, OSError):
                await self._ps.unsubscribe(channel)

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
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
                continue
            backoff = 0.05
            if msg is not None:
                self._dispatch(msg)

    def _on_broken(self, exc: BaseException) -> None:
        if not self._resync_pending:
            self.reconnects += 1
            log.warning("pub/sub connection lost (%s); reconnecting", exc)
        self._confirmed.clear()
        self._requested.clear()
        for event in self._confirm_waiters.values():
            event.clear()
        self._resync_pending = set(self._subs)
        for subs in self._subs.values():
            for sub in subs:
                sub._put(RESYNC)

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
            self._confirmed.add(channel)
            self._requested.discard(channel)
            self._confirm_waiters.setdefault(channel, asyncio.Event()).set()
            if channel in self._resync_pending:
                self._resync_pending.discard(channel)
                for sub in list(self._subs.get(channel, ())):
                    sub._put(RESYNC)
        elif kind == "unsubscribe":
            self._confirmed.discard(channel)

    async def aclose(self) -> None:
        self._closed = True
        for handle in self._linger.values():
            handle.cancel()
        self._linger.clear()
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reader
        if self._ps is not None:
            with contextlib.suppress(Exception):
                # Explicitly, not only by closing: a pooled or in-memory connection may
                # outlive this object, and nobody should count it as a listener.
                await self._ps.unsubscribe()
            with contextlib.suppress(Exception):
                await self._ps.aclose()  # type: ignore[no-untyped-call]
        self._ps = None
