"""One pub/sub connection per process (per primary, on a cluster), fanned out to waiters.

Sharded pub/sub everywhere (``SSUBSCRIBE``/``SPUBLISH``): on a single server, behind Sentinel,
on fakeredis and on a cluster alike. On a cluster a shard channel is heard only on the primary
that owns its slot, so each channel is subscribed there (one connection per primary that has
channels; one ``SSUBSCRIBE`` per slot, as several slots in one are refused); when the server
drops a channel nobody here asked to drop (its slot moved, or its node was demoted), or the
connection to its node is lost, the slot map is read again, the channel subscribed on its
owner, and its waiters get ``RESYNC`` once that is confirmed.

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
from collections.abc import Callable, Coroutine
from typing import Any, Final, Protocol

from redis.asyncio import ConnectionPool
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from ..errors import Unavailable
from .pipe import pack
from .routing import redirect
from .slots import key_slot

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
        elif not (item is RESYNC and self._items and self._items[-1] is RESYNC):
            # RESYNC means "re-read the state": one unread says all that several would (an
            # outage queues one per failed reconnect, then one when the channel is back)
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
        await self.send_many([(command, *channels)])

    async def send_many(self, commands: list[tuple[str, ...]]) -> None:
        if self.lost.done() or not commands:
            return  # the reconnect subscribes every channel anew
        try:
            await self._conn.send_packed_command(b"".join(pack(c) for c in commands),
                                                 check_health=False)
        except Exception as exc:
            self._done(exc)

    async def _read(self) -> None:
        try:
            while True:
                try:
                    reply = await self._conn.read_response()
                except ResponseError as exc:  # an error reply (MOVED): the connection is fine
                    reply = exc
                self._on_push(reply)
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


class Placement(Protocol):
    """Where each channel is heard: one node for a single server, the owner of the channel's
    slot on a cluster (``topology.Topology``)."""

    clustered: bool

    def owner(self, key: Any) -> str: ...

    def pool(self, node: str) -> ConnectionPool: ...

    async def ensure(self, timeout: float) -> None: ...

    async def refresh(self, timeout: float) -> None: ...


class _Single:
    """A single server (or the primary behind Sentinel): every channel on one connection."""

    clustered = False

    def __init__(self, pool: ConnectionPool) -> None:
        self._pool = pool

    def owner(self, key: Any) -> str:
        return ""

    def pool(self, node: str) -> ConnectionPool:
        return self._pool

    async def ensure(self, timeout: float) -> None:
        return None

    async def refresh(self, timeout: float) -> None:
        return None


class _Node:
    """One server's subscribed connection, its keeper task and the lock its writes take."""

    __slots__ = ("conn", "keeper", "lock", "name")

    def __init__(self, name: str) -> None:
        self.name = name
        self.conn: _Listener | None = None  # the live connection, None while down
        self.keeper: asyncio.Task[None] | None = None
        self.lock = asyncio.Lock()

    def up(self) -> bool:
        return self.conn is not None and not self.conn.lost.done()


