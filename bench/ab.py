"""``python -m bench.ab --old PATH``: the hot path of two checkouts, measured in one run.

A change to the hot path must show before/after numbers from one run on one machine, so this
starts one redis-server and, round after round, measures the live step (p50/p99) and the
throughput of 50 sessions on 2 workers for each checkout in turn (interleaved, so a slow spell
of the machine falls on both alike). Each checkout is measured by its own code: a subprocess
with that checkout on ``PYTHONPATH`` runs its own ``bench.coord`` against its own workers.

    git worktree add /tmp/ab-old <commit before the change>
    python -m bench.ab --old /tmp/ab-old [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import redis

from tests.redis_proc import RedisProcess

ROOT = Path(__file__).resolve().parent.parent

#: Runs inside the checkout under test (its ``bench`` and ``coordinator`` packages).
_PROBE = """
import asyncio, json, sys
from coordinator import SessionRegistry
from bench import coord
from bench.procs import workers

async def main(url, n_lat, seconds):
    out = {}
    with workers(url, "abl", 1):
        reg = SessionRegistry.from_url(url, namespace="abl")
        lat = await coord.step_latency(reg, n_lat)
        out["live_p50_ms"], out["live_p99_ms"] = lat.step.p50_ms, lat.step.p99_ms
        await reg.aclose()
    with workers(url, "abt", 2):
        reg = SessionRegistry.from_url(url, namespace="abt")
        out["steps_per_s_50x2"] = await coord.throughput(reg, 50, seconds)
        await reg.aclose()
    print(json.dumps(out))

asyncio.run(main(sys.argv[1], int(sys.argv[2]), float(sys.argv[3])))
"""


def measure(checkout: Path, url: str, n_lat: int, seconds: float) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": str(checkout)}
    done = subprocess.run([sys.executable, "-c", _PROBE, url, str(n_lat), str(seconds)],
                          cwd=checkout, env=env, capture_output=True, text=True, check=False,
                          timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"probe in {checkout} failed:\n{done.stderr[-3000:]}")
    result: dict[str, float] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--old", type=Path, required=True, help="checkout before the change")
    p.add_argument("--new", type=Path, default=ROOT, help="checkout after (default: this)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--latency-steps", type=int, default=200)
    p.add_argument("--seconds", type=float, default=8.0, help="throughput window per run")
    args = p.parse_args()
    runs: dict[str, list[dict[str, float]]] = {"old": [], "new": []}
    with RedisProcess() as server:
        for n in range(args.rounds):
            for name in ("old", "new") if n % 2 == 0 else ("new", "old"):
                with redis.Redis.from_url(server.url) as client:
                    client.flushall()
                res = measure(getattr(args, name), server.url, args.latency_steps,
                              args.seconds)
                runs[name].append(res)
                print(f"round {n + 1} {name}: {res}", file=sys.stderr)
    rows = ["| measurement | before | after | after / before |", "| --- | --- | --- | --- |"]
    for key, label in (("live_p50_ms", "live step p50 (ms)"),
                       ("live_p99_ms", "live step p99 (ms)"),
                       ("steps_per_s_50x2", "throughput, 50 sessions, 2 workers (steps/s)")):
        old = statistics.median(r[key] for r in runs["old"])
        new = statistics.median(r[key] for r in runs["new"])
        rows.append(f"| {label} | {old:.3f} | {new:.3f} | {new / old:.2f} |")
    print(f"medians of {args.rounds} interleaved rounds; old = {args.old}, new = {args.new}")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
