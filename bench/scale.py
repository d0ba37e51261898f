"""``python -m bench.scale``: operators' reads at a million sessions.

How long a page of ``list_sessions`` and a ``counts()`` take, and what a paused session costs
Redis in memory, with ``--sessions`` (default 1,000,000) paused sessions in the namespace,
beside the raw-Redis floor of the same reads measured in the same run.

A few hundred sessions are made the real way (``submit``, a worker process steps each to its
first question); the rest are copies of those, key for key (``DUMP``/``RESTORE`` of each of
their keys under a new session id, and their index entries): paused sessions indistinguishable
from the originals, made in seconds instead of an hour of worker steps.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from redis.asyncio import Redis

from coordinator import SessionRegistry
from coordinator.keys import SUFFIX
from coordinator.records import now_ms
from tests.redis_proc import RedisProcess

from . import state
from .procs import workers
from .stats import Latency, now

RESULTS = Path(__file__).resolve().parent / "results"
NAMESPACE = "scale"
TEMPLATES = 200
CHUNK = 5000


async def populate(reg: SessionRegistry, client: Redis, n: int) -> list[str]:
    """``n`` paused sessions: ``TEMPLATES`` real ones, the rest restored copies of them."""
    real = await state.populate(reg, min(n, TEMPLATES))
    kinds = [s for s in SUFFIX.values() if s in (":pending", ":answers", ":journal", ":logs")]
    dumps: list[dict[str, tuple[bytes, int]]] = []
    for sid in real:
        base = reg.keys.session(sid).session
        per: dict[str, tuple[bytes, int]] = {}
        for suffix in ("", *kinds):
            blob = await client.dump(base + suffix)
            if blob is not None:
                per[suffix] = (blob, max(1, int(await client.pttl(base + suffix))))
        dumps.append(per)
    shards = await reg.services.ready()
    keys = shards.keys[0]
    start = now_ms()
    sids = list(real)
    made = len(real)
    while made < n:
        pipe = client.pipeline(transaction=False)
        batch = []
        for i in range(made, min(n, made + CHUNK)):
            sid = shards.new_session_id()
            base = reg.keys.session(sid).session
            for suffix, (blob, ttl) in dumps[i % len(dumps)].items():
                pipe.restore(base + suffix, ttl, blob)
            batch.append(sid)
        score = start - made  # distinct activity times, newest last made
        pipe.zadd(keys.registry, {sid: score - k for k, sid in enumerate(batch)})
        pipe.zadd(keys.deadlines, {sid: score - k + 3_600_000 for k, sid in enumerate(batch)})
        await pipe.execute()
        sids += batch
        made += len(batch)
        if made % 100_000 < CHUNK:
            print(f"  {made} sessions", file=sys.stderr)
    return sids


async def timed(fn: Any, repeat: int) -> Latency:
    samples = []
    for _ in range(repeat):
        t0 = now()
        await fn()
        samples.append(now() - t0)
    return Latency.of(samples)


async def floor_page(client: Redis, registry_key: str, template: str, at: int) -> None:
    """What a page costs Redis at least: the index range and each session's snapshot
    fields, in one pipeline, with a plain redis-py client."""
    ids = await client.zrevrangebyscore(registry_key, at, "-inf", start=0, num=101)
    pipe = client.pipeline(transaction=False)
    for raw in ids[:100]:
        key = template.replace("SID", raw.decode())
        pipe.hmget(key, "phase", "strategy", "started_at", "last_activity_at", "remaining")
        pipe.lrange(key + ":logs", 0, -1)
    await pipe.execute()


async def measure(url: str, n: int, repeat: int) -> dict[str, Any]:
    client = Redis.from_url(url)
    await client.flushall()
    reg = SessionRegistry.from_url(url, namespace=NAMESPACE)
    out: dict[str, Any] = {"sessions": n}
    try:
        with workers(url, NAMESPACE, 1):
            t0 = time.monotonic()
            sids = await populate(reg, client, n)
            out["populate_s"] = round(time.monotonic() - t0, 1)
        counts = await reg.counts()
        assert counts["paused"] == n, counts
        first = await reg.list_sessions(limit=100)
        assert len(first.sessions) == 100 and first.next_cursor
        shards = await reg.services.ready()
        registry_key = shards.keys[0].registry
        picks = [await client.zrange(registry_key, i, i, withscores=True)
                 for i in random.Random(7).sample(range(n), min(n, 64))]
        cursors = [f"{int(score)}-{sid.decode()}" for [(sid, score)] in picks]
        rng = random.Random(7)

        async def deep_page() -> None:
            page = await reg.list_sessions(limit=100, cursor=rng.choice(cursors))
            assert page.sessions

        template = reg.keys.session("SID").session
        top = int((await client.zrevrange(registry_key, 0, 0, withscores=True))[0][1])
        reads = {
            "page_first": lambda: reg.list_sessions(limit=100),
            "page_paused": lambda: reg.list_sessions(phase="paused", limit=100),
            "page_deep": deep_page,
            "floor_page": lambda: floor_page(client, registry_key, template, top),
            "counts": reg.counts,
            "floor_zcard": lambda: client.zcard(registry_key),
        }
        for name, read in reads.items():
            out[name] = asdict(await timed(read, repeat))
        out["memory"] = await state.memory_per_session(reg, sids)
        out["used_memory_mb"] = round(int((await client.info("memory"))["used_memory"]) / 2**20)
    finally:
        await reg.aclose()
        await client.aclose()
    return out


def table(r: dict[str, Any]) -> str:
    def lat(name: str) -> str:
        x = r[name]
        return f"{x['p50_ms']:.2f} / {x['p99_ms']:.2f} ms"

    rows = [
        ("paused sessions in the namespace", f"{r['sessions']:,}"),
        ("list_sessions(limit=100), first page, p50 / p99", lat("page_first")),
        ("list_sessions(phase='paused', limit=100), p50 / p99", lat("page_paused")),
        ("list_sessions(limit=100, cursor=<random>), p50 / p99", lat("page_deep")),
        ("floor: the same page read with raw redis-py, p50 / p99", lat("floor_page")),
        ("counts(), p50 / p99", lat("counts")),
        ("floor: one ZCARD, p50 / p99", lat("floor_zcard")),
        ("Redis memory per paused session (200-char prompt)",
         f"{r['memory']['bytes']:.0f} B ({r['memory']['beyond_prompt']:.0f} B beyond the prompt)"),
        ("Redis used_memory", f"{r['used_memory_mb']} MiB"),
    ]
    out = ["| measurement | value |", "| --- | --- |"]
    out += [f"| {a} | {b} |" for a, b in rows]
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.scale", description=__doc__)
    p.add_argument("--sessions", type=int, default=1_000_000)
    p.add_argument("--repeat", type=int, default=200)
    args = p.parse_args()
    with RedisProcess() as server:
        r = asyncio.run(measure(server.url, args.sessions, args.repeat))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "scale-latest.json").write_text(json.dumps(r, indent=2))
    print(table(r))


if __name__ == "__main__":
    main()
