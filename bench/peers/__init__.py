"""Peers: the same workload on other systems, measured on the same machine in the same run.

Workload (the coordinator's own): a session asks K=10 questions in sequence; the host answers
each at once with ``"ok"``. A *step* is "host answers -> host holds the next event" (the next
question, or the session's end after the K-th answer), so a session has K steps after its
start. Every peer is measured the same way, by the harness in this module:

* latency: one session at a time, after warm-up sessions, the duration of every step;
* throughput: ``in_flight`` (50) sessions in flight from one host process, each loop running
  sessions back to back; completed steps per second inside a window that leaves out the
  ramp-up and the drain, with 1 and 2 worker processes where the peer has workers.

A peer module exposes ``async def run(cfg) -> PeerResult`` (``langgraph_peer`` has two, one per
checkpointer) and runs standalone: ``python -m bench.peers.rq_peer --redis URL [--json]``;
``python -m bench.peers`` runs them all.

For the main benchmark: ``available()`` says which peers can run and why not, and
``await run(name, url=REDIS_URL, quick=False)`` runs one in a fresh process of its own (so one
peer's threads, pools and global state never load the next one, nor the caller) and returns its
``PeerResult``. That process uses ``$ALC_BENCH_PEERS_PYTHON`` when set: the ``bench`` extra
pins redis-py below 6 (through arq), so the peers may live in a venv of their own.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import importlib
import importlib.util
import json
import os
import secrets
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..stats import Latency, now

ROOT = Path(__file__).resolve().parents[2]

Record = Callable[[float], None]
"""Called once per step with the step's duration in seconds."""

SessionFn = Callable[[str, Record], Awaitable[None]]
"""Runs one whole session (start, then K answered steps) under the given session id."""

PeerRun = Callable[["PeerConfig"], Coroutine[Any, Any, "PeerResult"]]
"""A peer module's ``run``."""


PYTHON_ENV = "ALC_BENCH_PEERS_PYTHON"
PG_ENV = "ALC_BENCH_PG_URL"
DEFAULT_PG_URL = "postgresql://postgres@127.0.0.1:5432/postgres"


def _default_pg_url() -> str:
    return os.environ.get(PG_ENV) or DEFAULT_PG_URL


@dataclass(frozen=True)
class PeerConfig:
    redis_url: str = "redis://127.0.0.1:6379/5"
    # An admin connection: peers on PostgreSQL create (and drop) databases of their own beside it.
    pg_url: str = field(default_factory=_default_pg_url)
    k: int = 10
    warmup_sessions: int = 5
    latency_sessions: int = 40
    latency_budget_s: float = 8.0
    in_flight: int = 50
    workers: tuple[int, ...] = (1, 2)
    ramp_s: float = 1.0
    window_s: float = 4.0
    drain_timeout_s: float = 20.0
    python: str = sys.executable  # interpreter for worker processes

    @classmethod
    def quick(cls, **kw: Any) -> PeerConfig:
        """A short run (a few seconds a peer) for smoke tests."""
        short = {"warmup_sessions": 2, "latency_sessions": 10, "ramp_s": 0.5, "window_s": 1.5}
        return cls(**{**short, **kw})


@dataclass
class PeerResult:
    name: str
    latency: Latency
    throughput: dict[int, float]  # steps/s keyed by worker processes (or by sessions in flight)
    notes: str = ""
    throughput_by: str = "workers"  # "workers", or "sessions" for peers without worker processes
    durable: bool = True  # a paused session survives its process (InMemorySaver: no)
    versions: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["throughput"] = {str(k): v for k, v in self.throughput.items()}
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> PeerResult:
        return cls(
            name=d["name"],
            latency=Latency(**d["latency"]),
            throughput={int(k): float(v) for k, v in d["throughput"].items()},
            notes=d.get("notes", ""),
            throughput_by=d.get("throughput_by", "workers"),
            durable=d.get("durable", True),
            versions=d.get("versions", {}),
        )

    def line(self) -> str:
        lat = self.latency
        tp = ", ".join(f"{k} {self.throughput_by}: {v:,.0f}/s" for k, v in self.throughput.items())
        return (
            f"{self.name:<20} p50 {lat.p50_ms:7.2f} ms  p99 {lat.p99_ms:7.2f} ms  "
            f"max {lat.max_ms:7.2f} ms  (n={lat.n})  |  {tp}"
        )


