"""``Transport``: every conversation a process component has with Redis, bounded and typed.

The registry, the worker and their collaborators (scripts, locks, GC) hold a ``Transport``
and nothing of redis-py: commands and scripts go through ``execute``/``execute_many``/
``evalsha`` over one pipelined connection (``pipe.Pipe``), waits through ``multiplexer``.

**On a Redis Cluster** (a ``redis+cluster://`` URL) there is one ``Pipe`` per primary
(``topology.Topology``), and each command goes to the primary that owns the slot of its key
(``slots.routing_key``; ``routing.Router`` follows MOVED/ASK and failovers within the same
budget). A keyless command (PING, INFO, SCRIPT, PUBSUB, WAIT, ...) names its node with
``node="host:port"`` (one of ``primaries()``), or runs through ``execute_on``; without one it
goes to the first primary, and inside ``execute_many`` with the command before it (so ``WAIT``
follows its write). On a single server or Sentinel, ``node`` is ignored.

**Every call is bounded.** One budget per call (``Settings.redis_timeout_s``, or the
caller's own timeout when shorter) covers connecting, the handshake, the reply and every
retry; nothing below retries on its own (the pools are built with no retries), so retries
are never wrapped in retries. Connection failures, timeouts, a server still loading its data
or one that just became a replica are retried with capped backoff until the budget is spent;
then the call raises ``Unavailable`` naming the server (password masked) and the last cause.
A server that refuses us (credentials, no such database) raises ``Misconfigured`` at once.
Retrying is safe because every write is one script that recognises its own repetition (feed
tokens, fences, ids with 128 random bits).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar, cast

from redis.asyncio import ConnectionPool, Redis
from redis.exceptions import (
    AuthenticationError,
    NoPermissionError,
    NoScriptError,
    OutOfMemoryError,
    ReadOnlyError,
    RedisError,
    ResponseError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from ..errors import CorruptState, Misconfigured, NotReplicated, SessionError, Unavailable
from .pipe import Pipe, pack
from .pubsub import Multiplexer
from .routing import Router, Unit, transient, units_of
from .target import Target, close_pool
from .topology import Topology

log = logging.getLogger(__name__)
T = TypeVar("T")

#: Longest one connect (with its handshake) may take inside a call's budget.
CONNECT_TIMEOUT_S = 2.0
#: A non-cluster transport's one node, as ``primaries()`` names it: all slots.
ALL_SLOTS = [(0, 16383)]


class Transport:
    def __init__(
        self,
        pool: ConnectionPool,
        *,
        safe_url: str,
        timeout_s: float = 5.0,
        admin: Callable[[], Redis] | None = None,
        allow_eviction: bool = False,
        cluster: Target | None = None,
    ) -> None:
        """``cluster``: a ``redis+cluster://`` target (commands then go to its primaries,
        not to ``pool``)."""
        self.safe_url = safe_url
        self.timeout_s = timeout_s
        self._pool = pool
        self._allow_eviction = allow_eviction
        self._pipe = self._new_pipe(pool)
        self._topology: Topology | None = None
        self._router: Router | None = None
        if cluster is not None:
            self._topology = Topology(
                cluster, make_pipe=self._new_pipe, timeout_s=timeout_s, pool_options={
                    "socket_timeout": None,
                    "socket_connect_timeout": min(CONNECT_TIMEOUT_S, timeout_s)})
            self._router = Router(self._topology, timeout_s=timeout_s,
                                  unavailable=self._unavailable, refused=self._refused,
                                  failed=self._failed)
        self._make_admin = admin
        self._admin: Redis | None = None
        self._muxes: list[Multiplexer] = []
        #: Called with each command once its reply came (tests and debugging count
        #: round trips with it); None costs one check per call.
        self.trace: Callable[[tuple[Any, ...]], None] | None = None

    @classmethod
    def from_url(cls, url: str, *, timeout_s: float = 5.0,
                 allow_eviction: bool = False) -> Transport:
        """A transport to the server ``url`` names (checked first: ``InvalidInput``).
        ``allow_eviction``: accept a server whose ``maxmemory-policy`` evicts keys."""
        target = Target.parse(url)
        connect_s = min(CONNECT_TIMEOUT_S, timeout_s)
        pool = target.pool(socket_timeout=None, socket_connect_timeout=connect_s)

        def admin() -> Redis:
            if target.is_cluster:  # a RedisCluster: most of Redis's commands, routed
                return cast(Redis, target.cluster_client(
                    socket_timeout=timeout_s, socket_connect_timeout=connect_s))
            # from_pool: the client owns the pool, so its aclose() closes the connections
            return Redis.from_pool(target.pool(
                socket_timeout=timeout_s, socket_connect_timeout=connect_s))

        return cls(pool, safe_url=target.safe_url, timeout_s=timeout_s, admin=admin,
                   allow_eviction=allow_eviction,
                   cluster=target if target.is_cluster else None)

    @classmethod
    def in_memory(cls, server: Any, *, timeout_s: float = 5.0) -> Transport:
        """A transport to a fakeredis ``FakeServer`` (the embedded default and fast tests):
        the same code path, over fakeredis's in-memory connections."""
        import fakeredis

        def admin() -> Redis:
            return fakeredis.FakeAsyncRedis(server=server)

        pool = admin().connection_pool
        return cls(pool, safe_url="memory://embedded", timeout_s=timeout_s, admin=admin,
                   allow_eviction=True)

    def _new_pipe(self, pool: ConnectionPool) -> Pipe:
        return Pipe(pool, reply_timeout_s=self.timeout_s,
                    connect_timeout_s=min(CONNECT_TIMEOUT_S, self.timeout_s),
                    on_refused=self._refused, on_connected=self._check_server)

    @property
    def is_cluster(self) -> bool:
        return self._router is not None

    async def primaries(self, timeout: float | None = None
                        ) -> list[tuple[str, list[tuple[int, int]]]]:
        """Each primary (``"host:port"``) with its slot ranges; a single server (or the
        primary behind Sentinel) is one entry named by ``safe_url``, with every slot."""
        if self._topology is None:
            return [(self.safe_url, list(ALL_SLOTS))]
        topology = self._topology
        await self._bounded(lambda left: topology.ensure(left), timeout, "CLUSTER SLOTS")
        return topology.primaries()

    async def execute_on(self, node: str, *args: Any, timeout: float | None = None) -> Any:
        """A (keyless) command on one primary, as ``primaries()`` names it: ``INFO
        commandstats`` per primary, ``PUBSUB SHARDNUMSUB``, ``SCRIPT FLUSH``, ... On a single
        server ``node`` is ignored."""
        return await self.execute(*args, timeout=timeout, node=node)

    @property
    def client(self) -> Redis:
        """A plain redis-py client on the same server, for tools and tests that inspect keys
        (and for redis-py's ``Lock``, which wants one). The coordinator's own calls never go
        through it. On a cluster, a ``redis.asyncio.RedisCluster`` on the URL's seeds."""
        if self._admin is None:
            if self._make_admin is None:
                raise RuntimeError("this transport has no admin client")
            self._admin = self._make_admin()
        return self._admin

    # -- calls ---------------------------------------------------------------------------

    async def execute(self, *args: Any, timeout: float | None = None,
                      node: str | None = None) -> Any:
        """One command's reply; ``SessionError`` subclasses on failure. ``node``: where a
        keyless command runs on a cluster (see the module docstring)."""
        try:
            return await self.execute_raw(args, timeout, node=node)
        except ResponseError as exc:
            raise _refusal(exc, str(args[0])) from None

    async def execute_many(self, commands: Sequence[tuple[Any, ...]], *,
                           timeout: float | None = None, node: str | None = None) -> list[Any]:
        """Commands in one write; their replies in order, error replies as redis-py
        exception objects in the list (callers that need every reply use ``checked``). On a
        cluster: one write per primary, concurrently; ``node`` sends them all to one."""
        if not commands:
            return []
        if self._router is not None:
            units = units_of(commands, node)
            return await self._routed(units, timeout, str(commands[0][0]))
        packed = b"".join([pack(c) for c in commands])
        n = len(commands)
        replies: list[Any] = await self._bounded(
            lambda left: self._pipe.call(packed, n, batch=True, timeout=left), timeout,
            str(commands[0][0]))
        if self.trace is not None:
            for command in commands:
                self.trace(command)
        return replies

    async def evalsha(self, sha: str, source: str, keys: Sequence[str], args: Sequence[Any],
                      *, timeout: float | None = None) -> Any:
        """A script by SHA, loaded on NOSCRIPT (a restarted server, a SCRIPT FLUSH)."""
        command = ("EVALSHA", sha, len(keys), *keys, *args)
        try:
            if self._router is not None:  # NOSCRIPT: loaded by the router, on that node
                (reply,) = await self._routed([Unit([command], None, source)], timeout,
                                              "a script")
                if isinstance(reply, ResponseError):
                    raise reply
                return reply
            try:
                return await self.execute_raw(command, timeout)
            except NoScriptError:
                await self.execute_raw(("SCRIPT", "LOAD", source), timeout)
                return await self.execute_raw(command, timeout)
        except ResponseError as exc:
            raise _refusal(exc, "a script") from None

    async def evalsha_replicated(self, sha: str, source: str, keys: Sequence[str],
                                 args: Sequence[Any], *, replicas: int, wait_ms: int,
                                 timeout: float | None = None) -> Any:
        """``evalsha``, then ``WAIT replicas wait_ms`` in the same write (one round trip
        more only for the replicas' acknowledgement); ``NotReplicated`` when fewer confirm."""
        command = ("EVALSHA", sha, len(keys), *keys, *args)
        wait = ("WAIT", replicas, wait_ms)
        budget = None if timeout is None else timeout + wait_ms / 1000
        if self._router is not None:  # one unit: WAIT on the EVALSHA's connection
            reply, acked = await self._routed([Unit([command, wait], None, source)], budget,
                                              "a script")
        else:
            reply, acked = await self.execute_many([command, wait], timeout=budget)
        if isinstance(reply, NoScriptError):
            await self.execute_raw(("SCRIPT", "LOAD", source), timeout)
            reply, acked = await self.execute_many([command, wait], timeout=budget)
        if isinstance(reply, ResponseError):
            raise _refusal(reply, "a script") from None
        self._check_acked(acked, replicas, wait_ms, "applied the write")
        return reply

    async def confirm_replicated(self, channel: str, *, replicas: int, wait_ms: int,
                                 timeout: float | None = None) -> None:
        """Wait until ``replicas`` replicas hold every write made so far on the primary of
        ``channel``'s slot, by any connection; ``NotReplicated`` when fewer confirm in time.

        ``WAIT`` counts up to the last write of *its own* connection, so this one first
        makes a write of its own that changes nothing (``SPUBLISH`` on ``channel``, which
        nobody reads; it is replicated like any write): what another process committed
        before it (a worker's step that a host is about to report) is then covered."""
        command = ("SPUBLISH", channel, b"")
        wait = ("WAIT", replicas, wait_ms)
        budget = None if timeout is None else timeout + wait_ms / 1000
        if self._router is not None:  # one unit: WAIT on the SPUBLISH's connection
            _, acked = await self._routed([Unit([command, wait], None)], budget, "a sync")
        else:
            _, acked = await self.execute_many([command, wait], timeout=budget)
        self._check_acked(acked, replicas, wait_ms, "holds the state")

    def _check_acked(self, acked: Any, replicas: int, wait_ms: int, done: str) -> None:
        if isinstance(acked, Exception) or int(acked) < replicas:
            raise NotReplicated(
                f"redis at {self.safe_url} {done}, but only {acked} of {replicas} "
                f"replica(s) confirmed it within {wait_ms} ms; a failover now could lose it: "
                "re-read the session before repeating it", url=self.safe_url,
                cause=f"WAIT {replicas} {wait_ms} -> {acked}")

    async def execute_raw(self, command: tuple[Any, ...], timeout: float | None, *,
                          node: str | None = None) -> Any:
        """``execute`` with error replies left as redis-py's ``ResponseError``."""
        if self._router is not None:
            (reply,) = await self._routed([Unit([command], node)], timeout, str(command[0]))
            if isinstance(reply, ResponseError):
                raise reply
            return reply
        packed = pack(command)
        reply = await self._bounded(lambda left: self._pipe.call(packed, timeout=left),
                                    timeout, str(command[0]))
        if self.trace is not None:
            self.trace(command)
        return reply

    async def _routed(self, units: list[Unit], timeout: float | None, what: str) -> list[Any]:
        """Cluster: the units' replies, flat, in order."""
        assert self._router is not None
        await self._router.run(units, timeout, what)
        replies = [reply for unit in units for reply in unit.replies or ()]
        if self.trace is not None:
            for unit in units:
                for command in unit.commands:
                    self.trace(command)
        return replies

    async def ping(self, timeout: float | None = None) -> None:
        await self.execute("PING", timeout=timeout)

    def multiplexer(self, home_channel: str) -> Multiplexer:
        """This process's subscriptions (sharded pub/sub); on a cluster each channel is heard
        on the primary that owns its slot."""
        mux = Multiplexer(self._pool, home_channel, safe_url=self.safe_url,
                          timeout_s=self.timeout_s, placement=self._topology)
        self._muxes.append(mux)
        return mux

    async def aclose(self) -> None:
        for mux in self._muxes:
            await mux.aclose()
        await self._pipe.aclose()
        if self._topology is not None:
            await self._topology.aclose()
        if self._admin is not None:
            admin, self._admin = self._admin, None
            await admin.aclose()
            pool = getattr(admin, "connection_pool", None)  # a RedisCluster has none
            if pool is not None:
                await close_pool(pool)
        await close_pool(self._pool)

    async def _check_server(self, conn: Any) -> None:
        """Refuse a server that evicts keys: an evicted session key, stream entry or lock
        silently breaks sessions (seen: sessions lost, stuck, or completed with a wrong
        result under ``allkeys-lru``). Read from ``INFO memory`` (not CONFIG, which a
        least-privilege user should not have); a server that refuses INFO is trusted."""
        if self._allow_eviction:
            return
        await conn.send_packed_command(pack(("INFO", "memory")), check_health=False)
        try:
            reply = await conn.read_response()
        except ResponseError:
            return
        policy = ""
        for line in _text(reply).splitlines():
            if line.startswith("maxmemory_policy:"):
                policy = line.partition(":")[2].strip()
        if policy.startswith(("allkeys-", "volatile-")):
            raise Misconfigured(
                f"redis at {self.safe_url} has maxmemory-policy {policy}: it may evict "
                "session keys, which silently breaks sessions. Set it to noeviction "
                "(CONFIG SET maxmemory-policy noeviction), or set ALC_ALLOW_EVICTION=1 "
                "if you accept that risk")

    # -- the budget ----------------------------------------------------------------------

    async def _bounded(self, attempt: Callable[[float], Awaitable[T]], timeout: float | None,
                       what: str) -> T:
        loop = asyncio.get_running_loop()
        budget = self.timeout_s if timeout is None else max(0.001, min(timeout, self.timeout_s))
        deadline = loop.time() + budget
        backoff = 0.02
        cause: BaseException | None = None
        while True:
            left = deadline - loop.time()
            if cause is not None and left <= 0.01:  # not worth another attempt
                raise self._unavailable(what, cause, budget) from None
            try:
                return await attempt(left)
            except ReadOnlyError as exc:  # a demoted primary: reconnect (Sentinel re-resolves)
                self._pipe.reset(exc)
                cause = exc
            except AuthenticationError as exc:
                raise self._refused(exc) from None
            except ResponseError as exc:
                if not transient(exc):
                    raise
                cause = exc
            except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
                if _unresolvable(exc):
                    raise Unavailable(
                        f"redis at {self.safe_url} cannot be reached: its host name does not "
                        f"resolve ({_cause(exc)}); check the host in the URL",
                        url=self.safe_url, cause=_cause(exc)) from None
                cause = exc
            except RedisError as exc:
                raise SessionError(f"redis at {self.safe_url} failed {what}: {exc}") from None
            left = deadline - loop.time()
            if left <= 0.01:
                raise self._unavailable(what, cause, budget) from None
            log.debug("redis %s: %s failed (%s); retrying in %.2f s", self.safe_url, what,
                      cause, min(backoff, left))
            await asyncio.sleep(min(backoff, left))
            backoff = min(backoff * 2, 0.5)

    def _unavailable(self, what: str, cause: BaseException, budget: float) -> Unavailable:
        text = _cause(cause)
        return Unavailable(
            f"redis at {self.safe_url} is unavailable: {what} got no answer within "
            f"{budget:g} s (last error: {text}); a write may or may not have been applied (each "
            "is all or nothing): re-read the session once Redis is back before repeating it",
            url=self.safe_url, cause=text)

    def _failed(self, node: str, exc: BaseException) -> SessionError:
        return SessionError(f"redis at {self.safe_url} (node {node}) failed: {exc}")

    def _refused(self, exc: BaseException) -> Misconfigured:
        text = str(exc)
        hint = ""
        if "DB index is out of range" in text:
            hint = ("; the database number in the URL does not exist on this server "
                    "(see `CONFIG GET databases`)")
        elif isinstance(exc, AuthenticationError) or "NOAUTH" in text or "WRONGPASS" in text:
            hint = "; check the user name and password in the URL"
        return Misconfigured(f"redis at {self.safe_url} refused the connection: {text}{hint}")


