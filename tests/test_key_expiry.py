"""Every key expires when the README says it does.

A live session's keys carry the backstop expiry (idle ttl + retention), so a leak cannot keep
them forever; once a session has ended (completed, failed, cancelled, expired), each of its
keys lives at most the retention period, then the namespace holds only its own shared keys.
The issue this pins: the feed-token keys (``:fed``, ``:fed:prev``) of cancelled or expired
sessions kept the backstop expiry, about an hour past retention.

On a real redis-server (expiry is the server's business), with in-process workers.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator
from typing import Any

import pytest

from coordinator.keys import Keys
from coordinator.models import Accepted, Finished, Paused
from coordinator.registry import SessionRegistry
from coordinator.settings import Settings
from coordinator.states import Phase
from tests.helpers import GATES, Gate, assert_eventually
from tests.procs import InProcessCluster, answer_for
from workers import strategy
from workers.context import Context

pytestmark = pytest.mark.redis

RETENTION_S = 1.5
RETENTION_MS = int(RETENTION_S * 1000)
LEASE_MS = 3000
#: Far beyond every idle deadline (an injected GC clock).
FAR_MS = 100 * 24 * 3600 * 1000


def _prompt(tag: str, r: int, i: int) -> str:
    return f"expiry {tag}: round {r}, item {i}"


@strategy("texp-rounds")
async def texp_rounds(ctx: Context, tag: str = "", rounds: int = 2, width: int = 2,
                      fail: bool = False, **_: Any) -> dict[str, Any]:
    """``rounds`` rounds of ``width`` queries, then its result (or, with ``fail``, an
    error); the start step waits at the gate ``{tag}`` when the test made one."""
    if not ctx.replaying and tag in GATES:
        GATES[tag].entered.set()
        await GATES[tag].open.wait()
    out = [list(await ctx.llm_batch([_prompt(tag, r, i) for i in range(width)]))
           for r in range(rounds)]
    if fail:
        raise RuntimeError(f"{tag} fails on purpose")
    return {"tag": tag, "rounds": out}


@pytest.fixture
async def cluster(redis_url: str) -> AsyncIterator[InProcessCluster]:
    settings = Settings(url=redis_url, namespace=f"t{secrets.token_hex(4)}",
                        wait_slice_s=0.05, lock_wait_s=2.0, wait_timeout_s=10.0,
                        retention_s=RETENTION_S, lease_ms=LEASE_MS)
    cl = InProcessCluster.real(redis_url, settings)
    try:
        yield cl
    finally:
        await cl.aclose()


def _shared(keys: Keys) -> dict[str, bool]:
    """The namespace's own keys -> whether they expire (the rest are sessions' keys)."""
    return {keys.registry: False, keys.deadlines: False, keys.jobs: False,
            keys.dead_letters: False, keys.strategies: False, keys.workers: False,
            keys.registry_fence: False, keys.registry_lock: True, keys.shard_table: False,
            keys.running: False, keys.catalog: False,
            **{keys.done(phase): False for phase in ("completed", "failed", "cancelled")}}


async def _ttls(reg: SessionRegistry) -> dict[str, int]:
    """Every key of the namespace that is not one of its own shared keys -> its PTTL (ms);
    worker heartbeat keys must expire and are left out."""
    keys = reg.keys
    shared = _shared(keys)
    out: dict[str, int] = {}
    async for raw in reg.client.scan_iter(match=f"{keys.namespace}:*", count=1000):
        key = raw.decode()
        pttl = int(await reg.client.pttl(key))
        if key in shared or key.startswith(f"{keys.namespace}:worker:"):
            if shared.get(key, True):
                assert pttl > 0, f"{key} must expire (pttl {pttl})"
            continue
        out[key] = pttl
    return out


async def _partly_answered_second_round(reg: SessionRegistry, tag: str) -> str:
    """A session in its second round with one of two answers in: both its feed-token keys
    (``:fed`` this round, ``:fed:prev`` the round before) exist."""
    sid, event = await reg.start_execution("texp-rounds", {"tag": tag})
    assert isinstance(event, Paused)
    for q in event.queries:
        event = await reg.feed_response(sid, q.id, answer_for(q.prompt))
    assert isinstance(event, Paused), event
    accepted = await reg.feed_response(sid, "q-0", answer_for(_prompt(tag, 1, 0)))
    assert accepted == Accepted(1), accepted
    sk = reg.keys.session(sid)
    assert await reg.client.exists(sk.fed, sk.fed_prev) == 2
    return sid


async def _feed_tokens_expire_within_retention(reg: SessionRegistry, sid: str) -> None:
    """Read at once after the session ended, while both keys surely still exist."""
    sk = reg.keys.session(sid)
    for key in (sk.fed, sk.fed_prev):
        pttl = await reg.client.pttl(key)
        assert 0 < pttl <= RETENTION_MS, f"{key}: pttl {pttl} ms, retention {RETENTION_MS} ms"


async def _finish(reg: SessionRegistry, sid: str) -> Finished:
    event = await reg.wait_event(sid)
    while isinstance(event, Paused):
        for q in event.queries:
            event = await reg.feed_response(sid, q.id, answer_for(q.prompt))
    assert isinstance(event, Finished), event
    return event


async def test_ended_sessions_keys_expire_within_retention_and_then_are_gone(
    cluster: InProcessCluster, gates: dict[str, Gate]
) -> None:
    host = cluster.registry()
    await cluster.worker()
    sessions: dict[str, str] = {}  # sid -> how it ended

    completed = await host.submit("texp-rounds", {"tag": "done"})
    failed = await host.submit("texp-rounds", {"tag": "fail", "fail": True})
    cancelled = await _partly_answered_second_round(host, "cancel")
    expired = await _partly_answered_second_round(host, "expire")
    GATES["mid-step"] = gate = Gate()
    cancelled_mid_step = await host.submit("texp-rounds", {"tag": "mid-step"})
    await asyncio.wait_for(gate.entered.wait(), 10)

    # While they live, every session key carries an expiry (the backstop), well beyond
    # retention: GC, not Redis, ends a live session.
    live = await _ttls(host)
    assert live and all(pttl > 0 for pttl in live.values()), live

    for sid in (completed, failed):
        sessions[sid] = (await _finish(host, sid)).state.value
    assert (await host.cancel(cancelled)).state is Phase.CANCELLED
    await _feed_tokens_expire_within_retention(host, cancelled)
    sessions[cancelled] = "cancelled"
    assert (await host.cancel(cancelled_mid_step)).state is Phase.CANCELLED
    sessions[cancelled_mid_step] = "cancelled mid-step"
    gate.open.set()  # its step's commit is refused: the session has ended
    far = int((await host.client.time())[0]) * 1000 + FAR_MS
    assert await host.gc_sweep(now_ms=far) == [expired]
    await _feed_tokens_expire_within_retention(host, expired)
    sessions[expired] = "expired"
    assert sessions[completed] == "completed" and sessions[failed] == "failed"

    async def step_unwound() -> bool:
        return bool(await host.client.exists(host.keys.session(cancelled_mid_step).lock) == 0)

    await assert_eventually(step_unwound, timeout=10, message="lock A of the cancelled step")

    ended = await _ttls(host)
    too_long = {k: v for k, v in ended.items() if not 0 < v <= RETENTION_MS}
    assert too_long == {}, (
        f"session keys that outlive the retention period ({RETENTION_MS} ms) or never expire: "
        f"{too_long}; sessions: {sessions}")
    assert await host.client.zcard(host.keys.deadlines) == 0
    assert await host.client.zcard(host.keys.registry) == 0
    assert await host.client.xlen(host.keys.jobs) == 0

    async def only_shared_keys_left() -> bool:
        return await _ttls(host) == {}

    await assert_eventually(only_shared_keys_left, timeout=RETENTION_S + 10, interval=0.1,
                            message="session keys left after the retention period")
