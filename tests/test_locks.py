"""Lock C (registry) and lock A (session): order guard, fencing tokens, bounded waits woken by
release, lease lapse, renewal, and the fence check that rejects a stale holder's commit."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from coordinator import LockOrderError, LockTimeout, NotFound, SessionRegistry
from coordinator.errors import LockLost
from coordinator.locks import FencedLock, held_locks
from coordinator.models import Paused
from coordinator.scripts import Reply
from tests.conftest import FakeCluster
from tests.helpers import assert_eventually, shard_keys
from workers.runtime import Crash, Done
from workers.worker import Worker

#: The core specification: every test below runs on fakeredis and on a real redis-server.
ON_BOTH_SERVERS = True
#: ... and on a namespace of 4 shards (coordinator.shards), on fakeredis.
SHARDED_TOO = True
#: ... and on a real Redis Cluster (3 primaries, 12 shards).
ON_CLUSTER_TOO = True

# The sessions here never run (no worker in these tests), so any name will do.
STRATEGY = "tlock-never-run"


async def ready_registry(fake_cluster: FakeCluster) -> SessionRegistry:
    """A registry whose shard table is read (as every call of its API reads it first), so
    its locks are named in the namespace's layout: ``locks.registry()`` is the first
    shard's lock C."""
    registry = fake_cluster.registry()
    await registry.services.ready()
    return registry


@pytest.fixture
async def reg(fake_cluster: FakeCluster) -> SessionRegistry:
    return await ready_registry(fake_cluster)


@pytest.fixture
async def sid(reg: SessionRegistry) -> str:
    """A live session (running: its start job waits for a worker) to take lock A on."""
    return await reg.submit(STRATEGY, {})


async def key_exists(reg: SessionRegistry, key: str) -> bool:
    return bool(await reg.client.exists(key))


async def someone_waits_on(reg: SessionRegistry, lock: FencedLock) -> None:
    """Poll until a waiter is subscribed to ``lock``'s released channel (so it is blocked)."""
    channel = reg.keys.lock_released(str(lock.name))

    async def subscribed() -> bool:  # asked of the node owning the channel's slot
        _, n = await reg.redis.execute("PUBSUB", "SHARDNUMSUB", channel)
        return int(n) >= 1

    await assert_eventually(subscribed, timeout=5, message=f"no waiter on {channel}")


# -- order guard ------------------------------------------------------------------------------


async def test_c_while_holding_a_is_a_lock_order_error(reg: SessionRegistry, sid: str) -> None:
    lock_a = reg.locks.session(sid)
    await lock_a.acquire()
    assert held_locks() == ("A",)
    lock_c = reg.locks.registry()
    with pytest.raises(LockOrderError) as info:
        await lock_c.acquire()
    assert info.value.code == "lock_order"
    with pytest.raises(LockOrderError):
        await lock_c.acquire(blocking=False)
    with pytest.raises(LockOrderError):  # adopting a script's acquisition is guarded too
        lock_c.took([1, 0], "token")
    assert not await key_exists(reg, (await shard_keys(reg)).registry_lock)  # refused at once
    assert lock_c.fence is None
    await lock_a.release()
    assert held_locks() == ()
    await lock_c.acquire()  # fine once A is released
    await lock_c.release()


async def test_c_then_a_is_allowed(reg: SessionRegistry, sid: str) -> None:
    shard = await shard_keys(reg, sid)
    lock_c = reg.locks.registry(shard)
    lock_a = reg.locks.session(sid)
    await lock_c.acquire()
    await lock_a.acquire()
    assert held_locks() == ("C", "A")
    assert lock_c.fence and lock_a.fence
    assert await key_exists(reg, shard.registry_lock)
    assert await key_exists(reg, reg.keys.session(sid).lock)
    await lock_a.release()
    await lock_c.release()
    assert held_locks() == ()
    assert not await key_exists(reg, shard.registry_lock)
    assert not await key_exists(reg, reg.keys.session(sid).lock)


async def test_the_order_guard_is_per_task(reg: SessionRegistry, sid: str) -> None:
    go = asyncio.Event()

    async def other_task() -> int:
        await go.wait()
        lock_c = reg.locks.registry()
        await lock_c.acquire()
        await lock_c.release()
        assert lock_c.fence is not None
        return lock_c.fence

    task = asyncio.create_task(other_task())  # its context was copied before A was taken
    lock_a = reg.locks.session(sid)
    await lock_a.acquire()
    go.set()
    assert await asyncio.wait_for(task, 5) >= 1  # another task holding no A may take C
    await lock_a.release()


