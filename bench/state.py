"""Scale of state: observing many paused sessions, memory per session, replay cost."""

from __future__ import annotations

import asyncio
import statistics
import sys
from dataclasses import asdict
from typing import Any

from coordinator import Paused, SessionRegistry
from workers.catalog import get
from workers.runtime import Execution, JournalRound, digest

from . import strategies
from .observer import KINDS
from .stats import Latency, now

PROMPT_CHARS = 200


async def populate(reg: SessionRegistry, n: int, chunk: int = 500) -> list[str]:
    """``n`` sessions paused on their first question (a 200-character prompt)."""
    sids: list[str] = []
    for start in range(0, n, chunk):
        batch = await asyncio.gather(*(
            reg.submit("bench-seq", {"k": 10, "prompt_chars": PROMPT_CHARS})
            for _ in range(min(chunk, n - start))
        ))
        events = await asyncio.gather(*(reg.wait_event(s, timeout=120) for s in batch))
        assert all(isinstance(e, Paused) for e in events)
        sids.extend(batch)
    return sids


async def snapshot_time(reg: SessionRegistry, repeat: int = 5) -> tuple[float, int]:
    """Median seconds of ``list_snapshots()`` and how many sessions it returned."""
    times, count = [], 0
    for _ in range(repeat):
        t0 = now()
        count = len(await reg.list_snapshots())
        times.append(now() - t0)
    return statistics.median(times), count


async def feed_latency(reg: SessionRegistry, steps: int) -> Latency:
    """Feed -> next question for fresh sessions, one at a time."""
    return Latency.of(await feed_samples(reg, steps))


async def feed_samples(reg: SessionRegistry, steps: int) -> list[float]:
    samples: list[float] = []
    while len(samples) < steps:
        sid, res = await reg.start_execution("bench-seq", {"k": 10})
        while isinstance(res, Paused) and len(samples) < steps:
            t0 = now()
            res = await reg.feed_response(sid, res.queries[0].id, "ok")
            samples.append(now() - t0)
        await reg.cancel(sid) if isinstance(res, Paused) else None
    return samples


async def feed_samples_beside(
    reg: SessionRegistry, url: str, steps: int, kind: str = "list"
) -> tuple[list[float], int]:
    """The same while a neighbour process of ``kind`` (see ``bench.observer``) runs in a
    loop; also returns how many rounds of its loop it completed meanwhile."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.observer", url, reg.keys.namespace, kind,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
    )
    assert proc.stdin is not None and proc.stdout is not None
    try:
        ready = await asyncio.wait_for(proc.stdout.readline(), 60)  # one round done
        assert ready.strip() == b"ready", ready
        samples = await feed_samples(reg, steps)
    finally:
        proc.stdin.close()
        out, _ = await asyncio.wait_for(proc.communicate(), 60)
    return samples, int(out.strip() or 1) - 1  # the first round ran before the feeds


async def feed_beside_neighbours(
    reg: SessionRegistry, url: str, steps: int, rounds: int
) -> dict[str, dict[str, Any]]:
    """Feed latency alone and beside each kind of neighbour, interleaved in ``rounds`` so that
    the machine's drift (this is a shared VM) falls on every condition alike; samples pooled
    per condition. ``loops``: the neighbour's rounds completed meanwhile."""
    pooled: dict[str, list[float]] = {"alone": []}
    loops: dict[str, int] = {}
    for _ in range(rounds):
        pooled["alone"] += await feed_samples(reg, steps)
        for kind in KINDS:
            samples, n = await feed_samples_beside(reg, url, steps, kind)
            pooled.setdefault(kind, []).extend(samples)
            loops[kind] = loops.get(kind, 0) + n
    return {k: {**asdict(Latency.of(v)), **({"loops": loops[k]} if k in loops else {})}
            for k, v in pooled.items()}


async def memory_per_session(reg: SessionRegistry, sids: list[str]) -> dict[str, float]:
    """Bytes of Redis memory per paused session: its own keys plus its share of the
    namespace's index entries, with and without its prompt text."""
    sample = sids[: min(200, len(sids))]
    pipe = reg.client.pipeline(transaction=False)
    for sid in sample:
        sk = reg.keys.session(sid)
        for key in sk.all_data():
            pipe.memory_usage(key, samples=0)
    per_key: list[Any] = await pipe.execute()
    own = sum(x or 0 for x in per_key) / len(sample)
    index = 0.0
    for key in (reg.keys.registry, reg.keys.deadlines):
        index += (await reg.client.memory_usage(key, samples=0) or 0) / max(1, len(sids))
    total = own + index
    return {"bytes": total, "beyond_prompt": total - PROMPT_CHARS}


async def replay_per_round(rounds: int) -> float:
    """Seconds per round to rebuild an execution of ``rounds`` answered rounds."""
    fn = get("bench-seq")
    assert fn is strategies.seq
    probe = Execution(fn, {"k": rounds + 1})
    first = await probe.step(None, 10)
    assert hasattr(first, "queries")
    d = digest(first.queries)  # every round of bench-seq asks the same question
    probe.close()
    journal = [JournalRound(d, ["ok"]) for _ in range(rounds)]
    ex = Execution(fn, {"k": rounds + 1})
    t0 = now()
    await ex.replay(journal, 60)
    elapsed = now() - t0
    ex.close()
    return elapsed / rounds
