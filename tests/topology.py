"""Real Redis topologies for tests: a Sentinel group (a primary, a replica, three sentinels).

Each part is a ``RedisProcess`` (its own port, directory and PID), so a test can kill,
freeze or restart any of them. A pre-written Sentinel configuration (fixed ids, the replica
and the other sentinels already known) makes the group ready in well under a second: left to
discover each other, sentinels take ~10 s (INFO every 10 s).
"""

from __future__ import annotations

import contextlib
import secrets
import time
from pathlib import Path

import redis

from tests.helpers import free_port
from tests.redis_proc import RedisProcess, RedisStartError

SERVICE = "alc"
_HOST = "127.0.0.1"


class SentinelProcess(RedisProcess):
    """``redis-server <conf> --sentinel``: Sentinel needs a config file it can rewrite."""

    def __init__(self, port: int, config: str) -> None:
        super().__init__(port=port)
        self._config = config

    def _command(self) -> list[str]:
        path = Path(self.dir) / "sentinel.conf"
        if not path.exists():  # a restart keeps what Sentinel rewrote
            path.write_text(self._config)
        return [self._executable, str(path), "--sentinel"]


class SentinelGroup:
    """A primary, one replica and three sentinels on loopback; ``close()`` stops them all."""

    def __init__(self, *, down_after_ms: int = 1000, failover_timeout_ms: int = 5000) -> None:
        self.primary = RedisProcess(extra_args=["--repl-diskless-sync-delay", "0"])
        self.replica: RedisProcess | None = None
        self.sentinels: list[SentinelProcess] = []
        self._down_after_ms = down_after_ms
        self._failover_timeout_ms = failover_timeout_ms

    @property
    def url(self) -> str:
        hosts = ",".join(f"{_HOST}:{s.port}" for s in self.sentinels)
        return f"redis+sentinel://{hosts}/{SERVICE}/0"

    def start(self) -> None:
        try:
            self.primary.start()
            self.replica = RedisProcess(extra_args=[
                "--replicaof", _HOST, str(self.primary.port),
                "--repl-diskless-sync-delay", "0"])
            self.replica.start()
            ports = [free_port() for _ in range(3)]
            ids = [secrets.token_hex(20) for _ in ports]
            for port, myid in zip(ports, ids, strict=True):
                lines = [
                    f"port {port}", f"bind {_HOST}", f"sentinel myid {myid}",
                    f"sentinel monitor {SERVICE} {_HOST} {self.primary.port} 2",
                    f"sentinel down-after-milliseconds {SERVICE} {self._down_after_ms}",
                    f"sentinel failover-timeout {SERVICE} {self._failover_timeout_ms}",
                    f"sentinel known-replica {SERVICE} {_HOST} {self.replica.port}",
                    *(f"sentinel known-sentinel {SERVICE} {_HOST} {p} {i}"
                      for p, i in zip(ports, ids, strict=True) if p != port),
                ]
                sentinel = SentinelProcess(port, "\n".join(lines) + "\n")
                self.sentinels.append(sentinel)
                sentinel.start()
            self._wait_ready()
        except BaseException:
            self.close()
            raise

    def _wait_ready(self, timeout_s: float = 15.0) -> None:
        deadline = time.monotonic() + timeout_s
        assert self.replica is not None
        while True:
            if self._linked(self.replica) and all(self._quorum(s) for s in self.sentinels):
                return
            if time.monotonic() > deadline:
                raise RedisStartError("the Sentinel group did not become ready")
            time.sleep(0.02)

    @staticmethod
    def _linked(node: RedisProcess) -> bool:
        with redis.Redis(host=_HOST, port=node.port, socket_timeout=1) as client:
            info = client.info("replication")
        return info.get("master_link_status") == "up"

    @staticmethod
    def _quorum(sentinel: SentinelProcess) -> bool:
        with redis.Redis(host=_HOST, port=sentinel.port, socket_timeout=1) as client, \
                contextlib.suppress(redis.ResponseError):
            return bool(client.execute_command("SENTINEL", "CKQUORUM", SERVICE))
        return False

    def primary_port(self) -> int:
        """The primary's port as the sentinels see it now."""
        for sentinel in self.sentinels:
            with contextlib.suppress(redis.RedisError), redis.Redis(
                    host=_HOST, port=sentinel.port, socket_timeout=1) as client:
                addr = client.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", SERVICE)
                if addr:
                    return int(addr[1])
        raise AssertionError("no sentinel knows the primary")

    def current_replica(self) -> RedisProcess:
        """The data node that is not the primary now (roles swap at a failover)."""
        primary = self.primary_port()
        nodes = [n for n in (self.primary, self.replica) if n is not None]
        return next(n for n in nodes if n.port != primary)

    def wait_linked(self, timeout_s: float = 15.0) -> None:
        """Until the current replica's link to the primary is up (after a failover)."""
        deadline = time.monotonic() + timeout_s
        while not self._linked(self.current_replica()):
            if time.monotonic() > deadline:
                raise AssertionError("the replica did not catch up with the primary")
            time.sleep(0.05)

    def failover(self) -> None:
        """A graceful failover (``SENTINEL FAILOVER``): the replica is caught up first."""
        with redis.Redis(host=_HOST, port=self.sentinels[0].port, socket_timeout=2) as client:
            client.execute_command("SENTINEL", "FAILOVER", SERVICE)

    def close(self) -> None:
        for node in [*self.sentinels, self.replica, self.primary]:
            if node is not None:
                with contextlib.suppress(Exception):
                    node.close()
