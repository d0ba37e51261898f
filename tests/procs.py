"""Helpers for tests that run real processes: worker processes started through the CLI
(``python -m coordinator worker``), CLI commands, host processes (``tests.host_mp``).

Shared by ``test_multiprocess.py`` and the fault tests. Nothing here imports pytest, so the
host script (``python -m tests.host_mp``) can import it too. Every process started here is
registered with its owner (a ``WorkerPool``, or the caller of ``spawn_host``) at once, so
teardown kills it whatever the test's outcome.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import secrets
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

from coordinator.keys import JOB_GROUP, Keys
from tests.helpers import assert_eventually

ROOT = Path(__file__).resolve().parents[1]
STRATEGIES = "tests.strategies_mp"
#: Generous bound on every single wait, so a slow CI box does not flake; typical waits are ms.
WAIT_S = 30.0
#: Short leases and claim times: a SIGKILLed worker's work is taken over within ~2-3 s.
FAST_ENV = {
    "ALC_LEASE_MS": "1500",
    "ALC_CLAIM_IDLE_MS": "800",
    "ALC_HEARTBEAT_TTL_MS": "1500",
    "ALC_WAIT_SLICE_S": "0.2",
    "ALC_LOCK_WAIT_S": "10",
}
FAST_SETTINGS: dict[str, Any] = {
    "lease_ms": 1500,
    "claim_idle_ms": 800,
    "heartbeat_ttl_ms": 1500,
    "wait_slice_s": 0.2,
    "lock_wait_s": 10.0,
}


def clean_env(**extra: str) -> dict[str, str]:
    """The test's environment minus anything that would pick a Redis or change settings
    behind the test's back, with the repo root importable (for ``tests.strategies_mp``)."""
    env = {
        k: v for k, v in os.environ.items()
        if k != "REDIS_URL" and not k.startswith("ALC_") and not k.startswith("PYTEST_")
    }
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p
    )
    env.update(extra)
    return env


def cli_argv(*args: str) -> list[str]:
    # ``python -m coordinator.cli`` does not call main() (cli.py has no __main__ guard);
    # ``python -m coordinator`` runs coordinator/__main__.py, which does.
    return [sys.executable, "-m", "coordinator", *args]


def new_namespace() -> str:
    return f"mp{secrets.token_hex(4)}"


def answer_for(prompt: str) -> str:
    """The host's (pure) answer to a prompt."""
    return "ans:" + hashlib.sha256(prompt.encode()).hexdigest()[:12] + ":" + prompt


def owner_of(sid: str, prompt: str, hosts: int) -> int:
    """Which of ``hosts`` host processes answers the query ``prompt`` of session ``sid``
    (a pure function, so the test knows who fed what)."""
    digest = hashlib.sha256(f"{sid}\n{prompt}".encode()).digest()
    return int.from_bytes(digest[:4], "big") % hosts


# -- worker processes ----------------------------------------------------------------------


