"""``ctx.state`` (``workers/kv.py``): a key-value store that outlives sessions. Its ops are
atomic between concurrent sessions, apply exactly once across replays on other workers
(an op recorded in the session is not applied again; one applied but not yet recorded is
found by its marker), and a replay sees what the first run saw, reads included.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from coordinator import Finished, InvalidInput, Paused, Phase, SessionRegistry
from coordinator.keys import Keys
from coordinator.services import Services
from tests.conftest import FakeCluster
from workers import strategy
from workers.context import Context
from workers.effects import Durable
from workers.kv import State, StateKeys

ON_BOTH_SERVERS = True
#: ... and on a namespace of 4 shards, and on a real Redis Cluster, where each state key is
#: in a slot of its own and the index in another.
SHARDED_TOO = True
ON_CLUSTER_TOO = True

#: What ``tst-flip`` does on its first op: flipped by a test to make a replay differ.
FLIP = {"op": "get"}


@strategy("tst-basics")
async def tst_basics(ctx: Context, p: str) -> dict[str, Any]:
    s = ctx.state
    out: dict[str, Any] = {"missing": await s.get(f"{p}/a", "dflt")}
    await s.set(f"{p}/a", {"x": [1, 2.5, None, "é"]})
    await s.set(f"{p}/none", None)
    out["a"] = await s.get(f"{p}/a")
    out["none"] = await s.get(f"{p}/none", "dflt")  # a stored None is a value
    out["nx_new"] = await s.set_nx(f"{p}/b", "first")
    out["nx_taken"] = await s.set_nx(f"{p}/b", "second")
    out["b"] = await s.get(f"{p}/b")
    out["incr"] = [await s.incr(f"{p}/n"), await s.incr(f"{p}/n", 41),
                   await s.incr(f"{p}/n", -50)]
    out["big"] = await s.incr(f"{p}/big", 2**63 - 1)
    try:
        await s.incr(f"{p}/big")
    except InvalidInput as exc:
        out["overflow"] = str(exc)
    try:
        await s.incr(f"{p}/b")
    except InvalidInput as exc:
        out["not_int"] = str(exc)
    out["keys"] = await s.keys(f"{p}/")
    out["del"] = [await s.delete(f"{p}/b"), await s.delete(f"{p}/b")]
    out["keys_after"] = await s.keys(f"{p}/")
    return out


@strategy("tst-count")
async def tst_count(ctx: Context, key: str) -> int:
    return int(await ctx.state.incr(key))


@strategy("tst-replay")
async def tst_replay(ctx: Context, key: str) -> dict[str, Any]:
    seen = await ctx.state.incr(key)
    read = await ctx.state.get(f"{key}-note", "unset")
    answer = await ctx.llm(f"count {seen}, note {read}")
    return {"seen": seen, "read": read, "answer": answer, "after": await ctx.state.get(key)}


@strategy("tst-flip")
async def tst_flip(ctx: Context, key: str) -> str:
    if FLIP["op"] == "get":
        await ctx.state.get(key)
    else:
        await ctx.state.incr(key)
    return await ctx.llm("go on?")


async def _state(fake_cluster: FakeCluster, sid: str) -> State:
    services = Services(fake_cluster.transport(), fake_cluster.settings, process_id="t-st")
    await services.ready()
    return Durable(services).for_session(sid).state


def _keys(fake_cluster: FakeCluster) -> StateKeys:
    return StateKeys(fake_cluster.settings.namespace)


async def test_get_set_set_nx_incr_delete_keys(registry: SessionRegistry,
                                               worker: Any) -> None:
    _, done = await registry.start_execution("tst-basics", {"p": "basics"})
    assert isinstance(done, Finished) and done.state is Phase.COMPLETED, done
    r = done.result
    assert r["missing"] == "dflt"
    assert r["a"] == {"x": [1, 2.5, None, "é"]}
    assert r["none"] is None
    assert (r["nx_new"], r["nx_taken"], r["b"]) == (True, False, "first")
    assert r["incr"] == [1, 42, -8]
    assert r["big"] == 2**63 - 1 and "64-bit" in r["overflow"]
    assert "not an integer" in r["not_int"]
    assert r["keys"] == ["basics/a", "basics/b", "basics/big", "basics/n", "basics/none"]
    assert r["del"] == [True, False]
    assert r["keys_after"] == ["basics/a", "basics/big", "basics/n", "basics/none"]


async def test_state_outlives_the_session(fake_cluster: FakeCluster,
                                          registry: SessionRegistry, worker: Any) -> None:
    for expected in (1, 2, 3):
        _, done = await registry.start_execution("tst-count", {"key": "visits"})
        assert isinstance(done, Finished) and done.result == expected, done
    assert await fake_cluster.client().get(_keys(fake_cluster).value("visits")) == b"3"


@pytest.mark.parametrize("key", ["", "a b", "{x}", "a#b", "a*", "é", "k" * 201, 5, None])
async def test_bad_keys_are_refused(fake_cluster: FakeCluster, registry: SessionRegistry,
                                    key: Any) -> None:
    state = await _state(fake_cluster, str(await registry.submit("tst-count", {"key": "k"})))
    for call in (state.get(key), state.set(key, 1), state.set_nx(key, 1), state.incr(key),
                 state.delete(key)):
        with pytest.raises(InvalidInput, match=r"ctx\.state key"):
            await call
    if key != "":  # "" is the whole store's prefix
        with pytest.raises(InvalidInput, match="prefix"):
            await state.keys(key)


@pytest.mark.parametrize("value", [object(), {1: "x"}, float("nan"), {"s": {1, 2}}, 2**64,
                                   "\ud800", "x" * (2**20 + 1)])
async def test_bad_values_are_refused_and_nothing_is_written(
        fake_cluster: FakeCluster, registry: SessionRegistry, value: Any) -> None:
    state = await _state(fake_cluster, str(await registry.submit("tst-count", {"key": "k"})))
    for call in (state.set("v", value), state.set_nx("v", value)):
        with pytest.raises(InvalidInput):
            await call
    assert await state.get("v", "absent") == "absent"


@pytest.mark.parametrize("by", [True, 1.5, "1", 2**63])
async def test_incr_takes_only_a_64_bit_integer(fake_cluster: FakeCluster,
                                                registry: SessionRegistry, by: Any) -> None:
    state = await _state(fake_cluster, str(await registry.submit("tst-count", {"key": "k"})))
    with pytest.raises(InvalidInput, match="64-bit"):
        await state.incr("n", by)


async def test_fifty_concurrent_sessions_increment_one_counter_exactly_fifty_times(
        fake_cluster: FakeCluster, registry: SessionRegistry) -> None:
    for _ in range(2):
        await fake_cluster.worker(concurrency=16)
    runs = await asyncio.gather(*(registry.start_execution("tst-count", {"key": "hits"})
                                  for _ in range(50)))
    seen = [done.result for _, done in runs if isinstance(done, Finished)]
    assert sorted(seen) == list(range(1, 51))  # each saw its own increment, none lost
    assert await fake_cluster.client().get(_keys(fake_cluster).value("hits")) == b"50"


async def test_incr_replayed_on_another_worker_is_applied_once_and_seen_the_same(
        fake_cluster: FakeCluster, registry: SessionRegistry) -> None:
    w1 = await fake_cluster.worker()
    sid, event = await registry.start_execution("tst-replay", {"key": "ctr"})
    assert isinstance(event, Paused) and event.queries[0].prompt == "count 1, note unset"
    # Meanwhile another session counts, and the note is written: the replay must still see
    # what the first run saw (or it would ask another question: non-determinism).
    _, other = await registry.start_execution("tst-count", {"key": "ctr"})
    assert isinstance(other, Finished) and other.result == 2
    client = fake_cluster.client()
    await client.set(_keys(fake_cluster).value("ctr-note"), b"\xa3new")
    # The ops' markers gone too (as after the retention): the session's record is enough.
    assert await client.delete(_keys(fake_cluster).marker("ctr", f"{sid}:1")) == 1
    assert await client.delete(_keys(fake_cluster).marker("ctr-note", f"{sid}:2")) == 1
    await fake_cluster.stop_worker(w1)
    w2 = await fake_cluster.worker()
    done = await registry.feed_response(sid, "q-0", "fine")
    assert isinstance(done, Finished) and done.state is Phase.COMPLETED, done
    assert done.result == {"seen": 1, "read": "unset", "answer": "fine", "after": 2}
    assert w2.stats.replays == 1
    assert await client.get(_keys(fake_cluster).value("ctr")) == b"2"


async def test_an_op_applied_but_not_recorded_is_not_applied_again(
        fake_cluster: FakeCluster, registry: SessionRegistry) -> None:
    """The window between ``state_op.lua`` and the record in the session: a worker dies
    there (here: the record is removed), and the replay finds the op's marker instead."""
    w1 = await fake_cluster.worker()
    sid, event = await registry.start_execution("tst-replay", {"key": "ctr"})
    assert isinstance(event, Paused) and event.queries[0].prompt == "count 1, note unset"
    client = fake_cluster.client()
    session = Keys(fake_cluster.settings.namespace).session(sid).session
    assert await client.hdel(session, "st:1", "st:2") == 2
    await fake_cluster.stop_worker(w1)
    w2 = await fake_cluster.worker()
    done = await registry.feed_response(sid, "q-0", "ok")
    assert isinstance(done, Finished) and done.state is Phase.COMPLETED, done
    assert done.result == {"seen": 1, "read": "unset", "answer": "ok", "after": 1}
    assert w2.stats.replays == 1
    assert await client.get(_keys(fake_cluster).value("ctr")) == b"1"
    assert await client.hget(session, "st:1") is not None  # recorded again, from the marker


