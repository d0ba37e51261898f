"""Where Redis is: one URL, checked before anything connects, and the pools it implies.

Three shapes of URL:

- ``redis://[user:pass@]host:port/db`` (``rediss://`` for TLS, ``unix:///path.sock``): one
  server.
- ``redis+sentinel://[user:pass@]host:port[,host:port...]/service_name[/db]``
  (``rediss+sentinel://``): a primary with replicas behind Redis Sentinel. The listed hosts
  are sentinels (port 26379 when left out); every connection asks them for the current
  primary, so the transport follows a failover (a demoted primary's ``READONLY`` reply drops
  the connection and the next attempt asks again). ``user:pass`` authenticate to the data
  nodes; ``?sentinel_password=..`` (and ``sentinel_username``) to the sentinels.
- ``redis+cluster://[user:pass@]host:port[,host:port...][?options]`` (``rediss+cluster://``):
  a Redis Cluster. The listed hosts are seeds (port 6379 when left out): any one that answers
  tells the slot map (``coordinator.transport.topology``). A cluster has only database 0.

A URL a user typed is the most common misconfiguration there is, so it is checked here,
once, with messages that say what is wrong with it (``InvalidInput``), instead of failing
deep inside redis-py 26 s later. The password never leaves this module in clear: every
message and log line uses ``Target.safe_url``.

The protocol is RESP2, chosen explicitly: our command connections never subscribe and never
enable client tracking, so under RESP2 the server has nothing to push on them, and the reader
also drops any push frame it meets (``coordinator.transport.pipe``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit, urlunsplit

from redis.asyncio import ConnectionPool

from ..errors import InvalidInput

#: RESP2: see the module docstring.
PROTOCOL = 2
_SCHEMES = {"redis": False, "rediss": True, "unix": False}
_SENTINEL_SCHEMES = {"redis+sentinel": False, "rediss+sentinel": True}
_CLUSTER_SCHEMES = {"redis+cluster": False, "rediss+cluster": True}
SENTINEL_PORT = 26379
REDIS_PORT = 6379
_ACCEPTED = ("redis://host:port/db, rediss://host:port/db (TLS), unix:///path.sock, "
             "redis+sentinel://host:port[,host:port...]/service_name[/db] or "
             "redis+cluster://host:port[,host:port...]")
#: Query options the pools understand; anything else is a typo we should name.
_KNOWN_OPTIONS = {
    "db", "password", "username", "ssl_cert_reqs", "ssl_ca_certs", "ssl_certfile",
    "ssl_keyfile", "ssl_check_hostname", "client_name",
}
_SENTINEL_OPTIONS = {"sentinel_password", "sentinel_username"}
#: Bound on each question to a sentinel (it answers from memory; a dead one is skipped).
SENTINEL_TIMEOUT_S = 1.0


@dataclass(frozen=True, slots=True)
class Target:
    """A checked Redis URL."""

    url: str
    safe_url: str
    db: int
    #: Sentinel URLs: the sentinels and the name of the service they watch.
    sentinels: tuple[tuple[str, int], ...] = ()
    service: str = ""
    #: Cluster URLs: the seed nodes (empty for every other shape).
    seeds: tuple[tuple[str, int], ...] = ()

    @property
    def is_cluster(self) -> bool:
        return bool(self.seeds)

    @classmethod
    def parse(cls, url: str) -> Target:
        if not isinstance(url, str) or not url.strip():
            raise InvalidInput("the Redis URL is empty; use e.g. redis://localhost:6379/0")
        parts = urlsplit(url.strip())
        if parts.scheme in _SENTINEL_SCHEMES:
            return _parse_sentinel(url.strip())
        if parts.scheme in _CLUSTER_SCHEMES:
            return _parse_cluster(url.strip())
        if parts.scheme not in _SCHEMES:
            raise InvalidInput(
                f"Redis URL {_mask(url)!r} has scheme {parts.scheme or '(none)'!r}; use "
                f"{_ACCEPTED}")
        try:
            port = parts.port
        except ValueError:
            raise InvalidInput(f"Redis URL {_mask(url)!r} has a port that is not a number "
                               "between 1 and 65535") from None
        if parts.scheme != "unix":
            if not parts.hostname:
                raise InvalidInput(f"Redis URL {_mask(url)!r} names no host; use e.g. "
                                   "redis://localhost:6379/0")
            if port == 0:
                raise InvalidInput(f"Redis URL {_mask(url)!r}: port 0 is not a port")
        elif not parts.path:
            raise InvalidInput(f"Redis URL {_mask(url)!r} names no socket path")
        options = parse_qs(parts.query)
        unknown = sorted(set(options) - _KNOWN_OPTIONS)
        if unknown:
            raise InvalidInput(f"Redis URL {_mask(url)!r} has unknown option(s) "
                               f"{', '.join(unknown)}; known: {', '.join(sorted(_KNOWN_OPTIONS))}")
        db = _db(url, parts.scheme, parts.path, options)
        return cls(url=url.strip(), safe_url=_mask(url.strip()), db=db)

    def pool(self, **kwargs: Any) -> ConnectionPool:
        """A pool for this target (no retries of its own: the transport owns the retry
        budget, so retries are never wrapped in retries)."""
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        if self.sentinels:
            return self._sentinel_pool(**kwargs)
        if self.seeds:
            return self.node_pool(*self.seeds[0], **kwargs)
        return ConnectionPool.from_url(
            self.url, protocol=PROTOCOL, retry=Retry(NoBackoff(), 0), health_check_interval=0,
            **kwargs)

    def node_url(self, host: str, port: int) -> str:
        """A cluster URL's credentials and options for one node: ``redis[s]://...host:port/0``
        (not for messages: it carries the password)."""
        parts = urlsplit(self.url)
        userinfo = parts.netloc.rpartition("@")[0]
        netloc = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        options = {k: v[0] for k, v in parse_qs(parts.query).items() if k != "db"}
        query = "&".join(f"{k}={quote(v, safe='')}" for k, v in options.items())
        scheme = "rediss" if _CLUSTER_SCHEMES.get(parts.scheme) else "redis"
        return urlunsplit((scheme, f"{userinfo}@{netloc}" if userinfo else netloc, "/0",
                           query, ""))

    def node_pool(self, host: str, port: int, **kwargs: Any) -> ConnectionPool:
        """A pool for one node of a cluster, with the URL's credentials and options."""
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        return ConnectionPool.from_url(
            self.node_url(host, port), protocol=PROTOCOL, retry=Retry(NoBackoff(), 0),
            health_check_interval=0, **kwargs)

    def cluster_client(self, **kwargs: Any) -> Any:
        """A redis-py ``RedisCluster`` on the seeds (the admin client of a cluster URL)."""
        from redis.asyncio.cluster import ClusterNode, RedisCluster

        parts = urlsplit(self.url)
        options: dict[str, Any] = {
            k: v[0] for k, v in parse_qs(parts.query).items() if k != "db"}
        userinfo = parts.netloc.rpartition("@")[0]
        user, _, password = userinfo.partition(":")
        if user:
            options["username"] = unquote(user)
        if password:
            options["password"] = unquote(password)
        if _CLUSTER_SCHEMES.get(parts.scheme):
            options["ssl"] = True
        return RedisCluster(startup_nodes=[ClusterNode(h, p) for h, p in self.seeds],
                            **options, **kwargs)

    def _sentinel_pool(self, **kwargs: Any) -> ConnectionPool:
        from redis.asyncio.retry import Retry
        from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
        from redis.backoff import NoBackoff

        parts = urlsplit(self.url)
        options = {k: v[0] for k, v in parse_qs(parts.query).items()}
        userinfo = parts.netloc.rpartition("@")[0]
        user, _, password = userinfo.partition(":")
        common: dict[str, Any] = {"protocol": PROTOCOL, "retry": Retry(NoBackoff(), 0),
                                  "health_check_interval": 0}
        node: dict[str, Any] = {**common, "db": self.db, **kwargs}
        if user:
            node["username"] = unquote(user)
        if password:
            node["password"] = unquote(password)
        if parts.scheme.startswith("rediss"):
            node["ssl"] = True
        for key in ("client_name", "ssl_cert_reqs", "ssl_ca_certs", "ssl_certfile",
                    "ssl_keyfile"):
            if key in options:
                node[key] = options[key]
        sentinel_kwargs: dict[str, Any] = {
            **common, "socket_timeout": SENTINEL_TIMEOUT_S,
            "socket_connect_timeout": SENTINEL_TIMEOUT_S}
        if "sentinel_password" in options:
            sentinel_kwargs["password"] = options["sentinel_password"]
        if "sentinel_username" in options:
            sentinel_kwargs["username"] = options["sentinel_username"]
        manager = Sentinel(  # type: ignore[no-untyped-call]
            list(self.sentinels), sentinel_kwargs=sentinel_kwargs)
        return SentinelConnectionPool(  # type: ignore[no-untyped-call]
            self.service, manager, **node)


