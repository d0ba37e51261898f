"""A real Redis Cluster (3 primaries, each with a replica) under real worker processes.

Two workers and an in-process host drive 100 sessions of 5 rounds of 3 queries, each round
answered out of order. Every result is a pure function of the answers, so each is checked
exactly; a round applied twice or lost shows in the result and in the journal. The sharded
namespace must spread over every primary (sessions' keys and shards' streams found on each),
and SIGKILL of a primary mid-run must cost nothing but time: its replica takes over and
every session still finishes exactly.

The host answers the way the README tells hosts to: on any refusal that means "the session
is not where you think" (``StaleRound``, ``UnknownQuery``, ``AlreadyResponded``,
``InvalidTransition``) or "Redis is away" (``Unavailable``, ``WaitTimeout``) it re-reads the
session with ``wait_event`` and answers what it is shown.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis

from coordinator.errors import (
    AlreadyResponded,
    InvalidTransition,
    StaleRound,
    Unavailable,
    UnknownQuery,
    WaitTimeout,
)
from coordinator.models import Finished, Paused
from coordinator.registry import SessionRegistry
from coordinator.shards import key_slot
from coordinator.states import Phase
from tests.procs import FAST_ENV, FAST_SETTINGS, WorkerPool, answer_for, new_namespace
from tests.strategies_mp import expected_rounds
from tests.topology import ClusterGroup, running

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

SESSIONS = 100
ROUNDS = 5
WIDTH = 3
#: Refusals after which a host re-reads the session and answers what it shows.
REREAD = (StaleRound, UnknownQuery, AlreadyResponded, InvalidTransition, Unavailable,
          WaitTimeout)
RUN_S = 180.0


@pytest.fixture(scope="module")
def cluster() -> Iterator[ClusterGroup]:
    """A cluster of this module's own: the kill test leaves one primary without a replica."""
    with running(ClusterGroup()) as group:
        yield group


@pytest.fixture
async def pool(cluster: ClusterGroup, tmp_path: Path) -> AsyncIterator[WorkerPool]:
    workers = WorkerPool(cluster.url, new_namespace(), tmp_path,
                         env={**FAST_ENV, "ALC_REDIS_TIMEOUT_S": "5"})
    try:
        yield workers
    finally:
        workers.close()


@dataclass
class Host:
    """Drives sessions to their end, answering each round in a random order."""

    reg: SessionRegistry
    rng: random.Random
    rounds_done: int = 0
    rereads: int = 0
    on_round: Any = None
    errors: list[str] = field(default_factory=list)

    async def reread(self, sid: str) -> Any:
        """The session's current event, waiting out a failover (bounded by the run)."""
        while True:
            try:
                return await self.reg.wait_event(sid, timeout=10.0)
            except (Unavailable, WaitTimeout):
                self.rereads += 1
                await asyncio.sleep(0.2)  # Redis is away: every caller backs off

    async def drive(self, sid: str) -> Finished:
        event = await self.reread(sid)
        while isinstance(event, Paused):
            order = list(event.queries)
            self.rng.shuffle(order)
            nxt: Any = None
            try:
                for q in order:
                    nxt = await self.reg.feed_response(sid, q.id, answer_for(q.prompt),
                                                       timeout=10.0)
            except REREAD as exc:
                self.rereads += 1
                self.errors.append(f"{type(exc).__name__}")
                nxt = None
            if isinstance(nxt, Paused | Finished):
                self.rounds_done += 1
                if self.on_round is not None:
                    await self.on_round(self.rounds_done)
                event = nxt
            else:
                event = await self.reread(sid)
        assert isinstance(event, Finished)
        return event


async def run_sessions(reg: SessionRegistry, host: Host, ctx: str) -> dict[str, Finished]:
    sids: list[str] = []
    for n in range(SESSIONS):
        sids.append(await reg.submit("mp-rounds", {"tag": f"c{n}", "rounds": ROUNDS,
                                                   "width": WIDTH}))
    events = await asyncio.wait_for(asyncio.gather(*(host.drive(sid) for sid in sids)),
                                    RUN_S)
    return dict(zip(sids, events, strict=True))


