"""Shared fixtures: real redis-server processes at three price points.

- ``redis_url``: the cheap default. One server for the whole session, wiped
  before each test. Use it whenever the test does not kill, pause or restart
  the server.
- ``redis_server``: a private server per test, for crash/pause/restart tests.
- ``redis_server_factory``: several private servers, or non-default options
  (AOF, fsync policy, extra args).

A missing redis-server makes these fixtures error rather than skip, so a CI
box without Redis fails loudly instead of silently testing nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis

from tests.redis_proc import RedisProcess

RedisServerFactory = Callable[..., RedisProcess]


@pytest.fixture
def redis_server() -> Iterator[RedisProcess]:
    """A started, private server that the test may kill, pause or restart."""
    server = RedisProcess()
    try:
        server.start()
        yield server
    finally:
        server.close()


@pytest.fixture
def redis_server_factory() -> Iterator[RedisServerFactory]:
    """Start servers with custom options; all are closed at teardown, even on failure."""
    servers: list[RedisProcess] = []

    def factory(**kwargs: Any) -> RedisProcess:
        server = RedisProcess(**kwargs)
        servers.append(server)
        server.start()
        return server

    try:
        yield factory
    finally:
        errors: list[BaseException] = []
        for server in reversed(servers):
            try:
                server.close()
            except Exception as exc:  # keep closing the others
                errors.append(exc)
        if errors:
            raise errors[0]


@pytest.fixture(scope="session")
def shared_redis() -> Iterator[RedisProcess]:
    """One server for the whole run: start-up cost is paid once, not per test."""
    server = RedisProcess()
    try:
        server.start()
        yield server
    finally:
        server.close()


@pytest.fixture
def redis_url(shared_redis: RedisProcess) -> str:
    """URL of the shared server, emptied first so tests cannot see each other's keys.

    SCRIPT FLUSH as well, so every test exercises the EVALSHA -> NOSCRIPT ->
    load path as a freshly started server would.
    """
    if not shared_redis.is_running:
        raise RuntimeError(
            "the session-wide redis-server is not running; a test must have stopped "
            "it. Tests that kill/pause/restart must use redis_server instead."
        )
    client = redis.Redis.from_url(shared_redis.url, socket_timeout=5.0)
    try:
        client.flushall()
        client.script_flush()
    finally:
        client.close()
    return shared_redis.url


# Registry/coordinator fixtures (e.g. a Registry bound to ``redis_url`` and a
# fresh namespace, and worker-pool helpers) will go here once the
# ``coordinator`` and ``workers`` packages exist. They are deliberately not
# imported yet so this conftest keeps working while those are being written.