def _hosts(netloc: str, safe: str, default_port: int, what: str, listed: str
           ) -> list[tuple[str, int]]:
    """``host[:port],host[:port]...`` of a Sentinel or Cluster URL (``[IPv6]:port`` too)."""
    out: list[tuple[str, int]] = []
    for item in netloc.rpartition("@")[2].split(","):
        if item.startswith("["):  # [IPv6]:port
            host, _, rest = item[1:].partition("]")
            port = rest[1:] if rest.startswith(":") else rest or str(default_port)
        else:
            host, sep, port = item.rpartition(":")
            if not sep:
                host, port = item, str(default_port)
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise InvalidInput(f"Redis URL {safe!r}: {item!r} is not a {what} "
                               f"({listed} are listed as host:port,host:port)")
        out.append((host, int(port)))
    return out


def _parse_sentinel(url: str) -> Target:
    parts = urlsplit(url)
    safe = _mask(url)
    sentinels = _hosts(parts.netloc, safe, SENTINEL_PORT, "sentinel host[:port]",
                       "the sentinels")
    segments = [unquote(x) for x in parts.path.split("/") if x]
    if not segments or len(segments) > 2:
        raise InvalidInput(f"Redis URL {safe!r} must name the service Sentinel watches, and "
                           "optionally a database: redis+sentinel://host:port/service_name[/db]")
    options = parse_qs(parts.query)
    unknown = sorted(set(options) - _KNOWN_OPTIONS - _SENTINEL_OPTIONS)
    if unknown:
        raise InvalidInput(f"Redis URL {safe!r} has unknown option(s) {', '.join(unknown)}")
    raw_db = segments[1] if len(segments) == 2 else options.get("db", ["0"])[0]
    if not raw_db.isdigit():
        raise InvalidInput(f"Redis URL {safe!r}: the database must be a number such as /0, "
                           f"not {raw_db!r}")
    return Target(url=url, safe_url=safe, db=int(raw_db), sentinels=tuple(sentinels),
                  service=segments[0])


