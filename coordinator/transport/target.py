"""Where Redis is: one URL, checked before anything connects, and the pools it implies.

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
from urllib.parse import parse_qs, unquote, urlsplit, urlunsplit

from redis.asyncio import ConnectionPool

from ..errors import InvalidInput

#: RESP2: see the module docstring.
PROTOCOL = 2
_SCHEMES = {"redis": False, "rediss": True, "unix": False}
#: Query options the pools understand; anything else is a typo we should name.
_KNOWN_OPTIONS = {
    "db", "password", "username", "ssl_cert_reqs", "ssl_ca_certs", "ssl_certfile",
    "ssl_keyfile", "ssl_check_hostname", "client_name",
}


@dataclass(frozen=True, slots=True)
class Target:
    """A checked Redis URL."""

    url: str
    safe_url: str
    db: int

    @classmethod
    def parse(cls, url: str) -> Target:
        if not isinstance(url, str) or not url.strip():
            raise InvalidInput("the Redis URL is empty; use e.g. redis://localhost:6379/0")
        parts = urlsplit(url.strip())
        if parts.scheme not in _SCHEMES:
            raise InvalidInput(
                f"Redis URL {_mask(url)!r} has scheme {parts.scheme or '(none)'!r}; use "
                "redis://host:port/db, rediss://host:port/db (TLS) or unix:///path.sock")
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

        return ConnectionPool.from_url(
            self.url, protocol=PROTOCOL, retry=Retry(NoBackoff(), 0), health_check_interval=0,
            **kwargs)


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
        if parts.password is None:
            query = parse_qs(parts.query)
            if "password" not in query:
                return url
            masked = "&".join(f"{k}={'***' if k == 'password' else v[0]}"
                              for k, v in query.items())
            return urlunsplit(parts._replace(query=masked))
        user = parts.username or ""
        host = parts.hostname or ""
        netloc = f"{user}:***@{host}" + (f":{parts.port}" if parts.port else "")
        return urlunsplit(parts._replace(netloc=netloc))
    except ValueError:
        return "<unparsable url>"