async def test_async_with_takes_and_releases(reg: SessionRegistry, sid: str) -> None:
    lock_a = reg.locks.session(sid)
    async with lock_a:
        assert held_locks() == ("A",)
        assert await key_exists(reg, str(lock_a.name))
    assert held_locks() == ()
    assert not await key_exists(reg, str(lock_a.name))


async def test_lock_a_of_a_missing_session_is_not_found(reg: SessionRegistry) -> None:
    with pytest.raises(NotFound):
        await reg.locks.session("s-0-missing").acquire()
    assert held_locks() == ()
    assert not await key_exists(reg, reg.keys.session("s-0-missing").lock)


# -- fencing tokens ---------------------------------------------------------------------------


async def test_session_fences_increase_on_each_acquisition(reg: SessionRegistry,
                                                           sid: str) -> None:
    fences = []
    for _ in range(4):
        lock_a = reg.locks.session(sid)
        await lock_a.acquire()
        assert lock_a.fence is not None
        fences.append(lock_a.fence)
        stored = await reg.client.hget(reg.keys.session(sid).session, "fence")
        assert int(stored) == lock_a.fence  # the token lives in the session hash
        await lock_a.release()
    assert fences == sorted(set(fences))
    tries = await reg.client.hget(reg.keys.session(sid).session, "tries")
    assert int(tries) == 4  # each acquisition is a try at the step (a commit resets them)


async def test_registry_fences_increase_on_each_acquisition(reg: SessionRegistry) -> None:
    fences = []
    for _ in range(3):
        lock_c = reg.locks.registry()
        await lock_c.acquire()
        assert lock_c.fence is not None
        fences.append(lock_c.fence)
        await lock_c.release()
    assert fences == sorted(set(fences))
    assert int(await reg.client.get((await shard_keys(reg)).registry_fence)) == fences[-1]


async def test_fences_survive_across_registries(fake_cluster: FakeCluster, reg: SessionRegistry,
                                                sid: str) -> None:
    other = await ready_registry(fake_cluster)
    first = reg.locks.session(sid)
    await first.acquire()
    await first.release()
    second = other.locks.session(sid)
    await second.acquire()
    await second.release()
    assert first.fence is not None and second.fence is not None
    assert second.fence > first.fence


async def test_fences_never_repeat_after_a_rollback(reg: SessionRegistry, sid: str) -> None:
    """A failover that loses writes rolls a fence counter back with them; a counter would
    then hand out the lost tokens a second time (seen: 101 issued twice). Fences follow the
    server's clock, so the next one is above every one issued before the rollback."""
    sk = reg.keys.session(sid)
    issued: list[int] = []
    for lock in (reg.locks.session(sid), reg.locks.registry()):
        fence_key = sk.session if lock.name == sk.lock else (await shard_keys(reg)).registry_fence
        before = await (reg.client.hget(fence_key, "fence") if fence_key == sk.session
                        else reg.client.get(fence_key))
        for _ in range(3):
            await lock.acquire()
            assert lock.fence is not None
            issued.append(lock.fence)
            await lock.release()
        # the writes since ``before`` are lost
        if fence_key == sk.session:
            await reg.client.hset(fence_key, "fence", before or 0)
        elif before is None:
            await reg.client.delete(fence_key)
        else:
            await reg.client.set(fence_key, before)
        await lock.acquire()
        assert lock.fence is not None and lock.fence > max(issued), (lock.fence, issued)
        issued.append(lock.fence)
        await lock.release()
    assert len(set(issued)) == len(issued)


async def test_a_fence_ahead_of_the_clock_still_grows(reg: SessionRegistry, sid: str) -> None:
    """A fence above the server's clock (a primary whose clock ran ahead) is not reused:
    the next one is that fence + 1."""
    sk = reg.keys.session(sid)
    ahead = 2**53 - 10
    await reg.client.hset(sk.session, "fence", ahead)
    lock_a = reg.locks.session(sid)
    await lock_a.acquire()
    assert lock_a.fence == ahead + 1
    await lock_a.release()


# -- waiting ----------------------------------------------------------------------------------


async def test_a_waiter_gets_the_lock_when_the_holder_releases(
    fake_cluster: FakeCluster, reg: SessionRegistry, sid: str
) -> None:
    holder = reg.locks.session(sid)  # 10 s lease: only a release can let the waiter in soon
    await holder.acquire()
    waiter_lock = (await ready_registry(fake_cluster)).locks.session(sid, wait_s=5.0)
    waiter = asyncio.create_task(waiter_lock.acquire())
    await someone_waits_on(reg, waiter_lock)
    assert not waiter.done()
    t0 = time.monotonic()
    await holder.release()
    assert await asyncio.wait_for(waiter, 5) is True
    assert time.monotonic() - t0 < 2.0  # woken by the release, not by the lease running out
    assert holder.fence is not None and waiter_lock.fence is not None
    assert waiter_lock.fence > holder.fence
    assert await reg.client.get(str(waiter_lock.name)) == waiter_lock.local.token
    await waiter_lock.release()