async def check_exact(reg: SessionRegistry, results: dict[str, Finished], ctx: str) -> None:
    client = reg.client
    for n, (sid, ev) in enumerate(results.items()):
        tag = f"c{n}"
        assert ev.state is Phase.COMPLETED, f"{sid}: {ev.state} {ev.error} {ctx}"
        assert ev.result == {"tag": tag, "rounds": expected_rounds(tag, ROUNDS, WIDTH,
                                                                  answer_for)}, \
            f"{sid}: wrong result {ev.result} {ctx}"
        assert ev.metrics["auto"]["rounds"] == ROUNDS, (sid, ev.metrics, ctx)
        assert ev.metrics["auto"]["llm_calls"] == ROUNDS * WIDTH, (sid, ev.metrics, ctx)
        assert await client.llen(reg.keys.session(sid).journal) == ROUNDS, (sid, ctx)


def keys_by_primary(cluster: ClusterGroup, namespace: str) -> dict[int, list[bytes]]:
    """Every key of ``namespace`` on each primary (by port), read from the primary itself."""
    out: dict[int, list[bytes]] = {}
    for node in cluster.primaries():
        client = redis.Redis(host="127.0.0.1", port=node.port, socket_timeout=5.0)
        try:
            out[node.port] = list(client.scan_iter(match=f"{namespace}:*", count=1000))
        finally:
            client.close()
    return out


async def two_workers_and_a_host(cluster: ClusterGroup, pool: WorkerPool
                                  ) -> tuple[SessionRegistry, int, str]:
    """Two worker processes on the cluster, and the host's registry (with a seed for its
    random answer order and the context its assertions print)."""
    seed = random.randrange(2**32)
    await pool.start(concurrency=8)
    await pool.start(concurrency=8)
    reg = SessionRegistry.from_url(cluster.url, namespace=pool.namespace, **FAST_SETTINGS)
    return reg, seed, f"(seed {seed}, namespace {pool.namespace})"


async def test_sessions_and_shards_spread_over_every_primary(
    cluster: ClusterGroup, pool: WorkerPool,
) -> None:
    reg, seed, ctx = await two_workers_and_a_host(cluster, pool)
    try:
        host = Host(reg, random.Random(seed))
        results = await run_sessions(reg, host, ctx)
        await check_exact(reg, results, ctx)
        shards = await reg.services.ready()
        assert len(shards) == 4 * 3, shards  # 4 per primary, chosen at creation
        assert host.rounds_done == SESSIONS * ROUNDS and host.rereads == 0, (host, ctx)

        found = keys_by_primary(cluster, pool.namespace)
        streams = {k.jobs.encode() for k in shards.keys}
        for port, keys in found.items():
            sessions = {k for k in keys if any(k.endswith(s.encode()) for s in results)
                        or b":{s-" in k}
            assert sessions, f"no session key on primary {port} {ctx}"
            mine = streams & set(keys)
            assert len(mine) == 4, f"primary {port} holds shard streams {mine} {ctx}"
        # every session's keys sit in its shard's slot
        for sid in results:
            assert key_slot(reg.keys.session(sid).session) == \
                key_slot(shards.of(sid).jobs), sid
    finally:
        await reg.aclose()
    assert "Traceback" not in pool.logs(), pool.logs()


async def test_a_primary_killed_mid_run_costs_time_not_results(
    cluster: ClusterGroup, pool: WorkerPool,
) -> None:
    reg, seed, ctx = await two_workers_and_a_host(cluster, pool)
    victim = cluster.primaries()[0]
    victim_slots = next(ranges for node, ranges in await reg.redis.primaries()
                        if node.endswith(f":{victim.port}"))
    killed = asyncio.Event()

    async def kill_at(rounds_done: int) -> None:
        if rounds_done == SESSIONS * ROUNDS * 2 // 5 and not killed.is_set():
            killed.set()
            cluster.kill(victim)

    try:
        host = Host(reg, random.Random(seed), on_round=kill_at)
        results = await run_sessions(reg, host, ctx)
        assert killed.is_set(), f"the run ended before the kill {ctx}"
        await asyncio.to_thread(cluster.wait_failover, victim)
        await check_exact(reg, results, ctx)
        # the kill was felt: sessions lived on the primary killed (its replica took over)
        hit = [sid for sid in results
               if any(lo <= key_slot(sid) <= hi for lo, hi in victim_slots)]
        assert len(hit) >= SESSIONS // 10, (len(hit), victim_slots, ctx)
        print(f"kill run: {len(hit)} sessions on the killed primary, {host.rounds_done} rounds "
              f"settled, {host.rereads} re-reads ({', '.join(sorted(set(host.errors)))}) {ctx}")
        # A host re-attaching afterwards sees the same final event.
        for sid, ev in list(results.items())[:10]:
            assert await reg.wait_event(sid, timeout=10.0) == ev
    finally:
        await reg.aclose()
    assert all(w.alive for w in pool.procs), pool.logs()
