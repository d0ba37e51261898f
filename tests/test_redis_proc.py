"""Tests for the redis-server harness itself.

Crash-recovery tests elsewhere are only as trustworthy as this harness: if
"restart keeps AOF data" or "pause makes the server unresponsive" were not
actually true, those tests would pass for the wrong reasons.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import redis
import redis.asyncio as aioredis

from tests.conftest import RedisServerFactory
from tests.helpers import assert_eventually, free_port
from tests.redis_proc import (
    RedisProcess,
    RedisServerNotFoundError,
    RedisStartError,
)

pytestmark = pytest.mark.redis


def _client(server: RedisProcess, timeout: float = 2.0) -> redis.Redis:
    return redis.Redis.from_url(server.url, socket_timeout=timeout, socket_connect_timeout=timeout)


def test_start_answers_ping_on_loopback(redis_server: RedisProcess) -> None:
    assert redis_server.url == f"redis://127.0.0.1:{redis_server.port}/0"
    assert redis_server.is_running
    client = _client(redis_server)
    try:
        assert client.ping() is True
        assert client.config_get("bind")["bind"] == "127.0.0.1"
        assert client.config_get("save")["save"] == ""
        assert Path(str(client.config_get("dir")["dir"])) == redis_server.dir
    finally:
        client.close()
    assert redis_server.log_path.exists()


def test_restart_with_aof_keeps_data(redis_server_factory: RedisServerFactory) -> None:
    server = redis_server_factory(appendonly=True, appendfsync="always")
    port, pid_before = server.port, server.pid
    client = _client(server)
    try:
        client.set("k", "v")
    finally:
        client.close()

    server.restart()

    assert server.port == port
    assert server.pid != pid_before
    client = _client(server)
    try:
        assert client.get("k") == b"v"
    finally:
        client.close()


def test_kill_then_start_on_same_port(redis_server_factory: RedisServerFactory) -> None:
    server = redis_server_factory(appendonly=True, appendfsync="always")
    port = server.port
    client = _client(server)
    try:
        client.set("survives-crash", "1")
    finally:
        client.close()

    server.kill()
    assert not server.is_running
    with pytest.raises(redis.ConnectionError):
        _client(server, timeout=0.3).ping()

    server.start()

    assert server.port == port
    client = _client(server)
    try:
        assert client.get("survives-crash") == b"1"
    finally:
        client.close()


def test_pause_blocks_ping_and_resume_restores_it(redis_server: RedisProcess) -> None:
    redis_server.pause()
    paused = _client(redis_server, timeout=0.3)
    try:
        started = time.monotonic()
        with pytest.raises(redis.TimeoutError):
            paused.ping()
        assert time.monotonic() - started >= 0.25
    finally:
        paused.close()

    redis_server.resume()
    client = _client(redis_server, timeout=0.3)
    try:
        assert client.ping() is True
    finally:
        client.close()


def test_stop_while_paused_does_not_hang(redis_server: RedisProcess) -> None:
    redis_server.pause()
    started = time.monotonic()
    redis_server.stop(timeout=5.0)
    assert time.monotonic() - started < 5.0, "stop() had to escalate to SIGKILL"
    assert not redis_server.is_running


def test_start_fails_clearly_when_port_taken(redis_server: RedisProcess) -> None:
    clash = RedisProcess(port=redis_server.port, startup_timeout=5.0)
    try:
        with pytest.raises(RedisStartError, match="exited"):
            clash.start()
        assert not clash.is_running
    finally:
        clash.close()


def test_missing_redis_server_is_a_clear_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(RedisServerNotFoundError, match="redis-server was not found"):
        RedisProcess()


@pytest.mark.parametrize("attempt", [1, 2])
async def test_redis_url_starts_empty(redis_url: str, attempt: int) -> None:
    # Both parametrizations write the same key; whichever runs second fails
    # unless the fixture really flushed in between.
    client = aioredis.Redis.from_url(redis_url)
    try:
        assert await client.exists("leak-check") == 0
        await client.set("leak-check", attempt)
    finally:
        await client.aclose()


async def test_assert_eventually_accepts_sync_and_async_predicates() -> None:
    calls = 0

    def sync_pred() -> bool:
        nonlocal calls
        calls += 1
        return calls >= 3

    async def async_pred() -> bool:
        return True

    await assert_eventually(sync_pred, timeout=1.0, interval=0.001)
    await assert_eventually(async_pred, timeout=1.0)
    assert calls == 3


async def test_assert_eventually_times_out_with_message() -> None:
    with pytest.raises(AssertionError, match="never true"):
        await assert_eventually(lambda: False, timeout=0.05, message="never true")


def test_free_port_is_bindable() -> None:
    import socket

    port = free_port()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", port))