async def test_a_registry_lock_waiter_is_woken_by_release(
    fake_cluster: FakeCluster, reg: SessionRegistry
) -> None:
    holder = reg.locks.registry()
    await holder.acquire()
    waiter_lock = (await ready_registry(fake_cluster)).locks.registry(wait_s=5.0)
    waiter = asyncio.create_task(waiter_lock.acquire())
    await someone_waits_on(reg, waiter_lock)
    assert not waiter.done()
    await holder.release()
    await asyncio.wait_for(waiter, 5)
    assert holder.fence is not None and waiter_lock.fence is not None
    assert waiter_lock.fence > holder.fence
    await waiter_lock.release()


async def test_lock_timeout_when_held_past_the_wait(reg: SessionRegistry, sid: str) -> None:
    holder = reg.locks.session(sid)
    await holder.acquire()
    other = reg.locks.session(sid, wait_s=0.2)
    t0 = time.monotonic()
    with pytest.raises(LockTimeout) as info:
        await other.acquire()
    elapsed = time.monotonic() - t0
    assert 0.2 <= elapsed < 2.0
    assert info.value.session_id == sid
    with pytest.raises(LockTimeout):
        await reg.locks.session(sid).acquire(blocking=False)
    with pytest.raises(LockTimeout):
        await reg.locks.session(sid).acquire(blocking_timeout=0.01)
    assert held_locks() == ("A",)  # failed attempts hold nothing
    assert await reg.client.get(str(holder.name)) == holder.local.token  # still the holder's
    await holder.release()


async def test_a_lapsed_lease_lets_a_waiter_in_without_release(reg: SessionRegistry,
                                                               sid: str) -> None:
    stalled = reg.locks.session(sid, lease_ms=150)
    await stalled.acquire()
    t0 = time.monotonic()
    taker = reg.locks.session(sid, wait_s=3.0)
    await taker.acquire()  # sleeps until the lease would expire, then takes it
    assert time.monotonic() - t0 < 2.0
    assert stalled.fence is not None and taker.fence is not None
    assert taker.fence > stalled.fence
    with pytest.raises(LockLost):
        await stalled.release()
    await taker.release()
    assert held_locks() == ()


async def test_release_after_the_lease_lapsed(reg: SessionRegistry, sid: str) -> None:
    lock_a = reg.locks.session(sid, lease_ms=30)
    await lock_a.acquire()
    await assert_eventually(lambda: _gone(reg, str(lock_a.name)), timeout=5)
    with pytest.raises(LockLost):
        await lock_a.release()
    assert held_locks() == ()  # the guard forgot the lost lock: C may be taken now
    lock_c = reg.locks.registry()
    await lock_c.acquire()
    await lock_c.release()


async def _gone(reg: SessionRegistry, key: str) -> bool:
    return not await key_exists(reg, key)


async def test_kept_alive_renews_the_lease(reg: SessionRegistry, sid: str) -> None:
    lock_a = reg.locks.session(sid, lease_ms=150)
    await lock_a.acquire()
    t0 = time.monotonic()

    async def held_for_three_leases() -> bool:
        assert await key_exists(reg, str(lock_a.name)), "lease lapsed while kept alive"
        return time.monotonic() - t0 > 0.45

    async with lock_a.kept_alive():
        await assert_eventually(held_for_three_leases, timeout=5, interval=0.02)
    await lock_a.release()


# -- stale fences are rejected by the commit --------------------------------------------------


async def commit_fail(reg: SessionRegistry, sid: str, lock: FencedLock, *, asked: int,
                      error: str) -> Any:
    """``commit_step.lua`` with a 'fail' outcome, as ``Worker._commit`` makes it."""
    assert lock.fence is not None and lock.local.token is not None
    return await reg.scripts.commit_step(
        sid, fence=lock.fence, asked=asked, token=lock.local.token, holder="w-test",
        holder_channel=reg.keys.worker_nudge("w-test"), backstop_ms=reg.settings.backstop_ms,
        retention_ms=reg.settings.retention_ms, journal_entry=b"", progress=b"", llm_calls=0,
        prompt_chars=0, prompt_tokens=0, outcome="fail", event=b"fail", rest=[0, error])