async def test_a_replay_making_other_state_calls_fails_as_non_deterministic(
        fake_cluster: FakeCluster, registry: SessionRegistry) -> None:
    FLIP["op"] = "get"
    w1 = await fake_cluster.worker()
    sid, event = await registry.start_execution("tst-flip", {"key": "flip"})
    assert isinstance(event, Paused)
    await fake_cluster.stop_worker(w1)
    FLIP["op"] = "incr"
    try:
        await fake_cluster.worker()
        done = await registry.feed_response(sid, "q-0", "yes")
    finally:
        FLIP["op"] = "get"
    assert isinstance(done, Finished) and done.state is Phase.FAILED, done
    assert "non-determinism" in (done.error or "")
    assert await fake_cluster.client().get(_keys(fake_cluster).value("flip")) is None


async def test_keys_lists_only_keys_that_exist(fake_cluster: FakeCluster,
                                               registry: SessionRegistry) -> None:
    state = await _state(fake_cluster, str(await registry.submit("tst-count", {"key": "k"})))
    await state.set("idx/a", 1)
    await state.set("idx/b", "x")
    assert await state.set_nx("idx/b", "y") is False
    client = fake_cluster.client()
    await client.delete(_keys(fake_cluster).value("idx/b"))  # gone behind the index's back
    assert await state.keys("idx/") == ["idx/a"]
    assert await client.smembers(_keys(fake_cluster).index) == {b"idx/a"}  # forgotten
    await state.delete("idx/a")
    assert await state.keys("idx/") == []
    assert await state.keys() == []


async def test_the_scripts_refuse_bad_arguments_before_writing(
        fake_cluster: FakeCluster, registry: SessionRegistry) -> None:
    services = Services(fake_cluster.transport(), fake_cluster.settings, process_id="t-sc")
    keys = _keys(fake_cluster)
    for op, arg, retention in (("pop", b"", 1000), ("incr", b"1.5", 1000),
                               ("set", b"", 1000), ("get", b"", 0)):
        with pytest.raises(InvalidInput, match=r"refused by state_op\.lua"):
            await services.scripts.state_op(keys.value("k"), keys.marker("k", "s:1"), op=op,
                                            arg=arg, retention_ms=retention)
    sid = str(await registry.submit("tst-count", {"key": "k"}))
    for field, value in (("phase", b"x"), ("fx:", b"x"), ("st:1", b"")):
        with pytest.raises(InvalidInput, match="refused by the script"):
            await services.scripts.effect(sid, field, value)
    client = fake_cluster.client()
    assert await client.get(keys.value("k")) is None
    assert await client.hget(Keys(fake_cluster.settings.namespace).session(sid).session,
                             "phase") == b"running"