# name -> (module, run function, distributions it needs)
PEERS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "rq": ("rq_peer", "run", ("rq", "redis")),
    "arq": ("arq_peer", "run", ("arq", "redis")),
    "langgraph-postgres": (
        "langgraph_peer",
        "run",
        ("langgraph", "langgraph.checkpoint.postgres", "psycopg", "psycopg_pool"),
    ),
    "langgraph-memory": ("langgraph_peer", "run_memory", ("langgraph",)),
    "dbos": ("dbos_peer", "run", ("dbos", "psycopg")),
}


def _missing_modules(mods: Sequence[str]) -> list[str]:
    out = []
    for m in mods:
        try:
            if importlib.util.find_spec(m) is None:
                out.append(m)
        except ModuleNotFoundError:  # a parent package is missing
            out.append(m)
    return out


def _server_reason(name: str, cfg: PeerConfig) -> str | None:
    """Why the server a peer needs can't be reached (a quick synchronous probe), or None."""
    try:
        if name in ("rq", "arq"):
            from redis import Redis

            Redis.from_url(cfg.redis_url, socket_connect_timeout=2).ping()
        elif name in ("langgraph-postgres", "dbos"):
            import psycopg

            psycopg.connect(cfg.pg_url, connect_timeout=2).close()
    except Exception as e:  # any failure means "can't run here"
        return f"server unreachable: {type(e).__name__}: {e}"
    return None


def available(cfg: PeerConfig | None = None, python: str | None = None) -> dict[str, str | None]:
    """``{peer: None}`` when it can run, else ``{peer: reason}``: a package missing from the
    peers' interpreter (``python``, else ``$ALC_BENCH_PEERS_PYTHON``, else this one), or
    PostgreSQL out of reach (and, when ``cfg`` is given, its Redis server)."""
    exe = python or peers_python()
    if exe != sys.executable:
        return _available_elsewhere(exe, cfg)
    probe = cfg or PeerConfig()
    out: dict[str, str | None] = {}
    for name, (_, _, mods) in PEERS.items():
        missing = _missing_modules(mods)
        if missing:
            out[name] = f"not installed: {', '.join(missing)} (pip install -e '.[bench]')"
        elif cfg is None and name in ("rq", "arq"):
            out[name] = None  # no Redis URL to probe yet
        else:
            out[name] = _server_reason(name, probe)
    return out


def _available_elsewhere(exe: str, cfg: PeerConfig | None) -> dict[str, str | None]:
    import subprocess

    args = [exe, "-m", __name__, "--available"]
    if cfg is not None:
        args += ["--config", json.dumps(_cfg_json(cfg))]
    try:
        out = subprocess.run(
            args, capture_output=True, text=True, cwd=ROOT, env=_child_env(), timeout=60
        )
        got: dict[str, str | None] = json.loads(out.stdout.strip().splitlines()[-1])
        return got
    except Exception as e:  # that interpreter can't even tell
        return {name: f"{exe} -m {__name__}: {type(e).__name__}: {e}" for name in PEERS}


def peers_python() -> str:
    return os.environ.get(PYTHON_ENV) or sys.executable


def load(name: str) -> PeerRun:
    mod, fn, _ = PEERS[name]
    module = importlib.import_module(f"{__name__}.{mod}")
    run: PeerRun = getattr(module, fn)
    return run


async def run(
    name: str,
    *,
    url: str,
    quick: bool = False,
    pg_url: str | None = None,
    python: str | None = None,
) -> PeerResult:
    """Run peer ``name`` against the Redis server at ``url`` (and PostgreSQL at ``pg_url``, or
    ``$ALC_BENCH_PG_URL``, or the local default), in a fresh process of its own."""
    kw: dict[str, Any] = {"redis_url": url}
    if pg_url:
        kw["pg_url"] = pg_url
    cfg = PeerConfig.quick(**kw) if quick else PeerConfig(**kw)
    return await run_in_subprocess(name, cfg, python or peers_python())


def _cfg_json(cfg: PeerConfig) -> dict[str, Any]:
    d = dataclasses.asdict(cfg)
    d["workers"] = list(cfg.workers)
    return d


def _cfg_from_json(d: dict[str, Any]) -> PeerConfig:
    return PeerConfig(**{**d, "workers": tuple(d["workers"])})


