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

from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.helpers import GATES, Gate
from tests.procs import InProcessCluster, WorkerPool, new_namespace
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


# -- in-process coordinator fixtures on fakeredis -------------------------------------------
# One FakeServer per test; every registry and worker gets its own client on it, as separate
# processes would. Imports are local so the real-redis fixtures above never depend on them.


#: The in-process cluster on fakeredis (``InProcessCluster.fake``); the name tests import.
FakeCluster = InProcessCluster


@pytest.fixture
def fake_settings() -> Any:
    """Settings for in-process tests: a unique namespace and short waits."""
    import secrets

    from coordinator.settings import Settings

    return Settings(
        namespace=f"t{secrets.token_hex(4)}",
        wait_slice_s=0.05,
        lock_wait_s=2.0,
        wait_timeout_s=10.0,
    )


@pytest.fixture(params=["fakeredis", pytest.param("redis-server", marks=pytest.mark.redis)])
async def any_cluster(request: pytest.FixtureRequest, fake_settings: Any) -> AsyncIterator[Any]:
    """The same in-process cluster on fakeredis and on a real redis-server."""
    import secrets

    if request.param == "fakeredis":
        cluster = InProcessCluster.fake(fake_settings)
    else:
        url = request.getfixturevalue("redis_url")
        cluster = InProcessCluster.real(url, fake_settings.with_(
            url=url, namespace=f"t{secrets.token_hex(4)}"))
    try:
        yield cluster
    finally:
        await cluster.aclose()


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Modules that set ``ON_BOTH_SERVERS = True`` (the core specifications) run every test
    that uses the in-process cluster twice: on fakeredis and on a real redis-server, through
    the same production transport; those that also set ``SHARDED_TOO`` again on a namespace
    of 4 shards, and ``ON_CLUSTER_TOO`` on the shared 3-primary Redis Cluster."""
    if getattr(metafunc.module, "ON_BOTH_SERVERS", False) and \
            "server_kind" in metafunc.fixturenames:
        sharded: list[Any] = []
        if getattr(metafunc.module, "SHARDED_TOO", False):
            sharded.append("fakeredis-4-shards")
        if getattr(metafunc.module, "ON_CLUSTER_TOO", False):
            sharded.append(pytest.param("redis-cluster", marks=pytest.mark.cluster))
        metafunc.parametrize("server_kind", ["fakeredis", *sharded, pytest.param(
            "redis-server", marks=pytest.mark.redis)], indirect=True)


@pytest.fixture
def server_kind(request: pytest.FixtureRequest) -> str:
    return str(getattr(request, "param", "fakeredis"))


@pytest.fixture
async def fake_cluster(fake_settings: Any, server_kind: str,
                       request: pytest.FixtureRequest) -> AsyncIterator[InProcessCluster]:
    """The in-process cluster: on fakeredis, or (in ``ON_BOTH_SERVERS`` modules) on the
    shared redis-server as well."""
    if server_kind == "fakeredis":
        cluster = InProcessCluster.fake(fake_settings)
    elif server_kind == "fakeredis-4-shards":  # a sharded namespace on one server
        cluster = InProcessCluster.fake(fake_settings.with_(shards=4))
    else:
        fixture = "redis_cluster" if server_kind == "redis-cluster" else None
        url = request.getfixturevalue(fixture).url if fixture else \
            request.getfixturevalue("redis_url")
        cluster = InProcessCluster.real(url, fake_settings.with_(url=url))
    try:
        yield cluster
    finally:
        await cluster.aclose()


@pytest.fixture
def registry(fake_cluster: FakeCluster) -> Any:
    """A ``SessionRegistry`` on the fake server."""
    return fake_cluster.registry()


@pytest.fixture
async def worker(fake_cluster: FakeCluster) -> Any:
    """One started in-process ``Worker`` (built-ins and every test strategy registered)."""
    return await fake_cluster.worker()


@pytest.fixture
def gates() -> Iterator[dict[str, Gate]]:
    """A clean ``GATES`` for the test; every gate is opened at teardown so no step hangs."""
    GATES.clear()
    try:
        yield GATES
    finally:
        for gate in GATES.values():
            gate.open.set()


@pytest.fixture
def namespace() -> str:
    """A fresh namespace, so tests sharing one redis-server never see each other's keys."""
    return new_namespace()


@pytest.fixture
def worker_pool(redis_url: str, namespace: str, tmp_path: Path) -> Iterator[WorkerPool]:
    """Real ``coordinator worker`` processes on the shared server; all killed at teardown."""
    pool = WorkerPool(redis_url, namespace, tmp_path)
    try:
        yield pool
    finally:
        pool.close()


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[Any]:
    """A Redis Cluster (three primaries, each with a replica) for the whole run, ~2 s to
    start. Tests that kill or reshard nodes must put it back, or start a ``ClusterGroup``
    of their own."""
    from tests.topology import ClusterGroup, running

    with running(ClusterGroup()) as group:
        yield group