class Multiplexer:
    def __init__(
        self,
        pool: ConnectionPool | None,
        home_channel: str,
        *,
        safe_url: str = "redis",
        timeout_s: float = 5.0,
        linger_s: float = 5.0,
        placement: Placement | None = None,
    ) -> None:
        if placement is None:
            if pool is None:
                raise ValueError("a multiplexer needs a pool or a placement")
            placement = _Single(pool)
        self._placement = placement
        self._home = home_channel
        self._safe_url = safe_url
        self._timeout_s = timeout_s
        self._linger_s = linger_s
        self._nodes: dict[str, _Node] = {}
        self._where: dict[str, str] = {}  # channel -> the node it is (to be) heard on
        self._subs: dict[str, set[Subscription]] = {}
        self._confirmed: set[str] = set()
        self._confirm_waiters: dict[str, asyncio.Event] = {}
        self._linger: dict[str, asyncio.TimerHandle] = {}
        self._resync_pending: set[str] = set()
        self._requested: set[str] = set()  # SSUBSCRIBE sent, confirmation not yet seen
        self._dropping: dict[str, int] = {}  # our SUNSUBSCRIBEs not yet confirmed
        self._moving: set[str] = set()  # channels being re-placed (their slot moved)
        self._tasks: set[asyncio.Task[None]] = set()  # re-placements in flight
        self._started = False
        self._lock = asyncio.Lock()  # start()
        self._closed = False
        self.reconnects = 0

    async def start(self) -> None:
        # Under the lock, and started only once connected: two first subscribes racing
        # here would otherwise each open a connection and one SSUBSCRIBE would go unread.
        async with self._lock:
            if self._started:
                return
            loop = asyncio.get_running_loop()
            deadline = loop.time() + self._timeout_s
            backoff = 0.02
            while True:  # within the transport's budget, as every other call
                try:
                    async with asyncio.timeout(max(0.01, deadline - loop.time())):
                        await self._placement.ensure(deadline - loop.time())
                        node = self._node(self._where.get(self._home)
                                          or self._placement.owner(self._home))
                        self._where[self._home] = node.name
                        async with node.lock:
                            await self._reconnect(node)
                    break
                except (TimeoutError, RedisError, OSError) as exc:
                    if loop.time() + backoff >= deadline:
                        raise Unavailable(
                            f"redis at {self._safe_url} is unavailable: cannot subscribe "
                            f"within {self._timeout_s:g} s (last error: {_cause(exc)})",
                            url=self._safe_url, cause=_cause(exc)) from None
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, 0.5)
            self._started = True

    async def subscribe(
        self, channel: str, on_message: Callable[[bytes], None] | None = None
    ) -> Subscription:
        """A subscription whose channel Redis has confirmed: nothing published after
        this returns can be missed (short of a dropped connection, see RESYNC). Raises
        ``Unavailable`` when Redis cannot confirm it within the transport's bound."""
        if not self._started:
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
        last: BaseException | None = None
        try:
            async with asyncio.timeout(self._timeout_s):
                backoff = 0.02
                while True:  # a failing connect is retried within the bound (a failover)
                    try:
                        await self._request(channel)
                        break
                    except (RedisError, OSError) as exc:
                        last = exc
                        self._requested.discard(channel)
                        self._where.pop(channel, None)  # re-resolve: the owner may move
                        await asyncio.sleep(backoff)
                        backoff = min(backoff * 2, 0.5)
                await event.wait()
        except BaseException as exc:
            self._requested.discard(channel)  # so the next subscribe sends SSUBSCRIBE again
            self._release(sub)
            if isinstance(exc, TimeoutError | RedisError | OSError):
                cause = _cause(last if isinstance(exc, TimeoutError) and last else exc)
                raise Unavailable(
                    f"redis at {self._safe_url} did not confirm the subscription to "
                    f"{channel} within {self._timeout_s:g} s ({cause}); is it reachable?",
                    url=self._safe_url, cause=cause) from None
            raise
        return sub

    async def _request(self, channel: str) -> None:
        """Send SSUBSCRIBE for ``channel`` on its node (connecting it first when down)."""
        node = self._node(self._where.get(channel) or self._placement.owner(channel))
        self._where[channel] = node.name
        async with node.lock:
            if channel not in self._confirmed and channel not in self._requested \
                    and self._where.get(channel) == node.name:
                self._requested.add(channel)
                if node.up():
                    await node.conn.send("SSUBSCRIBE", channel)  # type: ignore[union-attr]
                else:  # down: reconnect now (which subscribes this channel too)
                    await self._reconnect(node)

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
        await self._unsubscribe(channel, explicit=True)

    async def _unsubscribe(self, channel: str, *, explicit: bool = False) -> None:
        """``explicit``: asked by ``drop``, which may drop even the home channel (a process
        that must stop being counted alive); a lingering subscription never drops it."""
        self._linger.pop(channel, None)
        name = self._where.get(channel)
        if name is None or (channel == self._home and not explicit):
            return
        node = self._node(name)
        async with node.lock:
            # Re-checked under the lock: a subscribe may have come in while we waited.
            if self._subs.get(channel) or not self._started or self._closed \
                    or self._where.get(channel) != name:
                return
            self._forget(channel)
            if node.up():
                self._dropping[channel] = self._dropping.get(channel, 0) + 1
                await node.conn.send("SUNSUBSCRIBE", channel)  # type: ignore[union-attr]

    def _forget(self, channel: str) -> None:
        self._subs.pop(channel, None)
        self._where.pop(channel, None)
        self._confirmed.discard(channel)
        self._requested.discard(channel)
        self._resync_pending.discard(channel)
        self._confirm_waiters.pop(channel, None)

    # -- the connections -----------------------------------------------------------------

    def _node(self, name: str) -> _Node:
        node = self._nodes.get(name)
        if node is None:
            node = self._nodes[name] = _Node(name)
        return node

    def _channels(self, node: _Node) -> list[str]:
        return [ch for ch, name in self._where.items() if name == node.name]

    async def _reconnect(self, node: _Node) -> None:
        """Under ``node.lock``: a new connection, subscribed to every channel heard there
        (lingering ones too: their RESYNC may be pending, and their waiter may come back)."""
        if node.conn is not None:
            if not node.conn.lost.done():
                return
            await self._lost(node, node.conn)
        conn = await _Listener.open(self._placement.pool(node.name),
                                    lambda reply: self._on_push(node, reply), self._timeout_s)
        if self._closed:  # aclose ran while we connected: it could not close this one
            await conn.close()
            raise RedisConnectionError("the multiplexer is closed")
        channels = self._channels(node)
        self._requested.update(channels)
        node.conn = conn
        if node.keeper is None or node.keeper.done():
            node.keeper = asyncio.create_task(self._keep_connected(node),
                                              name=f"pubsub:{self._home}:{node.name}")
        await conn.send_many(self._commands("SSUBSCRIBE", channels))

    def _commands(self, command: str, channels: list[str]) -> list[tuple[str, ...]]:
        """One command for every channel on a single server; one per slot on a cluster
        (several slots in one SSUBSCRIBE are refused there with CROSSSLOT)."""
        if not channels:
            return []
        if not self._placement.clustered:
            return [(command, *channels)]
        by_slot: dict[int, list[str]] = {}
        for channel in channels:
            by_slot.setdefault(key_slot(channel), []).append(channel)
        return [(command, *group) for group in by_slot.values()]

    async def _lost(self, node: _Node, conn: _Listener) -> None:
        if conn is not node.conn:
            return  # already handled (by a subscribe that found the connection down)
        node.conn = None
        await conn.close()
        cause = conn.lost.result() if conn.lost.done() else None
        self._on_broken(node, cause or RedisConnectionError("closed by the server"))

    async def _keep_connected(self, node: _Node) -> None:
        backoff = 0.05
        while not self._closed:
            if (conn := node.conn) is not None:
                await asyncio.shield(conn.lost)  # aclose cancels us, not the connection's fate
                async with node.lock:
                    await self._lost(node, conn)
                backoff = 0.05
            if self._placement.clustered:
                await self._replace(self._channels(node))
            if not self._channels(node):
                return  # nothing to hear there any more (a subscribe starts a new keeper)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 2.0)
            async with node.lock:
                try:
                    await self._reconnect(node)
                except (RedisError, OSError) as exc:
                    self._on_unreachable(node, exc)

    async def _replace(self, channels: list[str]) -> None:
        """Cluster: ask for the slot map again and move ``channels`` whose slot has another
        owner now to that owner (their RESYNC follows its confirmation)."""
        try:
            await self._placement.refresh(self._timeout_s)
        except (RedisError, OSError) as exc:
            log.debug("pub/sub: no slot map (%s)", exc)
            return
        moved: dict[str, list[str]] = {}
        for channel in channels:
            owner = self._placement.owner(channel)
            if self._where.get(channel) not in (None, owner):
                self._where[channel] = owner
                moved.setdefault(owner, []).append(channel)
        for name, group in moved.items():
            node = self._node(name)
            async with node.lock:
                fresh = [ch for ch in group
                         if ch not in self._requested and self._where.get(ch) == name]
                self._requested.update(fresh)
                try:
                    if node.up():
                        await node.conn.send_many(  # type: ignore[union-attr]
                            self._commands("SSUBSCRIBE", fresh))
                    else:
                        await self._reconnect(node)
                except (RedisError, OSError) as exc:
                    self._requested.difference_update(fresh)
                    self._on_unreachable(node, exc)

    async def _displaced(self, channels: list[str]) -> None:
        """The server dropped ``channels`` (their slot moved, or the node was demoted)."""
        try:
            await self._replace(channels)
        finally:
            self._moving.difference_update(channels)

    def _on_push(self, node: _Node, reply: Any) -> None:
        if not (isinstance(reply, list) and len(reply) == 3):
            if isinstance(reply, ResponseError):
                self._on_error(node, reply)
            elif not (isinstance(reply, list) and reply and reply[0] == b"pong"):
                log.warning("unexpected reply on the pub/sub connection: %r", reply)
            return
        kind, raw, data = reply
        channel = raw.decode()
        if kind == b"smessage":
            for sub in self._subs.get(channel, ()):
                sub._put(data)
        elif kind == b"ssubscribe":
            self._on_confirmed(channel)
        elif kind == b"sunsubscribe":
            self._on_unsubscribed(node, channel)

    def _on_unsubscribed(self, node: _Node, channel: str) -> None:
        dropping = self._dropping.get(channel, 0)
        if dropping:  # ours
            if dropping == 1:
                del self._dropping[channel]
            else:
                self._dropping[channel] = dropping - 1
            if self._where.get(channel) != node.name:
                return
        self._confirmed.discard(channel)
        if dropping or self._closed or self._where.get(channel) != node.name:
            return
        # Nobody here asked: the server dropped it (slot moved). Heard again on its owner,
        # then RESYNC: what was published meanwhile went unheard.
        log.info("pub/sub: redis dropped %s (its slot moved); re-subscribing", channel)
        if channel in self._subs:
            self._resync_pending.add(channel)
        self._requested.discard(channel)
        if channel not in self._moving:
            self._moving.add(channel)
            self._spawn(self._displaced([channel]))

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _on_error(self, node: _Node, exc: ResponseError) -> None:
        """An error reply to SSUBSCRIBE: MOVED (sent to a node that no longer owns the slot)
        re-places that slot's channels; anything else is logged."""
        found = redirect(exc)
        if found is None:
            log.warning("pub/sub: redis at %s refused a command: %s", node.name, exc)
            return
        slot = found[1]
        channels = [ch for ch in self._channels(node)
                    if key_slot(ch) == slot and ch not in self._confirmed
                    and ch not in self._moving]
        for channel in channels:
            self._requested.discard(channel)
        self._moving.update(channels)
        self._spawn(self._displaced(channels))

    # -- both -----------------------------------------------------------------------------

    def _on_broken(self, node: _Node, exc: BaseException) -> None:
        if not self._resync_pending:
            self.reconnects += 1
            log.warning("pub/sub connection lost (%s); reconnecting", exc)
        # Only channels that were heard can have lost messages (a subscribe still waiting
        # for its confirmation gets it on the new connection); their RESYNC waits for that
        # confirmation: a waiter re-checking before it could still miss what is published.
        channels = set(self._channels(node))
        self._resync_pending |= self._confirmed.intersection(self._subs).intersection(channels)
        self._confirmed -= channels
        self._requested -= channels
        for channel in channels:
            event = self._confirm_waiters.get(channel)
            if event is not None:
                event.clear()

    def _on_unreachable(self, node: _Node, exc: Exception) -> None:
        """Redis cannot be reached for now: waiters re-check at once, so they (and their
        callers) meet the outage instead of waiting out their slice."""
        log.debug("pub/sub reconnect failed: %s", exc)
        for channel in self._channels(node):
            for sub in self._subs.get(channel, ()):
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
        for task in list(self._tasks):
            task.cancel()
        for node in self._nodes.values():
            if node.keeper is not None:
                node.keeper.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await node.keeper
            # a reconnect in flight (bounded) ends, and closes what it opened, before the
            # caller closes the pool under it
            async with node.lock:
                pass
        # SUNSUBSCRIBE explicitly, not only by closing: nobody should count this process as
        # a listener for a moment longer than it is one.
        for node in self._nodes.values():
            if node.conn is not None:
                conn, node.conn = node.conn, None
                with contextlib.suppress(Exception):
                    async with asyncio.timeout(1.0):
                        await conn.send("SUNSUBSCRIBE")
                await conn.close()


def _cause(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError) and not str(exc):
        return "timed out"
    return str(exc) or type(exc).__name__