async def run_in_subprocess(
    name: str, cfg: PeerConfig, python: str | None = None, timeout_s: float = 180.0
) -> PeerResult:
    """Run one peer in a fresh interpreter (``python``, default this one) and read its JSON."""
    mod, fn, _ = PEERS[name]
    exe = python or sys.executable
    cfg = dataclasses.replace(cfg, python=exe)
    args = [exe, "-m", f"{__name__}.{mod}", "--config", json.dumps(_cfg_json(cfg)), "--json"]
    if fn == "run_memory":
        args += ["--saver", "memory"]
    proc = await asyncio.create_subprocess_exec(
        *args, stdout=asyncio.subprocess.PIPE, cwd=ROOT, env=_child_env()
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout_s)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    if proc.returncode != 0:
        raise RuntimeError(f"peer {name} exited with {proc.returncode} (its stderr is above)")
    return PeerResult.from_json(json.loads(out.decode().strip().splitlines()[-1]))


# ---------------------------------------------------------------------------------------------
# The harness every peer shares.


async def measure_latency(session: SessionFn, cfg: PeerConfig, tag: str = "lat") -> Latency:
    """Step latency, one session at a time, after ``warmup_sessions`` unmeasured sessions."""
    for i in range(cfg.warmup_sessions):
        await session(f"{tag}-warm-{i}", lambda _s: None)
    samples: list[float] = []
    deadline = now() + cfg.latency_budget_s
    for i in range(cfg.latency_sessions):
        await session(f"{tag}-{i}", samples.append)
        if now() > deadline:
            break
    return Latency.of(samples)


async def measure_throughput(session: SessionFn, cfg: PeerConfig, tag: str = "tp") -> float:
    """Completed steps per second with ``in_flight`` sessions in flight from this process.

    Each of the ``in_flight`` loops runs sessions back to back until the window closes, then
    finishes the session it is in (the drain, not counted; every session ends cleanly)."""
    stamps: list[float] = []

    def record(_s: float) -> None:
        stamps.append(now())

    t0 = now()
    start, end = t0 + cfg.ramp_s, t0 + cfg.ramp_s + cfg.window_s
    max_sessions = 100_000  # a bound on the loop; the window ends it long before

    async def one_loop(loop_no: int) -> None:
        for n in range(max_sessions):
            if now() >= end:
                return
            await session(f"{tag}-{loop_no}-{n}", record)

    await asyncio.wait_for(
        asyncio.gather(*(one_loop(i) for i in range(cfg.in_flight))),
        cfg.ramp_s + cfg.window_s + cfg.drain_timeout_s,
    )
    counted = sum(1 for t in stamps if start <= t < end)
    return counted / cfg.window_s


def run_prefix(peer: str) -> str:
    return f"bench-{peer}-{secrets.token_hex(4)}"


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    return env


@contextlib.asynccontextmanager
async def worker_processes(
    cfg: PeerConfig,
    module: str,
    args: Sequence[str],
    n: int,
    first_index: int = 0,
    ready_timeout_s: float = 60.0,
) -> AsyncIterator[list[asyncio.subprocess.Process]]:
    """Start ``n`` worker processes (``python -m MODULE worker ARGS``) one after the other, each
    ready once it prints ``ready``; stop them (SIGTERM, then SIGKILL) on the way out."""
    procs: list[asyncio.subprocess.Process] = []
    try:
        for i in range(first_index, first_index + n):
            proc = await asyncio.create_subprocess_exec(
                cfg.python, "-m", module, "worker", *args, "--index", str(i),
                stdout=asyncio.subprocess.PIPE, cwd=ROOT, env=_child_env(),
            )  # fmt: skip
            procs.append(proc)
            assert proc.stdout is not None
            line = await asyncio.wait_for(proc.stdout.readline(), ready_timeout_s)
            if line.strip() != b"ready":
                raise RuntimeError(f"{module} worker {i} did not start (said {line!r})")
        yield procs
    finally:
        await asyncio.sleep(0.2)  # let a worker finish the bookkeeping after a job's reply
        for proc in procs:
            if proc.returncode is None:
                proc.terminate()
        for proc in procs:
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except TimeoutError:
                proc.kill()
                await proc.wait()


