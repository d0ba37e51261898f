"""Real Redis topologies for tests: a Sentinel group (a primary, a replica, three sentinels) and
a Redis Cluster (three primaries, each with a replica).

Each part is a ``RedisProcess`` (its own port, directory and PID), so a test can kill,
freeze or restart any of them. A pre-written Sentinel configuration (fixed ids, the replica
and the other sentinels already known) makes the group ready in well under a second: left to
discover each other, sentinels take ~10 s (INFO every 10 s).
"""

from __future__ import annotations

import contextlib
import secrets
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

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


# -- Redis Cluster ------------------------------------------------------------------------------

#: Each primary's slots (three primaries): CLUSTER ADDSLOTSRANGE start end.
_SLOT_RANGES = ((0, 5460), (5461, 10922), (10923, 16383))
_CLUSTER_ARGS = [
    "--cluster-enabled", "yes", "--cluster-node-timeout", "1000",
    "--cluster-replica-validity-factor", "0", "--repl-diskless-sync-delay", "0",
]


def _cluster_port() -> int:
    """A free port whose cluster bus port (port + 10000) is free too."""
    for _ in range(100):
        port = free_port()
        if port + 10000 >= 65536:
            continue
        with contextlib.suppress(OSError), socket.socket() as probe:
            probe.bind((_HOST, port + 10000))
            return port
    raise RedisStartError("no free port pair (port, port + 10000) for a cluster node")


class ClusterGroup:
    """Three primaries, each with one replica, on loopback; ``close()`` stops them all.

    Slots are assigned with ``CLUSTER ADDSLOTSRANGE``, the nodes joined with ``CLUSTER MEET``
    and ``CLUSTER REPLICATE``: ready in ~2 s (Redis's own writable delay after start-up).
    """

    def __init__(self) -> None:
        self.nodes: list[RedisProcess] = []
        self._replica: dict[int, RedisProcess] = {}  # primary port -> its replica at start

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"{_HOST}:{n.port}" for n in self.nodes[:3])

    def start(self) -> None:
        try:
            for _ in range(6):
                node = RedisProcess(port=_cluster_port(), extra_args=list(_CLUSTER_ARGS))
                self.nodes.append(node)
                node.start()
            primaries, replicas = self.nodes[:3], self.nodes[3:]
            ids = {n.port: str(self._call(n, "CLUSTER", "MYID")) for n in self.nodes}
            for node, (start, end) in zip(primaries, _SLOT_RANGES, strict=True):
                self._call(node, "CLUSTER", "ADDSLOTSRANGE", start, end)
            for node in self.nodes[1:]:
                self._call(self.nodes[0], "CLUSTER", "MEET", _HOST, node.port)
            for primary, replica in zip(primaries, replicas, strict=True):
                self._replica[primary.port] = replica
                self._until(lambda r=replica, p=primary: self._replicated(r, ids[p.port]),
                            "a replica could not follow its primary")
            self._until(self._ready, "the cluster did not become ready")
        except BaseException:
            self.close()
            raise

    @staticmethod
    def _call(node: RedisProcess, *args: object) -> object:
        with redis.Redis(host=_HOST, port=node.port, socket_timeout=2,
                         decode_responses=True) as client:
            return client.execute_command(*args)

    def _replicated(self, replica: RedisProcess, primary_id: str) -> bool:
        """Tell ``replica`` to follow ``primary_id`` (refused while it does not know that node
        yet); true once its replication link is up."""
        with contextlib.suppress(redis.ResponseError):
            self._call(replica, "CLUSTER", "REPLICATE", primary_id)
            return self._info(replica).get("master_link_status") == "up"
        return False

    @staticmethod
    def _until(check: Callable[[], bool], what: str, timeout_s: float = 20.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not check():
            if time.monotonic() > deadline:
                raise RedisStartError(what)
            time.sleep(0.02)

    @staticmethod
    def _info(node: RedisProcess, section: str = "replication") -> dict[str, Any]:
        with redis.Redis(host=_HOST, port=node.port, socket_timeout=1) as client:
            info: dict[str, Any] = client.info(section)
            return info

    def live(self) -> list[RedisProcess]:
        return [n for n in self.nodes if n.is_running]

    def slot_map(self, node: RedisProcess) -> list[tuple[int, int, int]]:
        """``node``'s view of the slots: (start, end, primary port), sorted."""
        reply = self._call(node, "CLUSTER", "SLOTS")
        assert isinstance(reply, list)
        return sorted((int(r[0]), int(r[1]), int(r[2][1])) for r in reply)

    def _ready(self) -> bool:
        """Every live node says cluster_state:ok and sees the same slot map."""
        try:
            nodes = self.live()
            for node in nodes:
                info = self._call(node, "CLUSTER", "INFO")
                if "cluster_state:ok" not in str(info):
                    return False
            maps = {tuple(self.slot_map(n)) for n in nodes}
            return len(maps) == 1 and sum(e - s + 1 for s, e, _ in next(iter(maps))) == 16384
        except redis.RedisError:
            return False

    def primaries(self) -> list[RedisProcess]:
        """The primaries now, in slot order."""
        ports = [port for _, _, port in self.slot_map(self.live()[0])]
        by_port = {n.port: n for n in self.nodes}
        return list(dict.fromkeys(by_port[p] for p in ports))

    def replica_of(self, primary: RedisProcess) -> RedisProcess:
        """The replica ``primary`` had when the cluster started."""
        return self._replica[primary.port]

    def node_id(self, node: RedisProcess) -> str:
        return str(self._call(node, "CLUSTER", "MYID"))

    def kill(self, node: RedisProcess) -> None:
        """SIGKILL ``node``, as a crash would."""
        node.kill()

    def wait_failover(self, old_primary: RedisProcess, timeout_s: float = 20.0) -> None:
        """Until ``old_primary``'s replica is a primary and every live node says
        cluster_state:ok with the same slot map."""
        replica = self.replica_of(old_primary)

        def promoted() -> bool:
            with contextlib.suppress(redis.RedisError):
                return self._info(replica).get("role") == "master" and self._ready()
            return False

        self._until(promoted, "the replica was not promoted", timeout_s)

    def close(self) -> None:
        for node in self.nodes:
            with contextlib.suppress(Exception):
                node.close()


G = TypeVar("G", SentinelGroup, ClusterGroup)


@contextlib.contextmanager
def running(group: G) -> Iterator[G]:
    """``group`` started, and stopped (every process, whatever happened) on the way out."""
    try:
        group.start()
        yield group
    finally:
        group.close()
