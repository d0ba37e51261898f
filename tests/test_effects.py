"""Durable side effects (``ctx.side_effect``, ``workers/effects.py``): an effect runs once per
(session, name, occurrence) and its recorded result is what every later run gets, a replay
on another worker included; two recorders racing keep the first one's value.

Effects count their calls in ``CALLS`` (module level: the replaying worker is another object
in this process) or, across processes, in a file. Replays are forced by stopping the worker
that ran the session's first step and finishing the session on a new one.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from coordinator import Finished, InvalidInput, InvalidTransition, Paused, Phase, SessionRegistry
from coordinator.keys import Keys
from coordinator.services import Services
from tests.conftest import FakeCluster
from tests.procs import FAST_SETTINGS, WorkerPool, sync_client
from workers import strategy
from workers.context import Context
from workers.effects import Durable, Effects

ON_BOTH_SERVERS = True
#: ... and on a namespace of 4 shards, and on a real Redis Cluster (the effect's record
#: lives in the session's slot).
SHARDED_TOO = True
ON_CLUSTER_TOO = True

#: How many times each effect really ran, by tag (each test uses a tag of its own).
CALLS: dict[str, int] = {}


def counted(tag: str) -> Callable[[], str]:
    def run() -> str:
        CALLS[tag] = CALLS.get(tag, 0) + 1
        return f"{tag}-tx-{CALLS[tag]}"
    return run


def counted_async(tag: str) -> Callable[[], Any]:
    async def run() -> str:
        await asyncio.sleep(0)  # a real await: the effect suspends like I/O would
        return counted(tag)()
    return run


@strategy("tfx-charge")
async def tfx_charge(ctx: Context, tag: str) -> dict[str, Any]:
    tx = await ctx.side_effect("charge", counted(tag))
    answer = await ctx.llm(f"receipt for {tx}?")
    return {"tx": tx, "answer": answer}


@strategy("tfx-mail")
async def tfx_mail(ctx: Context, tag: str) -> list[Any]:
    first = await ctx.side_effect("mail", counted(tag))
    second = await ctx.side_effect("mail", counted_async(tag))
    answer = await ctx.llm(f"sent {first} and {second}")
    third = await ctx.side_effect("mail", counted(tag))  # after the pause: occurrence 2
    return [first, second, third, answer]


@strategy("tfx-append")
async def tfx_append(ctx: Context, log: str, key: str) -> dict[str, Any]:
    """The cross-process case: the effect appends a line to a file (the count is read from
    it), and the state counter is bumped; both must show once after a replay."""
    def append() -> int:
        with open(log, "a", encoding="utf-8") as f:
            f.write("ran\n")
        return Path(log).read_text(encoding="utf-8").count("ran")

    nth = await ctx.side_effect("append", append)
    count = await ctx.state.incr(key)
    answer = await ctx.llm(f"ran {nth}, count {count}")
    return {"nth": nth, "count": count, "answer": answer}


def _tag() -> str:
    return secrets.token_hex(4)


async def _replay_elsewhere(fake_cluster: FakeCluster, first: Any) -> Any:
    """Stop ``first`` (its paused executions go with it) and start a fresh worker."""
    await fake_cluster.stop_worker(first)
    return await fake_cluster.worker()


async def _durable(fake_cluster: FakeCluster) -> Durable:
    services = Services(fake_cluster.transport(), fake_cluster.settings, process_id="t-fx")
    await services.ready()
    return Durable(services)


async def test_side_effect_runs_once_across_a_replay_on_another_worker(
        fake_cluster: FakeCluster, registry: SessionRegistry) -> None:
    tag = _tag()
    w1 = await fake_cluster.worker()
    sid, event = await registry.start_execution("tfx-charge", {"tag": tag})
    assert isinstance(event, Paused)
    assert event.queries[0].prompt == f"receipt for {tag}-tx-1?"
    assert CALLS[tag] == 1
    w2 = await _replay_elsewhere(fake_cluster, w1)
    done = await registry.feed_response(sid, "q-0", "paid")
    assert isinstance(done, Finished) and done.state is Phase.COMPLETED, done
    assert done.result == {"tx": f"{tag}-tx-1", "answer": "paid"}
    assert CALLS[tag] == 1  # the replay returned the recorded value
    assert w2.stats.replays == 1
    client = fake_cluster.client()
    assert await client.hget(Keys(fake_cluster.settings.namespace).session(sid).session,
                             "fx:charge#0") is not None


async def test_each_occurrence_of_a_name_runs_once_and_keeps_its_own_value(
        fake_cluster: FakeCluster, registry: SessionRegistry) -> None:
    tag = _tag()
    w1 = await fake_cluster.worker()
    sid, event = await registry.start_execution("tfx-mail", {"tag": tag})
    assert isinstance(event, Paused)
    assert event.queries[0].prompt == f"sent {tag}-tx-1 and {tag}-tx-2"
    await _replay_elsewhere(fake_cluster, w1)
    done = await registry.feed_response(sid, "q-0", "ok")
    assert isinstance(done, Finished) and done.state is Phase.COMPLETED, done
    assert done.result == [f"{tag}-tx-1", f"{tag}-tx-2", f"{tag}-tx-3", "ok"]
    assert CALLS[tag] == 3  # once per occurrence: two before the pause, one after
    client = fake_cluster.client()
    fields = await client.hkeys(Keys(fake_cluster.settings.namespace).session(sid).session)
    assert sorted(f for f in fields if f.startswith(b"fx:")) == \
        [b"fx:mail#0", b"fx:mail#1", b"fx:mail#2"]


async def test_racing_recorders_keep_the_first_recorded_value(
        fake_cluster: FakeCluster, registry: SessionRegistry) -> None:
    """A stale worker and the one that took its session over both run the effect (neither
    had a record when it looked); the first to record wins and both return its value."""
    sid = str(await registry.submit("tfx-charge", {"tag": "race"}))  # no worker: it stays running
    durable = await _durable(fake_cluster)
    stale, fresh = durable.for_session(sid), durable.for_session(sid)
    entered, release = asyncio.Event(), asyncio.Event()

    async def slow() -> str:
        entered.set()
        await release.wait()
        return "stale's"

    late = asyncio.create_task(stale.side_effect("pay", slow))
    await entered.wait()  # the stale worker looked (nothing recorded) and runs its effect
    assert await fresh.side_effect("pay", lambda: "fresh's") == "fresh's"
    release.set()
    assert await late == "fresh's"
    # ... and a third run of the same occurrence returns it without running anything
    assert await durable.for_session(sid).side_effect("pay", _never) == "fresh's"


def _never() -> str:
    raise AssertionError("a recorded effect ran again")


async def test_ended_session_runs_no_new_effect_but_reads_recorded_ones(
        fake_cluster: FakeCluster, registry: SessionRegistry) -> None:
    sid = str(await registry.submit("tfx-charge", {"tag": "ended"}))
    durable = await _durable(fake_cluster)
    assert await durable.for_session(sid).side_effect("a", lambda: [1, (2, 3)]) == [1, [2, 3]]
    await registry.cancel(sid)
    late = durable.for_session(sid)  # a stale execution of the cancelled session
    assert await late.side_effect("a", _never) == [1, [2, 3]]
    with pytest.raises(InvalidTransition, match="cancelled"):
        await late.side_effect("b", _never)


@pytest.mark.parametrize("name", ["", "a b", "{tag}", "x#1", "é", "n" * 201, 7])
async def test_bad_effect_names_are_refused_before_running(
        fake_cluster: FakeCluster, registry: SessionRegistry, name: Any) -> None:
    sid = str(await registry.submit("tfx-charge", {"tag": "names"}))
    effects: Effects = (await _durable(fake_cluster)).for_session(sid)
    with pytest.raises(InvalidInput, match="side_effect name"):
        await effects.side_effect(name, _never)


async def test_a_result_that_cannot_be_recorded_is_refused_and_not_recorded(
        fake_cluster: FakeCluster, registry: SessionRegistry) -> None:
    sid = str(await registry.submit("tfx-charge", {"tag": "results"}))
    effects = (await _durable(fake_cluster)).for_session(sid)
    with pytest.raises(InvalidInput, match="JSON"):
        await effects.side_effect("obj", object)
    with pytest.raises(InvalidInput, match="JSON"):
        await effects.side_effect("nan", lambda: float("nan"))
    with pytest.raises(InvalidInput, match="fn must be a function"):
        await effects.side_effect("value", "not callable")  # type: ignore[arg-type]
    client = fake_cluster.client()
    fields = await client.hkeys(Keys(fake_cluster.settings.namespace).session(sid).session)
    assert not [f for f in fields if f.startswith(b"fx:")]


async def test_effect_and_state_replayed_by_another_worker_process(
        worker_pool: WorkerPool, redis_url: str, namespace: str, tmp_path: Path) -> None:
    """Real processes on a real redis-server: worker 1 runs the effect and the incr, then is
    killed (SIGKILL) while the session waits for its answer; worker 2 replays it: the file
    still has one line, the counter is 1, and the result carries the recorded values."""
    worker_pool.imports = ("tests.test_effects",)
    first = await worker_pool.start()
    log = tmp_path / "effect.log"
    client = sync_client(redis_url)
    async with SessionRegistry.from_url(redis_url, namespace=namespace,
                                        **FAST_SETTINGS) as reg:
        sid, event = await reg.start_execution("tfx-append", {"log": str(log), "key": "runs"})
        assert isinstance(event, Paused), event
        assert event.queries[0].prompt == "ran 1, count 1"
        await first.kill()
        second = await worker_pool.start()
        done = await reg.feed_response(sid, "q-0", "fine")
    assert isinstance(done, Finished) and done.state is Phase.COMPLETED, (done, worker_pool.logs())
    assert done.result == {"nth": 1, "count": 1, "answer": "fine"}
    assert log.read_text(encoding="utf-8") == "ran\n"
    assert client.get(f"{namespace}:state:{{runs}}") == b"1"
    client.close()
    assert "replaying" in second.log_text(), worker_pool.logs()
