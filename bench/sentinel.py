"""Live step latency behind Redis Sentinel, with and without ``wait_replicas``.

Starts its own Sentinel group (a primary, a replica, three sentinels: ``tests.topology``),
runs an in-process worker and a registry over the ``redis+sentinel://`` URL and measures, in
one run, one session at a time (``bench.coord.step_latency``: the last answer of a round ->
the next question):

- ``ALC_WAIT_REPLICAS=0``: asynchronous replication (a failover may lose the last writes);
- ``ALC_WAIT_REPLICAS=1``: every change a caller is told about waits for the replica;
- the floor: a PING round trip to the primary through a plain redis-py asyncio client.

``python -m bench.sentinel [--steps N]`` prints a small table; ``rows()`` gives the same rows
for another report.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import sys
from dataclasses import asdict
from typing import Any

from redis.asyncio import Redis

from coordinator import SessionRegistry
from coordinator.settings import Settings
from tests.topology import SentinelGroup

from . import coord
from . import strategies as _strategies  # noqa: F401  (registers bench-seq in-process)
from .stats import Latency, now

#: ``wait_replicas_timeout_ms`` of the durable run: generous, a healthy replica answers in
#: well under a millisecond on loopback; a timeout would show as a failed run, not a number.
WAIT_MS = 2000


async def ping_rtt(port: int, n: int) -> Latency:
    """PING round trips to the primary, one at a time (the first 50 warm the connection)."""
    client = Redis(host="127.0.0.1", port=port)
    samples: list[float] = []
    try:
        for i in range(n + 50):
            t0 = now()
            await client.ping()
            if i >= 50:
                samples.append(now() - t0)
    finally:
        await client.aclose()
    return Latency.of(samples)


async def live_latency(url: str, sessions: int, wait_replicas: int) -> Latency:
    """``bench.coord.step_latency`` on an in-process worker and registry over ``url``."""
    from workers import catalog
    from workers.worker import Worker

    settings = Settings(url=url, namespace=f"bsen{secrets.token_hex(3)}",
                        wait_replicas=wait_replicas, wait_replicas_timeout_ms=WAIT_MS)
    reg = SessionRegistry.from_url(url, namespace=settings.namespace,
                                   wait_replicas=wait_replicas, wait_replicas_timeout_ms=WAIT_MS)
    catalog.load([])
    from coordinator.transport import Transport

    transport = Transport.from_url(url, timeout_s=settings.redis_timeout_s)
    worker = Worker(transport, settings, concurrency=8)
    await worker.start()
    try:
        run = await coord.step_latency(reg, sessions)
    finally:
        await worker.shutdown(grace_s=1.0)
        await reg.aclose()
        await transport.aclose()
    return run.step


async def measure(group: SentinelGroup, sessions: int) -> dict[str, Latency]:
    """Interleaved: off, on, off, on (a slow spell of the machine falls on both alike)."""
    half = max(1, sessions // 2)
    parts: dict[str, list[Latency]] = {"off": [], "on": []}
    for mode in ("off", "on", "off", "on"):
        print(f"sentinel: live steps, wait_replicas {mode} ...", file=sys.stderr)
        parts[mode].append(await live_latency(group.url, half, 1 if mode == "on" else 0))
    floor = await ping_rtt(group.primary_port(), sessions * coord.K)
    return {"ping": floor, "off": _merge(parts["off"]), "on": _merge(parts["on"])}


def _merge(parts: list[Latency]) -> Latency:
    """The worse of each percentile over the interleaved halves (an honest upper figure)."""
    return Latency(sum(p.n for p in parts), max(p.p50_ms for p in parts),
                   max(p.p99_ms for p in parts), max(p.max_ms for p in parts))


def rows(r: dict[str, Latency]) -> list[str]:
    """Markdown rows: ``| measurement | p50 / p99 / max (ms) |`` (the full bench's shape)."""
    def lat(x: Latency) -> str:
        return f"{x.p50_ms:.3f} / {x.p99_ms:.3f} / {x.max_ms:.3f}"

    return [
        f"| sentinel floor: PING round trip to the primary | {lat(r['ping'])} |",
        f"| sentinel: step, live path, ALC_WAIT_REPLICAS=0 | {lat(r['off'])} |",
        f"| sentinel: step, live path, ALC_WAIT_REPLICAS=1 | {lat(r['on'])} |",
    ]


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.sentinel", description=__doc__.split(
        "\n")[0])
    p.add_argument("--sessions", type=int, default=40,
                   help=f"sessions per setting, {coord.K} steps each (default 40)")
    args = p.parse_args()
    group = SentinelGroup()
    group.start()
    try:
        results = asyncio.run(measure(group, args.sessions))
    finally:
        group.close()
    out: dict[str, Any] = {k: asdict(v) for k, v in results.items()}
    print("| measurement | p50 / p99 / max (ms) |\n| --- | --- |")
    print("\n".join(rows(results)))
    on, off = out["on"]["p50_ms"], out["off"]["p50_ms"]
    print(f"\nwait_replicas=1 adds {on - off:.3f} ms at p50 "
          f"({results['on'].n} and {results['off'].n} steps)")


if __name__ == "__main__":
    main()
