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
checkpointer) and runs standalone: ``python -m bench.peers.rq_peer --redis URL [--json]``.
``available()`` tells which peers can run here and why not; ``run_in_subprocess`` runs a peer
in another interpreter (the ``bench`` extra pins redis-py below 6 through arq, so the main
benchmark may keep the peers in a venv of their own).
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
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..stats import Latency, now

ROOT = Path(__file__).resolve().parents[2]

Record = Callable[[float], None]
"""Called once per step with the step's duration in seconds."""

SessionFn = Callable[[str, Record], Awaitable[None]]
"""Runs one whole session (start, then K answered steps) under the given session id."""


@dataclass(frozen=True)
class PeerConfig:
    redis_url: str = "redis://127.0.0.1:6379/5"
    # An admin connection: peers on PostgreSQL create (and drop) databases of their own beside it.
    pg_url: str = "postgresql://postgres@127.0.0.1:5432/postgres"
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


@dataclass
class PeerResult:
    name: str
    latency: Latency
    throughput: dict[int, float]  # steps/s keyed by worker processes (or by sessions in flight)
    notes: str = ""
    throughput_by: str = "workers"  # "workers", or "sessions" for peers without worker processes
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


def available(cfg: PeerConfig | None = None) -> dict[str, str | None]:
    """``{peer: None}`` when it can run, else ``{peer: reason}`` (missing package, or, when a
    config is given, its Redis/PostgreSQL server out of reach)."""
    out: dict[str, str | None] = {}
    for name, (_, _, mods) in PEERS.items():
        missing = _missing_modules(mods)
        if missing:
            out[name] = f"not installed: {', '.join(missing)} (pip install -e '.[bench]')"
        elif cfg is not None:
            out[name] = _server_reason(name, cfg)
        else:
            out[name] = None
    return out


def load(name: str) -> Callable[[PeerConfig], Awaitable[PeerResult]]:
    mod, fn, _ = PEERS[name]
    module = importlib.import_module(f"{__name__}.{mod}")
    run: Callable[[PeerConfig], Awaitable[PeerResult]] = getattr(module, fn)
    return run


async def run_peer(name: str, cfg: PeerConfig) -> PeerResult:
    return await load(name)(cfg)


def cli_args(cfg: PeerConfig) -> list[str]:
    """The standalone command line that reproduces ``cfg``."""
    return [
        "--redis", cfg.redis_url, "--pg", cfg.pg_url, "--k", str(cfg.k),
        "--in-flight", str(cfg.in_flight), "--workers", ",".join(map(str, cfg.workers)),
        "--window", str(cfg.window_s), "--latency-sessions", str(cfg.latency_sessions),
    ]  # fmt: skip


async def run_in_subprocess(
    name: str, cfg: PeerConfig, python: str | None = None, timeout_s: float = 120.0
) -> PeerResult:
    """Run one peer in a fresh interpreter (``python``, default this one) and read its JSON.

    A fresh process per peer keeps one peer's threads and pools from loading the next one, and
    lets the peers live in a venv of their own."""
    mod, fn, _ = PEERS[name]
    exe = python or sys.executable
    args = [exe, "-m", f"{__name__}.{mod}", *cli_args(dataclasses.replace(cfg, python=exe))]
    if fn == "run_memory":
        args += ["--saver", "memory"]
    proc = await asyncio.create_subprocess_exec(
        *args, "--json", stdout=asyncio.subprocess.PIPE, cwd=ROOT, env=_child_env()
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout_s)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    if proc.returncode != 0:
        raise RuntimeError(f"peer {name} exited with {proc.returncode}")
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


def session_ids(prefix: str) -> Callable[[str], str]:
    return lambda sid: f"{prefix}-{sid}"


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
        conn.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')  # type: ignore[arg-type]
        if not drop_only:
            conn.execute(f'CREATE DATABASE "{db}"')  # type: ignore[arg-type]


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


def parse_config(argv: Sequence[str] | None = None) -> tuple[PeerConfig, argparse.Namespace]:
    p = argparse.ArgumentParser()
    d = PeerConfig()
    p.add_argument("--redis", default=d.redis_url)
    p.add_argument("--pg", default=d.pg_url)
    p.add_argument("--k", type=int, default=d.k)
    p.add_argument("--in-flight", type=int, default=d.in_flight)
    p.add_argument("--workers", default=",".join(map(str, d.workers)))
    p.add_argument("--window", type=float, default=d.window_s)
    p.add_argument("--latency-sessions", type=int, default=d.latency_sessions)
    p.add_argument("--saver", choices=["postgres", "memory"], default="postgres")
    p.add_argument("--json", action="store_true", help="print the result as one JSON line")
    a = p.parse_args(argv)
    cfg = PeerConfig(
        redis_url=a.redis, pg_url=a.pg, k=a.k, in_flight=a.in_flight,
        workers=tuple(int(w) for w in a.workers.split(",") if w), window_s=a.window,
        latency_sessions=a.latency_sessions,
    )  # fmt: skip
    return cfg, a


def main(
    run: Callable[[PeerConfig], Awaitable[PeerResult]], argv: Sequence[str] | None = None
) -> None:
    cfg, a = parse_config(argv)
    res = asyncio.run(run(cfg))
    if a.json:
        print(json.dumps(res.to_json()))
    else:
        print(res.line())
        if res.notes:
            print(f"  {res.notes}")