def _parse_cluster(url: str) -> Target:
    parts = urlsplit(url)
    safe = _mask(url)
    seeds = _hosts(parts.netloc, safe, REDIS_PORT, "cluster node host:port",
                   "the seed nodes")
    options = parse_qs(parts.query)
    unknown = sorted(set(options) - _KNOWN_OPTIONS)
    if unknown:
        raise InvalidInput(f"Redis URL {safe!r} has unknown option(s) {', '.join(unknown)}; "
                           f"known: {', '.join(sorted(_KNOWN_OPTIONS))}")
    path = unquote(parts.path).strip("/")
    raw_db = options.get("db", [path or "0"])[0]
    if path and "db" in options and path != raw_db:
        raise InvalidInput(f"Redis URL {safe!r} names two databases ({path!r} and {raw_db!r})")
    if raw_db != "0":
        raise InvalidInput(f"Redis URL {safe!r}: a Redis Cluster has only database 0, not "
                           f"{raw_db!r}; drop the database from the URL")
    return Target(url=url, safe_url=safe, db=0, seeds=tuple(seeds))


def _db(url: str, scheme: str, path: str, options: dict[str, list[str]]) -> int:
    raw = options.get("db", [None])[0]
    if raw is None and scheme != "unix":
        raw = unquote(path).strip("/") or "0"
    if raw is None:
        return 0
    if not raw.isdigit():
        raise InvalidInput(f"Redis URL {_mask(url)!r}: the database must be a number such as "
                           f"/0, not {raw!r}")
    return int(raw)


def _mask(url: str) -> str:
    """``url`` with its password replaced by ``***``."""
    try:
        parts = urlsplit(url)
        if ":" not in parts.netloc.rpartition("@")[0] or "@" not in parts.netloc:
            return _mask_query(url)
        userinfo, _, hosts = parts.netloc.rpartition("@")
        user = userinfo.partition(":")[0]
        masked = urlunsplit(parts._replace(netloc=f"{user}:***@{hosts}"))
        if "sentinel_password" in parse_qs(parts.query):
            return _mask_query(masked)
        return masked
    except ValueError:
        return "<unparsable url>"


def _mask_query(url: str) -> str:
    parts = urlsplit(url)
    query = parse_qs(parts.query)
    if not {"password", "sentinel_password"} & set(query):
        return url
    masked = "&".join(f"{k}={'***' if 'password' in k else v[0]}" for k, v in query.items())
    return urlunsplit(parts._replace(query=masked))


async def close_pool(pool: ConnectionPool) -> None:
    """Close ``pool``'s connections, and a Sentinel pool's connections to its sentinels."""
    await pool.disconnect()
    manager = getattr(pool, "sentinel_manager", None)
    for sentinel in getattr(manager, "sentinels", ()):
        await sentinel.aclose()
