"""Worker processes for the benchmark (real ``coordinator worker`` processes)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from coordinator.keys import Keys
from tests.procs import sync_client

ROOT = Path(__file__).resolve().parent.parent


@contextmanager
def workers(url: str, namespace: str, n: int, *, concurrency: int = 64,
            env: dict[str, str] | None = None) -> Iterator[list[subprocess.Popen[bytes]]]:
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "coordinator", "worker", "--redis", url, "--namespace",
             namespace, "--import", "bench.strategies", "--concurrency", str(concurrency),
             "--log-level", "WARNING"],
            env=full_env, cwd=ROOT,
        )
        for _ in range(n)
    ]
    try:
        client = sync_client(url)  # any URL the coordinator takes: one server, Sentinel, Cluster
        try:
            deadline = time.monotonic() + 30
            while client.zcard(Keys(namespace).workers) < n:  # process start-up only
                if any(p.poll() is not None for p in procs):
                    raise RuntimeError("a worker process exited during start-up")
                if time.monotonic() > deadline:
                    raise RuntimeError("workers did not start")
                time.sleep(0.05)
        finally:
            client.close()
        yield procs
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