async def lapse_and_retake(reg: SessionRegistry, sid: str) -> tuple[FencedLock, FencedLock]:
    """A worker whose lease ran out while it was stalled, and the holder that came next."""
    stale = reg.locks.session(sid, lease_ms=30)
    await stale.acquire()
    await assert_eventually(lambda: _gone(reg, str(stale.name)), timeout=5)
    fresh = reg.locks.session(sid)
    await fresh.acquire()
    assert stale.fence is not None and fresh.fence is not None
    assert fresh.fence > stale.fence
    return stale, fresh


async def test_commit_with_a_stale_fence_is_fenced(reg: SessionRegistry, sid: str) -> None:
    stale, fresh = await lapse_and_retake(reg, sid)
    reply = await commit_fail(reg, sid, stale, asked=0, error="stale write")
    assert reply == Reply("FENCED", (str(fresh.fence).encode(),))
    status = await reg.status(sid)
    assert status["phase"] == "running" and "error" not in status  # nothing was written
    assert await reg.client.get(str(fresh.name)) == fresh.local.token  # fresh still holds A

    reply = await commit_fail(reg, sid, fresh, asked=0, error="fresh write")
    assert reply.code == "OK"
    status = await reg.status(sid)
    assert (status["phase"], status["error"]) == ("failed", "fresh write")
    assert not await key_exists(reg, str(fresh.name))  # the commit released lock A
    fresh.mark_released()


async def test_commit_from_a_stale_round_is_stale(reg: SessionRegistry, sid: str) -> None:
    lock_a = reg.locks.session(sid)
    await lock_a.acquire()
    reply = await commit_fail(reg, sid, lock_a, asked=3, error="old round")
    assert reply == Reply("STALE", (0,))
    assert (await reg.status(sid))["phase"] == "running"
    await lock_a.release()


async def test_worker_commit_with_a_lapsed_lease_is_dropped(
    fake_cluster: FakeCluster, reg: SessionRegistry, sid: str
) -> None:
    stale, fresh = await lapse_and_retake(reg, sid)
    worker = Worker(fake_cluster.transport(), fake_cluster.settings)  # never started
    await worker.services.ready()  # (its start would read the shard table first)
    try:
        applied = await worker._commit(sid, stale, asked_from=0, outcome=Done({"x": 1}),
                                       journal_entry=b"", ex=None)
        assert applied is False
        assert worker.stats.fenced_rejections == 1
        status = await reg.status(sid)
        assert status["phase"] == "running" and status.get("result") is None

        applied = await worker._commit(sid, fresh, asked_from=0, outcome=Crash("taken over"),
                                       journal_entry=b"", ex=None)
        assert applied is True
        assert worker.stats.fenced_rejections == 1
        status = await reg.status(sid)
        assert (status["phase"], status["error"]) == ("failed", "taken over")
    finally:
        await worker.mux.aclose()


# -- the sweeper and the locks ----------------------------------------------------------------


def far_future_ms() -> int:
    return time.time_ns() // 1_000_000 + 10 * 3600 * 1000


async def idle_session(fake_cluster: FakeCluster, reg: SessionRegistry) -> str:
    """A paused session nobody answers (GC reaps only those: a running one is owed a step,
    not idle); its worker is stopped again, so only the test acts on it."""
    worker = await fake_cluster.worker()
    sid, event = await reg.start_execution("cot", {"task": "idle"})
    assert isinstance(event, Paused), event
    await fake_cluster.stop_worker(worker)
    return sid


async def test_gc_sweep_skips_while_another_process_holds_c(
    fake_cluster: FakeCluster, reg: SessionRegistry
) -> None:
    sid = await idle_session(fake_cluster, reg)
    other = await ready_registry(fake_cluster)
    lock_c = other.locks.registry(await shard_keys(reg, sid))  # the session's shard's C
    await lock_c.acquire()
    assert await reg.gc_sweep(now_ms=far_future_ms()) == []  # returns at once, reaps nothing
    assert (await reg.status(sid))["phase"] == "paused"
    await lock_c.release()
    assert await reg.gc_sweep(now_ms=far_future_ms()) == [sid]


async def test_gc_sweep_leaves_a_session_mid_step(fake_cluster: FakeCluster,
                                                  reg: SessionRegistry) -> None:
    sid = await idle_session(fake_cluster, reg)
    sweeper = fake_cluster.registry(lock_wait_s=0.1)
    lock_a = (await ready_registry(fake_cluster)).locks.session(sid)
    # taken in another task, as a worker's step would hold it (not this sweeping task)
    await asyncio.create_task(lock_a.acquire())
    assert await sweeper.gc_sweep(now_ms=far_future_ms()) == []
    assert (await reg.status(sid))["phase"] == "paused"
    await lock_a.release()
    assert await sweeper.gc_sweep(now_ms=far_future_ms()) == [sid]
    status = await reg.status(sid)
    assert status["phase"] == "failed" and "expired" in status["error"]
