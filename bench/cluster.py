"""Throughput on a Redis Cluster, and how evenly the primaries share the work.

Starts its own Redis Cluster (three primaries, each with a replica: ``tests.topology``) and
two real worker processes on its ``redis+cluster://`` URL, and measures in one run:

- the coordinator's throughput (``bench.coord.throughput``: completed steps per second of
  many sessions driven at once by this host), on a new namespace with the default shard
  count (4 per primary: 12);
- each primary's share of the commands it executed in the measured window (the sums of the
  ``calls`` of ``INFO commandstats``, read from each primary before and after it);
- the floor: pipelined ``SET`` throughput through a ``redis.asyncio.RedisCluster`` client to
  keys over all slots, ``SET`` throughput with as many single commands in flight as there are
  sessions, and a PING round trip to one primary.

``python -m bench.cluster [--seconds N] [--sessions N]`` prints a small table; ``measure()``
and ``rows()`` give the same for another report.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import sys
from dataclasses import asdict
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.cluster import ClusterNode, RedisCluster

from coordinator import SessionRegistry
from tests.topology import ClusterGroup

from . import coord, procs
from .sentinel import ping_rtt
from .stats import Latency, now

#: ``SET``s per pipeline of the floor, and pipelines in flight at once.
PIPE = 100
PIPES_IN_FLIGHT = 4
#: Keys per task of the floor (reused: a long run does not fill memory).
KEYS = 10_000


async def command_calls(ports: list[int]) -> list[int]:
    """Each primary's commands executed so far (``INFO commandstats``; its own INFO left out)."""
    totals = []
    for port in ports:
        client = Redis(host="127.0.0.1", port=port)
        try:
            stats = await client.info("commandstats")
        finally:
            await client.aclose()
        totals.append(sum(int(v["calls"]) for k, v in stats.items()
                          if isinstance(v, dict) and k != "cmdstat_info"))
    return totals


async def coordinator_throughput(url: str, ports: list[int], sessions: int, seconds: float
                                 ) -> dict[str, Any]:
    """``bench.coord.throughput`` with 2 workers; ``INFO commandstats`` of each primary is
    read when its measured window opens and when it closes (a task beside it, on the same
    clock: the helper's warm-up is ``min(2, seconds / 3)``)."""
    ns = f"bcl{secrets.token_hex(3)}"
    with procs.workers(url, ns, 2):
        reg = SessionRegistry.from_url(url, namespace=ns)
        try:
            shard_count = len(await reg.services.ready())

            async def sample() -> list[int]:
                await asyncio.sleep(min(2.0, seconds / 3))
                before = await command_calls(ports)
                await asyncio.sleep(seconds)
                after = await command_calls(ports)
                return [a - b for a, b in zip(after, before, strict=True)]

            sampler = asyncio.create_task(sample())
            steps = await coord.throughput(reg, sessions, seconds)
            calls = await sampler
        finally:
            await reg.aclose()
    total = sum(calls) or 1
    return {"steps_per_s": steps, "shards": shard_count, "calls": calls,
            "shares": [c / total for c in calls]}


async def set_throughput(ports: list[int], seconds: float, *, pipeline: int,
                         in_flight: int) -> float:
    """``SET``s per second through one ``RedisCluster`` client: ``in_flight`` tasks, each
    sending batches of ``pipeline`` (1: single commands) to keys over all slots."""
    client = RedisCluster(startup_nodes=[ClusterNode("127.0.0.1", p) for p in ports])
    done = 0
    counting = False
    stop = asyncio.Event()

    async def one(worker: int) -> None:
        nonlocal done
        i = 0
        while not stop.is_set():
            if pipeline == 1:
                await client.set(f"floor:{worker}:{i % KEYS}", b"x" * 20)
            else:
                pipe = client.pipeline(transaction=False)
                for j in range(pipeline):
                    pipe.set(f"floor:{worker}:{(i + j) % KEYS}", b"x" * 20)
                await pipe.execute()
            i += pipeline
            if counting:
                done += pipeline

    try:
        await client.initialize()
        tasks = [asyncio.create_task(one(w)) for w in range(in_flight)]
        await asyncio.sleep(min(1.0, seconds / 3))
        counting, start = True, now()
        await asyncio.sleep(seconds)
        counting = False
        elapsed = now() - start
        stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks), 60)
    finally:
        await client.aclose()
    return done / elapsed


async def measure(group: ClusterGroup, *, sessions: int = 50, seconds: float = 8.0,
                  pings: int = 2000) -> dict[str, Any]:
    """The whole cluster run, JSON-serialisable."""
    ports = [n.port for n in group.primaries()]
    print(f"cluster: throughput, {sessions} sessions, 2 workers ...", file=sys.stderr)
    tput = await coordinator_throughput(group.url, ports, sessions, seconds)
    print("cluster: floor ...", file=sys.stderr)
    floor_seconds = max(1.0, seconds / 2)
    pipelined = await set_throughput(ports, floor_seconds, pipeline=PIPE,
                                     in_flight=PIPES_IN_FLIGHT)
    singles = await set_throughput(ports, floor_seconds, pipeline=1, in_flight=sessions)
    ping: Latency = await ping_rtt(ports[0], pings)
    return {"primaries": len(ports), "sessions": sessions, "workers": 2, **tput,
            "floor": {"set_pipelined_per_s": pipelined, "set_single_per_s": singles,
                      "ping": asdict(ping)}}


def rows(r: dict[str, Any]) -> list[str]:
    """Markdown rows: ``| measurement | value |`` (the full bench's shape)."""
    ping = r["floor"]["ping"]
    shares = " / ".join(f"{100 * s:.0f} %" for s in r["shares"])
    return [
        f"| cluster: throughput, {r['sessions']} sessions, {r['workers']} workers, "
        f"{r['shards']} shards | {r['steps_per_s']:.0f} steps/s |",
        f"| cluster: each primary's share of the commands in that window "
        f"({sum(r['calls'])} commands) | {shares} |",
        f"| cluster floor: pipelined SET through RedisCluster ({PIPE} per pipeline, "
        f"{PIPES_IN_FLIGHT} in flight, keys over all slots) | "
        f"{r['floor']['set_pipelined_per_s']:.0f} SETs/s |",
        f"| cluster floor: single SETs through RedisCluster, {r['sessions']} in flight | "
        f"{r['floor']['set_single_per_s']:.0f} SETs/s |",
        f"| cluster floor: PING round trip to one primary (ms, p50 / p99 / max) | "
        f"{ping['p50_ms']:.3f} / {ping['p99_ms']:.3f} / {ping['max_ms']:.3f} |",
    ]


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.cluster",
                                description=(__doc__ or "").split("\n")[0])
    p.add_argument("--seconds", type=float, default=8.0,
                   help="measured window of the throughput run (default 8)")
    p.add_argument("--sessions", type=int, default=50,
                   help="sessions driven at once (default 50)")
    args = p.parse_args()
    group = ClusterGroup()
    group.start()
    try:
        results = asyncio.run(measure(group, sessions=args.sessions, seconds=args.seconds))
    finally:
        group.close()
    print(f"| measurement ({results['primaries']} primaries) | value |\n| --- | --- |")
    print("\n".join(rows(results)))


if __name__ == "__main__":
    main()
