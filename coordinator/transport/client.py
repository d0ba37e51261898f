"""``Transport``: every conversation a process component has with Redis, bounded and typed.

The registry, the worker and their collaborators (scripts, locks, GC) hold a ``Transport``
and nothing of redis-py: commands and scripts go through ``execute``/``execute_many``/
``evalsha`` over one pipelined connection (``pipe.Pipe``), waits through ``multiplexer``.

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
from typing import Any, TypeVar

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
from .target import Target, close_pool

log = logging.getLogger(__name__)
T = TypeVar("T")

#: Longest one connect (with its handshake) may take inside a call's budget.
CONNECT_TIMEOUT_S = 2.0
#: Server replies that mean "not now" rather than "never": retried within the budget.
_TRANSIENT = ("LOADING", "BUSY ", "MASTERDOWN", "TRYAGAIN", "CLUSTERDOWN")


class Transport:
    def __init__(
        self,
        pool: ConnectionPool,
        *,
        safe_url: str,
        timeout_s: float = 5.0,
        admin: Callable[[], Redis] | None = None,
        allow_eviction: bool = False,
    ) -> None:
        self.safe_url = safe_url
        self.timeout_s = timeout_s
        self._pool = pool
        self._allow_eviction = allow_eviction
        self._pipe = Pipe(pool, reply_timeout_s=timeout_s,
                          connect_timeout_s=min(CONNECT_TIMEOUT_S, timeout_s),
                          on_refused=self._refused, on_connected=self._check_server)
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
            # from_pool: the client owns the pool, so its aclose() closes the connections
            return Redis.from_pool(target.pool(
                socket_timeout=timeout_s, socket_connect_timeout=connect_s))

        return cls(pool, safe_url=target.safe_url, timeout_s=timeout_s, admin=admin,
                   allow_eviction=allow_eviction)

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

    @property
    def client(self) -> Redis:
        """A plain redis-py client on the same server, for tools and tests that inspect keys
        (and for redis-py's ``Lock``, which wants one). The coordinator's own calls never go
        through it."""
        if self._admin is None:
            if self._make_admin is None:
                raise RuntimeError("this transport has no admin client")
            self._admin = self._make_admin()
        return self._admin

    # -- calls ---------------------------------------------------------------------------

    async def execute(self, *args: Any, timeout: float | None = None) -> Any:
        """One command's reply; ``SessionError`` subclasses on failure."""
        try:
            return await self.execute_raw(args, timeout)
        except ResponseError as exc:
            raise _refusal(exc, str(args[0])) from None

    async def execute_many(self, commands: Sequence[tuple[Any, ...]], *,
                           timeout: float | None = None) -> list[Any]:
        """Commands in one write; their replies in order, error replies as redis-py
        exception objects in the list (callers that need every reply use ``checked``)."""
        if not commands:
            return []
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
        reply, acked = await self.execute_many([command, wait], timeout=budget)
        if isinstance(reply, NoScriptError):
            await self.execute_raw(("SCRIPT", "LOAD", source), timeout)
            reply, acked = await self.execute_many([command, wait], timeout=budget)
        if isinstance(reply, ResponseError):
            raise _refusal(reply, "a script") from None
        if isinstance(acked, Exception) or int(acked) < replicas:
            raise NotReplicated(
                f"redis at {self.safe_url} applied the write, but only {acked} of {replicas} "
                f"replica(s) confirmed it within {wait_ms} ms; a failover now could lose it: "
                "re-read the session before repeating it", url=self.safe_url,
                cause=f"WAIT {replicas} {wait_ms} -> {acked}")
        return reply

    async def execute_raw(self, command: tuple[Any, ...], timeout: float | None) -> Any:
        """``execute`` with error replies left as redis-py's ``ResponseError``."""
        packed = pack(command)
        reply = await self._bounded(lambda left: self._pipe.call(packed, timeout=left),
                                    timeout, str(command[0]))
        if self.trace is not None:
            self.trace(command)
        return reply

    async def ping(self, timeout: float | None = None) -> None:
        await self.execute("PING", timeout=timeout)

    def multiplexer(self, home_channel: str) -> Multiplexer:
        mux = Multiplexer(self._pool, home_channel, safe_url=self.safe_url,
                          timeout_s=self.timeout_s)
        self._muxes.append(mux)
        return mux

    async def aclose(self) -> None:
        for mux in self._muxes:
            await mux.aclose()
        await self._pipe.aclose()
        if self._admin is not None:
            admin, self._admin = self._admin, None
            await admin.aclose()
            await close_pool(admin.connection_pool)
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
                if not str(exc).startswith(_TRANSIENT):
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