@dataclass
class WorkerProc:
    proc: subprocess.Popen[bytes]
    log_path: Path
    worker_id: str = ""

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError as exc:
            return f"<no log: {exc}>"

    def log_tail(self, limit: int = 3000) -> str:
        return self.log_text()[-limit:]

    def signal(self, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(sig)

    async def wait_exit(self) -> int:
        """Await the process's exit without polling or a thread (a pidfd; Linux)."""
        if self.proc.poll() is not None:
            return self.proc.returncode
        loop = asyncio.get_running_loop()
        fd = os.pidfd_open(self.proc.pid)
        gone: asyncio.Future[None] = loop.create_future()
        loop.add_reader(fd, lambda: gone.done() or gone.set_result(None))
        try:
            await gone
        finally:
            loop.remove_reader(fd)
            os.close(fd)
        return self.proc.wait()

    async def kill(self) -> int:
        """SIGKILL (as a crash would) and reap; returns the exit code."""
        self.signal(signal.SIGCONT)  # a stopped process dies on SIGKILL too, but be explicit
        self.signal(signal.SIGKILL)
        return await asyncio.wait_for(self.wait_exit(), WAIT_S)


def sync_client(url: str) -> Any:
    """A plain synchronous redis-py client for any URL the coordinator takes (a cluster's
    seeds, a Sentinel group's current primary, or one server), for tests to look with."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    hosts = [h.rpartition(":") for h in parts.netloc.rpartition("@")[2].split(",")]
    if parts.scheme.endswith("+cluster"):
        from redis.cluster import ClusterNode, RedisCluster

        return RedisCluster(startup_nodes=[ClusterNode(h, int(p)) for h, _, p in hosts],
                            socket_timeout=5.0)
    if parts.scheme.endswith("+sentinel"):
        from redis.sentinel import Sentinel

        service = next(x for x in parts.path.split("/") if x)
        return Sentinel([(h, int(p)) for h, _, p in hosts],
                        socket_timeout=5.0).master_for(service, socket_timeout=5.0)
    return redis.Redis.from_url(url, socket_timeout=5.0)


@dataclass
class WorkerPool:
    """Starts ``coordinator worker`` processes; ``close()`` (the fixtures' teardown) kills
    them all. ``env`` holds the ``ALC_*`` settings every worker of the pool gets."""

    url: str
    namespace: str
    log_dir: Path
    env: dict[str, str] = field(default_factory=lambda: dict(FAST_ENV))
    procs: list[WorkerProc] = field(default_factory=list)
    #: The modules each worker imports (``--import``), and its other command-line flags.
    imports: tuple[str, ...] = (STRATEGIES,)
    args: tuple[str, ...] = ("--log-level", "INFO")

    async def start(self, concurrency: int = 4, **env: str) -> WorkerProc:
        """Start one worker and return once it has registered its heartbeat."""
        client = sync_client(self.url)
        try:
            workers_key = Keys(self.namespace).workers
            before = {k.decode() for k in client.zrange(workers_key, 0, -1)}
            wp = self._spawn(concurrency, env)
            proc = wp.proc

            def registered() -> set[str]:
                new = {k.decode() for k in client.zrange(workers_key, 0, -1)} - before
                if not new and proc.poll() is not None:
                    raise AssertionError(
                        f"worker exited with {proc.returncode} during start-up:\n{wp.log_tail()}"
                    )
                return new

            await assert_eventually(registered, timeout=WAIT_S, interval=0.05,
                                    message="worker did not register its heartbeat")
            (wp.worker_id,) = registered()
            return wp
        finally:
            client.close()

    def _spawn(self, concurrency: int, env: dict[str, str] | None = None) -> WorkerProc:
        log_path = self.log_dir / f"worker-{len(self.procs)}.log"
        with log_path.open("wb") as log:
            proc = subprocess.Popen(
                cli_argv("worker", "--redis", self.url, "--namespace", self.namespace,
                         *(f"--import={m}" for m in self.imports),
                         "--concurrency", str(concurrency), *self.args),
                # Unsupervised unless asked (ALC_SUPERVISE=1): the fault tests signal the
                # worker's own PID, which under a supervisor is its parent's.
                cwd=ROOT, env=clean_env(**{"ALC_SUPERVISE": "0", **self.env, **(env or {})}),
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        wp = WorkerProc(proc, log_path)
        self.procs.append(wp)  # registered at once, so teardown kills it whatever happens
        return wp

    def alive(self) -> list[WorkerProc]:
        return [w for w in self.procs if w.alive]

    def by_pid(self, pid: int) -> WorkerProc:
        for w in self.procs:
            if w.pid == pid:
                return w
        raise AssertionError(f"no worker process with pid {pid}: {[w.pid for w in self.procs]}")

    def logs(self) -> str:
        return "\n".join(f"--- worker {w.worker_id} (pid {w.proc.pid}, rc {w.proc.poll()})\n"
                         f"{w.log_tail()}" for w in self.procs)

    def close(self) -> None:
        for wp in self.procs:
            if wp.proc.poll() is None:
                wp.signal(signal.SIGCONT)
                wp.proc.kill()
        for wp in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                wp.proc.wait(timeout=10)


def pending_by_consumer(client: redis.Redis, namespace: str) -> dict[str, int]:
    """Jobs delivered but not acknowledged, per consumer (worker id)."""
    keys = Keys(namespace)
    try:
        rows: Any = client.xpending_range(keys.jobs, JOB_GROUP, "-", "+", 10_000)
    except redis.ResponseError:
        return {}
    out: dict[str, int] = {}
    for row in rows:
        name = row["consumer"].decode()
        out[name] = out.get(name, 0) + 1
    return out


# -- host processes --------------------------------------------------------------------------


@dataclass
class HostProc:
    proc: asyncio.subprocess.Process
    log_path: Path
    report_path: Path

    def log_tail(self, limit: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-limit:]
        except OSError as exc:
            return f"<no log: {exc}>"

    def report(self) -> dict[str, Any]:
        try:
            data: dict[str, Any] = json.loads(self.report_path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise AssertionError(
                f"host wrote no readable report ({exc}); rc={self.proc.returncode}\n"
                f"{self.log_tail()}"
            ) from None
        return data

    def kill(self) -> None:
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()


async def spawn_host(log_dir: Path, index: int, *args: str) -> HostProc:
    """``python -m tests.host_mp --host-index INDEX --report FILE ARGS...``."""
    log_path = log_dir / f"host-{index}.log"
    report_path = log_dir / f"host-{index}.json"
    with log_path.open("wb") as log:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "tests.host_mp", "--host-index", str(index),
            "--report", str(report_path), *args,
            cwd=ROOT, env=clean_env(), stdin=asyncio.subprocess.DEVNULL, stdout=log,
            stderr=asyncio.subprocess.STDOUT,
        )
    return HostProc(proc, log_path, report_path)


# -- CLI subprocesses ----------------------------------------------------------------------


@dataclass
class CliResult:
    code: int
    stdout: str
    stderr: str

    def json(self) -> Any:
        try:
            return json.loads(self.stdout)
        except json.JSONDecodeError as exc:
            raise AssertionError(
                f"stdout is not JSON ({exc}); rc={self.code}\nstdout:\n{self.stdout}\n"
                f"stderr:\n{self.stderr}"
            ) from None

    def __str__(self) -> str:
        return f"rc={self.code}\nstdout:\n{self.stdout}\nstderr:\n{self.stderr}"


async def run_cli(*args: str, env: dict[str, str] | None = None,
                  timeout: float = 60.0) -> CliResult:
    """Run the CLI as a subprocess (never blocking the event loop); killed on timeout."""
    return await run_argv(cli_argv(*args), env=env, timeout=timeout)


async def run_argv(argv: list[str], *, env: dict[str, str] | None = None,
                   timeout: float = 60.0) -> CliResult:
    """Run ``argv`` from the repository root to its end, its output captured (never
    blocking the event loop); killed on timeout."""
    proc = await asyncio.create_subprocess_exec(
        *argv, cwd=ROOT, env=env if env is not None else clean_env(),
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None
    return CliResult(proc.returncode, out.decode(errors="replace"), err.decode(errors="replace"))


# -- in-process registries and workers on a real server ---------------------------------------


class InProcessCluster:
    """Registries and in-process workers on one server, each with its own transport (as
    separate processes would have), so their counters and stats stay visible to the test.
    ``InProcessCluster.real(url, settings)`` runs on a redis-server, ``.fake(settings)`` on
    a fakeredis server: the same code path either way. ``aclose()`` closes everything."""

    def __init__(self, settings: Any, *, url: str | None = None, server: Any = None) -> None:
        self.url = url
        self.server = server
        self.settings = settings
        self._registries: list[Any] = []
        self._workers: list[Any] = []
        self._transports: list[Any] = []

    @classmethod
    def real(cls, url: str, settings: Any) -> InProcessCluster:
        return cls(settings, url=url)

    @classmethod
    def fake(cls, settings: Any) -> InProcessCluster:
        import fakeredis

        return cls(settings, server=fakeredis.FakeServer())

    def transport(self) -> Any:
        """A transport of its own on this cluster's server (closed at teardown)."""
        from coordinator.transport import Transport

        if self.url is not None:
            transport = Transport.from_url(self.url, timeout_s=self.settings.redis_timeout_s)
        else:
            transport = Transport.in_memory(self.server, timeout_s=self.settings.redis_timeout_s)
        self._transports.append(transport)
        return transport

    def client(self) -> Any:
        """A plain redis-py client on the server, for inspecting keys."""
        return self.transport().client

    def registry(self, **overrides: Any) -> Any:
        from coordinator.registry import SessionRegistry

        reg = SessionRegistry(self.transport(), settings=self.settings.with_(**overrides))
        self._registries.append(reg)
        return reg

    async def worker(self, *, start: bool = True, concurrency: int = 4,
                     serve_shards: Any = None, **overrides: Any) -> Any:
        from workers import catalog
        from workers.worker import Worker

        catalog.load([])
        worker = Worker(self.transport(), self.settings.with_(**overrides),
                        concurrency=concurrency, serve_shards=serve_shards)
        self._workers.append(worker)
        if start:
            await worker.start()
        return worker

    async def stop_worker(self, worker: Any, grace_s: float = 1.0) -> None:
        """Shut ``worker`` down now (it is then left alone at teardown)."""
        self._workers.remove(worker)
        await _bounded(worker.shutdown(grace_s=grace_s), f"worker {worker.id} shutdown")

    async def aclose(self) -> None:
        """Bounded: a part that does not close in time fails the test, naming it and showing
        what every task was waiting on, instead of hanging the run."""
        for worker in reversed(self._workers):
            await _bounded(worker.shutdown(grace_s=1.0), f"worker {worker.id} shutdown")
        self._workers.clear()
        for reg in self._registries:
            await _bounded(reg.aclose(), "registry aclose")
        self._registries.clear()
        for transport in self._transports:
            await _bounded(transport.aclose(), "transport aclose")
        self._transports.clear()


async def _bounded(aw: Any, what: str, seconds: float = 20.0) -> None:
    task = asyncio.ensure_future(aw)
    done, _ = await asyncio.wait({task}, timeout=seconds)
    if done:
        task.result()
        return
    import io

    stacks = io.StringIO()
    for other in asyncio.all_tasks():
        other.print_stack(file=stacks)
    task.cancel()
    raise AssertionError(f"{what} did not finish within {seconds:g} s; tasks:\n"
                         f"{stacks.getvalue()}")


def lock_holder(lock: bytes | None, ready_token: bytes | None, holder: bytes | None) -> str:
    """Whom lock A's value names (as the lock scripts read it), or ''."""
    if lock is None:
        return ""
    value = lock.decode()
    if "|" in value:
        return value.split("|", 1)[1]
    return holder.decode() if holder is not None and ready_token == lock else ""


async def steps_held_by(client: Any, keys: Keys, sids: list[str], worker_id: str) -> set[str]:
    """Those of ``sids`` whose step is ``worker_id``'s: lock A in its name, or their job
    pending on its consumer (one pipeline). The recovery tests and ``bench.recovery`` use it
    to know which sessions a kill affects."""
    pipe = client.pipeline(transaction=False)
    for sid in sids:
        sk = keys.session(sid)
        pipe.get(sk.lock)
        pipe.hmget(sk.session, ["ready_token", "holder", "job"])
    pipe.xpending_range(keys.jobs, JOB_GROUP, "-", "+", 1000, consumername=worker_id)
    *replies, pending = await pipe.execute()
    jobs = {row["message_id"] for row in pending}
    held = set()
    for i, sid in enumerate(sids):
        lock, (ready, holder, job) = replies[2 * i], replies[2 * i + 1]
        if lock_holder(lock, ready, holder) == worker_id or (job is not None and job in jobs):
            held.add(sid)
    return held