def checked(replies: list[Any]) -> list[Any]:
    """A batch's replies, raising the first that is an error (for callers that need all)."""
    for reply in replies:
        if isinstance(reply, Exception):
            raise _refusal(reply, "a batched command") if isinstance(reply, ResponseError) \
                else reply
    return replies


def _refusal(exc: ResponseError, what: str) -> SessionError:
    text = str(exc)
    if isinstance(exc, OutOfMemoryError) or text.startswith("OOM"):
        return Unavailable(f"redis refused {what}: it is full (maxmemory reached, "
                           f"{text}); free memory or raise maxmemory, then retry",
                           cause=text)
    if text.startswith("NOREPLICAS") or "NOREPLICAS" in type(exc).__name__.upper():
        return Unavailable(f"redis refused {what}: {text}; the primary has fewer healthy "
                           "replicas than its min-replicas-to-write: nothing was written, "
                           "retry once a replica is back", cause=text)
    if text.startswith("NOPERM") or isinstance(exc, NoPermissionError):
        return Misconfigured(f"redis refused {what}: {text}; the URL's user lacks a "
                             "permission the coordinator needs (see the README's ACL notes)")
    if text.startswith("WRONGTYPE"):
        return CorruptState(f"redis refused {what}: {text}; a key holds data this "
                            "coordinator did not write")
    return SessionError(f"redis refused {what}: {text}")


def _unresolvable(exc: BaseException) -> bool:
    """A host name that does not resolve will not resolve on the next try either."""
    text = str(exc)
    return "Name or service not known" in text or "nodename nor servname" in text


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _cause(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError) and not str(exc):
        return "timed out"
    return str(exc) or type(exc).__name__