@contextlib.asynccontextmanager
async def worker_pool(
    cfg: PeerConfig, module: str, args: Sequence[str]
) -> AsyncIterator[Callable[[int], Awaitable[None]]]:
    """``grow(n)`` brings the running worker processes up to ``n`` (never down): the latency
    run and the 1-worker throughput run share a worker, and the 2-worker run adds one."""
    count = 0
    async with contextlib.AsyncExitStack() as stack:

        async def grow(n: int) -> None:
            nonlocal count
            if n > count:
                more = worker_processes(cfg, module, args, n - count, first_index=count)
                await stack.enter_async_context(more)
                count = n

        yield grow


def versions(*dists: str) -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for d in dists:
        try:
            out[d] = version(d)
        except PackageNotFoundError:
            out[d] = "?"
    return out


# ---------------------------------------------------------------------------------------------
# PostgreSQL: a fresh database per peer run, dropped afterwards.


def _db_url(admin_url: str, db: str) -> str:
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(admin_url)
    return urlunsplit(parts._replace(path=f"/{db}"))


def _recreate_database(admin_url: str, db: str, drop_only: bool = False) -> None:
    import psycopg

    with psycopg.connect(admin_url, autocommit=True, connect_timeout=5) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')
        if not drop_only:
            conn.execute(f'CREATE DATABASE "{db}"')


@contextlib.asynccontextmanager
async def fresh_database(cfg: PeerConfig, db: str, create: bool = True) -> AsyncIterator[str]:
    """A database named ``db`` beside ``cfg.pg_url``, new for this run; its URL. Dropped after.
    With ``create=False`` only a leftover is dropped (the peer creates it itself)."""
    await asyncio.to_thread(_recreate_database, cfg.pg_url, db, not create)
    try:
        yield _db_url(cfg.pg_url, db)
    finally:
        await asyncio.to_thread(_recreate_database, cfg.pg_url, db, True)


# ---------------------------------------------------------------------------------------------
# Standalone entry point shared by the peer modules.


def queue_worker_args(argv: Sequence[str]) -> argparse.Namespace:
    """The command line of a Redis-queue peer's worker process (RQ, arq), and quiet logs."""
    import logging

    p = argparse.ArgumentParser()
    p.add_argument("--redis", required=True)
    p.add_argument("--queue", required=True)
    p.add_argument("--index", type=int, default=0)
    logging.basicConfig(level=logging.WARNING)
    return p.parse_args(argv)


def parse_config(argv: Sequence[str] | None = None) -> tuple[PeerConfig, argparse.Namespace]:
    d = PeerConfig()
    p = argparse.ArgumentParser()
    p.add_argument("--redis", dest="redis_url", help=f"default {d.redis_url}")
    p.add_argument("--pg", dest="pg_url", help=f"admin URL (or ${PG_ENV}), default {d.pg_url}")
    p.add_argument("--k", type=int, help=f"questions a session (default {d.k})")
    p.add_argument("--in-flight", type=int, help=f"default {d.in_flight}")
    p.add_argument("--workers", help="worker processes to measure, e.g. 1,2 (default)")
    p.add_argument("--window", dest="window_s", type=float, help=f"default {d.window_s} s")
    p.add_argument("--latency-sessions", type=int, help=f"default {d.latency_sessions}")
    p.add_argument("--saver", choices=["postgres", "memory"], default="postgres")
    p.add_argument("--quick", action="store_true", help="a short run (smoke test)")
    p.add_argument("--config", help="the whole PeerConfig as JSON (overrides the flags)")
    p.add_argument("--json", action="store_true", help="print the result as one JSON line")
    a = p.parse_args(argv)
    if a.config:
        return _cfg_from_json(json.loads(a.config)), a
    names = ("redis_url", "pg_url", "k", "in_flight", "window_s", "latency_sessions")
    kw: dict[str, Any] = {n: getattr(a, n) for n in names if getattr(a, n) is not None}
    if a.workers:
        kw["workers"] = tuple(int(w) for w in a.workers.split(",") if w)
    return (PeerConfig.quick(**kw) if a.quick else PeerConfig(**kw)), a


def main(run: PeerRun, argv: Sequence[str] | None = None) -> None:
    cfg, a = parse_config(argv)
    res = asyncio.run(run(cfg))
    if a.json:
        print(json.dumps(res.to_json()))
    else:
        print(res.line())
        if res.notes:
            print(f"  {res.notes}")
