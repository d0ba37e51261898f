"""Workers: the live path, the replay path, non-determinism, budgets, failures, step
timeouts, cancellation, eviction, takeover; plus ``Execution`` and ``Context`` directly.

Strategies here are deterministic and their results pure functions of their answers. Slow
steps are ``asyncio.Event`` gates that the test opens; nothing sleeps to synchronise.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Iterator
from typing import Any

import pytest

from coordinator import (
    BudgetExceeded,
    Finished,
    InvalidInput,
    NonDeterminism,
    Paused,
    Phase,
    SessionRegistry,
)
from coordinator.codec import pack
from coordinator.events import parse_handoff
from coordinator.models import LlmQuery
from coordinator.scripts import NAMES, source
from coordinator.transport import Transport
from tests.conftest import FakeCluster
from tests.helpers import assert_eventually, shard_keys
from workers import catalog, strategy
from workers.context import Context
from workers.runtime import Ask, Crash, Done, Execution, JournalRound, digest
from workers.worker import Worker

#: The core specification: every test below runs on fakeredis and on a real redis-server.
ON_BOTH_SERVERS = True
#: ... and on a namespace of 4 shards (coordinator.shards), on fakeredis.
SHARDED_TOO = True
#: ... and on a real Redis Cluster (3 primaries, 12 shards).
ON_CLUSTER_TOO = True

# -- test strategies (names unique to this module) --------------------------------------------


class Gate:
    """``entered`` is set when the strategy reaches the gate; it then waits for ``open``.
    ``cancelled`` records that the strategy coroutine was cancelled while waiting."""

    def __init__(self) -> None:
        self.entered = asyncio.Event()
        self.open = asyncio.Event()
        self.cancelled = False

    async def pass_(self) -> None:
        self.entered.set()
        try:
            await self.open.wait()
        except asyncio.CancelledError:
            self.cancelled = True
            raise


GATES: dict[str, Gate] = {}
#: Tags of strategies cancelled while waiting for an answer.
CANCELLED: set[str] = set()
#: Read by ``twrk-nondet`` to decide what it asks: changing it between workers makes a replay
#: ask something else, as a strategy reading a clock or a random number would.
VERSION = {"v": 0}


@pytest.fixture
def gates() -> Iterator[dict[str, Gate]]:
    GATES.clear()
    CANCELLED.clear()
    VERSION["v"] = 0
    try:
        yield GATES
    finally:
        for gate in GATES.values():  # let nothing wait forever
            gate.open.set()


def new_gate(tag: str) -> Gate:
    GATES[tag] = Gate()
    return GATES[tag]


@strategy("twrk-chain")
async def chain(ctx: Context, k: int = 3, tag: str = "", **_: Any) -> list[str]:
    """``k`` questions in a row; each quotes the previous answer; logs and progress each."""
    answers: list[str] = []
    prev = ""
    for i in range(k):
        ctx.log("info", f"asking {i}")
        ctx.progress(i + 1, k, f"step {i}")
        try:
            prev = await ctx.llm(f"{tag} step {i} after {prev!r}")
        except asyncio.CancelledError:
            CANCELLED.add(tag)
            raise
        answers.append(prev)
    return answers


def chain_prompts(tag: str, answers: list[str]) -> list[str]:
    prev = ""
    out = []
    for i, a in enumerate(answers):
        out.append(f"{tag} step {i} after {prev!r}")
        prev = a
    return out


@strategy("twrk-batch")
async def batch(ctx: Context, n: int = 3, **_: Any) -> list[str]:
    return await ctx.llm_batch([f"item {i}" for i in range(n)])


@strategy("twrk-nondet")
async def nondet(ctx: Context, **_: Any) -> list[str]:
    one = await ctx.llm("one")
    two = await ctx.llm(f"two v{VERSION['v']}")
    three = await ctx.llm("three")
    return [one, two, three]


@strategy("twrk-raise")
async def raises(ctx: Context, **_: Any) -> None:
    answer = await ctx.llm("go?")
    raise ValueError(f"boom: {answer}")


@strategy("twrk-bad-result")
async def bad_result(ctx: Context, **_: Any) -> Any:
    answer = await ctx.llm("go?")
    return {"answer": answer, "tags": {"a", "b"}}


@strategy("twrk-deep-result")
async def deep_result(ctx: Context, depth: int = 5000, **_: Any) -> Any:
    value: Any = await ctx.llm("how deep?")
    for _ in range(depth):
        value = [value]
    return value


@strategy("twrk-gated")
async def gated(ctx: Context, tag: str = "", **_: Any) -> dict[str, str]:
    if not ctx.replaying:
        await GATES[tag].pass_()
    return {"answer": await ctx.llm(f"gated {tag}")}


# -- helpers ----------------------------------------------------------------------------------


async def paused(reg: SessionRegistry, name: str, inp: dict[str, Any] | None = None,
                 **kw: Any) -> tuple[str, Paused]:
    sid, event = await reg.start_execution(name, inp, **kw)
    assert isinstance(event, Paused), event
    return sid, event


async def answer_chain(reg: SessionRegistry, sid: str, answers: list[str]) -> Any:
    event: Any = None
    for a in answers:
        event = await reg.feed_response(sid, "q-0", a)
    return event


# -- live path and replay path ----------------------------------------------------------------


async def test_live_path_keeps_the_execution_in_memory(
    registry: SessionRegistry, worker: Worker, gates: Any
) -> None:
    sid, event = await paused(registry, "twrk-chain", {"k": 3, "tag": "live"})
    assert event.queries[0].prompt == "live step 0 after ''"
    nxt = await registry.feed_response(sid, "q-0", "a")
    assert isinstance(nxt, Paused) and nxt.queries[0].prompt == "live step 1 after 'a'"
    done = await answer_chain(registry, sid, ["b", "c"])
    assert isinstance(done, Finished) and done.result == ["a", "b", "c"]
    assert worker.stats.replays == 0
    assert worker.stats.live_resumes == 3
    assert worker.stats.steps == 4


async def test_live_step_is_handed_over_and_costs_the_worker_one_command(
    registry: SessionRegistry, worker: Worker, gates: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The feed completing a round takes lock A for the live holder and sends the answers
    along: the worker reads nothing and its only command is the commit (fence checked)."""
    sid, _ = await paused(registry, "twrk-chain", {"k": 3, "tag": "one"})
    sk = registry.keys.session(sid)
    fence = int(await registry.client.hget(sk.session, "fence"))
    sent: list[str] = []

    def counting(args: tuple[Any, ...]) -> None:
        if not _gc_lock_call(worker, args) and args[0] not in _BACKGROUND:
            sent.append(args[0] if args[0] != "EVALSHA" else f"EVALSHA {_script_of(args[1])}")

    worker.redis.trace = counting
    nxt = await registry.feed_response(sid, "q-0", "line 1\nline 2\n\u00e9")
    assert isinstance(nxt, Paused) and nxt.queries[0].prompt == \
        "one step 1 after 'line 1\\nline 2\\n\u00e9'"
    # the host hears the pause the commit published before the worker reads its reply
    await assert_eventually(lambda: worker.stats.steps >= 2, message="commit reply")
    assert sent == ["EVALSHA commit_step"], sent
    assert worker.stats.live_resumes == 1 and worker.stats.replays == 0
    # one acquisition (the feed's, for the holder), committed: no attempt left over
    assert int(await registry.client.hget(sk.session, "fence")) > fence
    assert await registry.client.hget(sk.session, "tries") == b"0"
    assert not await registry.client.exists(sk.lock)


async def test_a_start_step_reads_the_session_once(
    registry: SessionRegistry, worker: Worker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """step_begin.lua takes lock A and reads the session with its journal (empty, at a start):
    the step reads nothing more before its commit."""
    done: list[str] = []

    def counting(args: tuple[Any, ...]) -> None:  # traced once it ran (not on NOSCRIPT)
        if args[0] == "EVALSHA" and not _gc_lock_call(worker, args):
            done.append(_script_of(args[1]))

    real_load = worker._load

    async def load(*args: Any, **kw: Any) -> Any:
        done.append("load")
        return await real_load(*args, **kw)

    worker.redis.trace = counting
    monkeypatch.setattr(worker, "_load", load)
    _, ev = await registry.start_execution("twrk-chain", {"k": 3, "tag": "s"})
    assert isinstance(ev, Paused) and ev.queries[0].prompt == "s step 0 after ''"
    await assert_eventually(lambda: worker.stats.steps >= 1, message="commit reply")
    assert done == ["step_begin", "commit_step"], done


#: What a worker sends on its own schedule, not a step's: the GC sweep (of every shard),
#: the heartbeat, the rescue look, and the intake's bounded re-read of the stream (it covers a
#: lost wake-up; that the step itself read nothing is shown by its path: a live resume, no
#: replay, one fence).
_BACKGROUND = {"TIME", "ZRANGEBYSCORE", "ZREMRANGEBYSCORE", "XINFO", "EXISTS", "ZRANGE", "ZREM",
               "SET", "ZADD", "XPENDING", "PUBSUB", "XREADGROUP"}


def _gc_lock_call(worker: Worker, args: tuple[Any, ...]) -> bool:
    """The worker's GC sweep (started with the worker) taking or releasing lock C, or loading
    the lock scripts to do so: not a step's command."""
    if args[0] == "SCRIPT":  # a script loaded after a NOSCRIPT
        return True
    return args[0] == "EVALSHA" and args[3] in {k.registry_lock for k in worker.services.shards.all}


def _script_of(sha: Any) -> str:
    for name in NAMES:
        if hashlib.sha1(source(name).encode()).hexdigest() == str(sha):
            return name
    return str(sha)


def test_handoff_messages_parse_binary_answers_and_refuse_truncation() -> None:
    a, b = pack({"r": "x\ny"}), pack({"r": "\n" * 3})
    msg = b"\n".join([b"H", b"s-1", b"7", b"tok", b"2", b"6", b"2", b"q-0", str(len(a)).encode(),
                      a, b"q-1", str(len(b)).encode(), b])
    h = parse_handoff(msg)
    assert h is not None and (h.sid, h.fence, h.token, h.asked, h.tries) == \
        ("s-1", 7, "tok", 2, 6)
    assert h.answers == {"q-0": a, "q-1": b}
    assert parse_handoff(b"s-1") is None  # a plain nudge
    with pytest.raises(ValueError):
        parse_handoff(msg[:-2])


async def test_replay_on_a_fresh_worker(fake_cluster: FakeCluster, registry: SessionRegistry,
                                        gates: Any) -> None:
    a = await fake_cluster.worker()
    sid, _ = await paused(registry, "twrk-chain", {"k": 4, "tag": "rp"})
    await registry.feed_response(sid, "q-0", "one")
    await fake_cluster.stop_worker(a)
    assert {"rp"} == CANCELLED  # a's paused execution was closed on shutdown

    b = await fake_cluster.worker()
    event = await registry.feed_response(sid, "q-0", "two")
    assert isinstance(event, Paused)
    assert event.queries[0].prompt == "rp step 2 after 'two'"
    assert b.stats.replays == 1
    done = await answer_chain(registry, sid, ["three", "four"])
    assert isinstance(done, Finished)
    assert done.result == ["one", "two", "three", "four"]
    assert b.stats.replays == 1  # rebuilt once, then live
    assert b.stats.live_resumes == 2
    assert a.stats.replays == 0


async def test_replay_keeps_logs_progress_and_history_single(
    fake_cluster: FakeCluster, registry: SessionRegistry, gates: Any
) -> None:
    a = await fake_cluster.worker()
    sid, _ = await paused(registry, "twrk-chain", {"k": 4, "tag": "rl"})
    await answer_chain(registry, sid, ["x", "y"])
    await fake_cluster.stop_worker(a)
    b = await fake_cluster.worker()
    await registry.feed_response(sid, "q-0", "z")
    assert b.stats.replays == 1
    snap = await registry.status(sid, include_history=True)
    # replayed rounds must not log or report progress a second time
    assert [e["message"] for e in snap["metrics"]["recent_logs"]] == \
        [f"asking {i}" for i in range(4)]
    assert snap["metrics"]["progress"] == {"step": 4, "total": 4, "message": "step 3"}
    assert [{k: h[k] for k in ("query_id", "prompt", "response")}
            for h in snap["metrics"]["conversation_history"]] == [
        {"query_id": "q-0", "prompt": p, "response": r}
        for p, r in zip(chain_prompts("rl", ["x", "y", "z"]), ["x", "y", "z"], strict=True)
    ]
    assert snap["metrics"]["llm_calls"] == 4


async def test_non_determinism_in_the_pending_round(
    fake_cluster: FakeCluster, registry: SessionRegistry, gates: Any
) -> None:
    a = await fake_cluster.worker()
    sid, _ = await paused(registry, "twrk-nondet")
    event = await registry.feed_response(sid, "q-0", "1")
    assert isinstance(event, Paused) and event.queries[0].prompt == "two v0"
    await fake_cluster.stop_worker(a)
    VERSION["v"] = 1  # the replay now asks "two v1" where "two v0" was answered
    b = await fake_cluster.worker()
    done = await registry.feed_response(sid, "q-0", "2")
    assert isinstance(done, Finished)
    assert done.state is Phase.FAILED
    assert done.error is not None and "non-determinism" in done.error
    assert b.stats.replays == 1


async def test_non_determinism_in_the_journal(
    fake_cluster: FakeCluster, registry: SessionRegistry, gates: Any
) -> None:
    a = await fake_cluster.worker()
    sid, _ = await paused(registry, "twrk-nondet")
    event = await answer_chain(registry, sid, ["1", "2"])
    assert isinstance(event, Paused) and event.queries[0].prompt == "three"
    await fake_cluster.stop_worker(a)
    VERSION["v"] = 1  # round 2, already journaled, now asks otherwise
    await fake_cluster.worker()
    done = await registry.feed_response(sid, "q-0", "3")
    assert isinstance(done, Finished) and done.state is Phase.FAILED
    assert done.error is not None
    assert "non-determinism" in done.error and "round 2" in done.error


async def test_deterministic_replay_is_not_non_determinism(
    fake_cluster: FakeCluster, registry: SessionRegistry, gates: Any
) -> None:
    a = await fake_cluster.worker()
    sid, _ = await paused(registry, "twrk-nondet")
    await answer_chain(registry, sid, ["1", "2"])
    await fake_cluster.stop_worker(a)
    await fake_cluster.worker()
    done = await registry.feed_response(sid, "q-0", "3")
    assert isinstance(done, Finished) and done.result == ["1", "2", "3"]


async def test_live_holder_is_preferred_over_replay(
    fake_cluster: FakeCluster, registry: SessionRegistry, gates: Any
) -> None:
    workers = [await fake_cluster.worker(), await fake_cluster.worker()]
    sids = [(await paused(registry, "twrk-chain", {"k": 3, "tag": f"h{i}"}))[0] for i in range(4)]
    for r in range(3):
        for sid in sids:
            await registry.feed_response(sid, "q-0", f"{sid[-4:]}-{r}")
    for sid in sids:
        done = await registry.wait_event(sid)
        assert isinstance(done, Finished)
        assert done.result == [f"{sid[-4:]}-{r}" for r in range(3)]
    assert sum(w.stats.replays for w in workers) == 0
    assert sum(w.stats.live_resumes for w in workers) == 12


async def test_eviction_beyond_max_live_executions_replays(
    fake_cluster: FakeCluster, registry: SessionRegistry, gates: Any
) -> None:
    w = await fake_cluster.worker(max_live_executions=1)
    first, _ = await paused(registry, "twrk-chain", {"k": 2, "tag": "old"})
    second, _ = await paused(registry, "twrk-chain", {"k": 2, "tag": "new"})
    # the older paused execution is dropped from memory once the worker has the second's
    # commit reply, which may come after the host heard the pause that commit published
    await assert_eventually(lambda: {"old"} == CANCELLED, message="older execution evicted")
    event = await registry.feed_response(first, "q-0", "a")
    assert isinstance(event, Paused)
    assert w.stats.replays == 1
    assert isinstance(await registry.feed_response(first, "q-0", "b"), Finished)
    done = await answer_chain(registry, second, ["c", "d"])
    assert isinstance(done, Finished) and done.result == ["c", "d"]
    assert (await registry.status(first))["result"] == ["a", "b"]


# -- budgets ----------------------------------------------------------------------------------


async def test_budget_llm_calls_exceeded(registry: SessionRegistry, worker: Worker,
                                         gates: Any) -> None:
    sid, _ = await paused(registry, "twrk-chain", {"k": 3}, budget={"llm_calls": 2})
    assert isinstance(await registry.feed_response(sid, "q-0", "a"), Paused)
    done = await registry.feed_response(sid, "q-0", "b")
    assert isinstance(done, Finished) and done.state is Phase.FAILED
    assert done.error is not None and "budget_exceeded: max_llm_calls (2)" in done.error
    assert done.to_json(sid) == {"status": "error", "error": done.error, "type": "budget_exceeded"}
    status = await registry.status(sid)
    assert status["metrics"]["llm_calls"] == 2
    assert status["metrics"]["budget_remaining"] == {"llm_calls": 0, "tokens": None,
                                                     "elapsed_ms": None}


async def test_budget_batch_larger_than_the_limit(registry: SessionRegistry,
                                                  worker: Worker) -> None:
    _, event = await registry.start_execution("twrk-batch", {"n": 3},
                                                budget={"llm_calls": 2})
    assert isinstance(event, Finished) and event.state is Phase.FAILED
    assert event.error is not None and "budget_exceeded: max_llm_calls (2)" in event.error
    _, ok = await registry.start_execution("twrk-batch", {"n": 2}, budget={"llm_calls": 2})
    assert isinstance(ok, Paused) and len(ok.queries) == 2


async def test_budget_is_enforced_after_a_replay(
    fake_cluster: FakeCluster, registry: SessionRegistry, gates: Any
) -> None:
    a = await fake_cluster.worker()
    sid, _ = await paused(registry, "twrk-chain", {"k": 3}, budget={"llm_calls": 2})
    await registry.feed_response(sid, "q-0", "a")
    await fake_cluster.stop_worker(a)
    b = await fake_cluster.worker()
    done = await registry.feed_response(sid, "q-0", "b")
    assert b.stats.replays == 1
    assert isinstance(done, Finished) and done.state is Phase.FAILED
    assert done.error is not None and "budget_exceeded: max_llm_calls (2)" in done.error


# -- failures ---------------------------------------------------------------------------------


async def test_strategy_exception_fails_with_its_text(registry: SessionRegistry,
                                                      worker: Worker) -> None:
    sid, _ = await paused(registry, "twrk-raise")
    done = await registry.feed_response(sid, "q-0", "now")
    assert isinstance(done, Finished) and done.state is Phase.FAILED
    assert done.error == "ValueError: boom: now"


async def test_strategy_session_error_keeps_its_message(registry: SessionRegistry,
                                                        worker: Worker) -> None:
    _, event = await registry.start_execution("cot", {})
    assert isinstance(event, Finished) and event.state is Phase.FAILED
    assert event.error == "this strategy needs input {'task': '<what to solve>'}"


async def test_non_json_result_fails_clearly(registry: SessionRegistry, worker: Worker) -> None:
    sid, _ = await paused(registry, "twrk-bad-result")
    done = await registry.feed_response(sid, "q-0", "x")
    assert isinstance(done, Finished) and done.state is Phase.FAILED
    assert done.error is not None and "result must be JSON-able" in done.error
    assert (await registry.status(sid))["result"] is None


async def test_result_nested_too_deep_fails_the_session(registry: SessionRegistry,
                                                      worker: Worker) -> None:
    """A result JSON cannot encode must fail the session like any other bad result; it must
    not escape the step (which leaves the job pending and the session running for good)."""
    sid, _ = await paused(registry, "twrk-deep-result")
    done = await registry.feed_response(sid, "q-0", "very", timeout=2)
    assert isinstance(done, Finished) and done.state is Phase.FAILED
    assert done.error is not None and "JSON" in done.error
    shallow, _ = await paused(registry, "twrk-deep-result", {"depth": 3})
    done = await registry.feed_response(shallow, "q-0", "x")
    assert isinstance(done, Finished) and done.result == [[["x"]]]


async def test_step_timeout_fails_the_session_and_the_worker_goes_on(
    fake_cluster: FakeCluster, registry: SessionRegistry, gates: Any
) -> None:
    await fake_cluster.worker(step_timeout_s=0.2)
    gate = new_gate("hang")  # never opened during the test
    _, event = await registry.start_execution("twrk-gated", {"tag": "hang"}, timeout=5)
    assert isinstance(event, Finished) and event.state is Phase.FAILED
    assert event.error is not None and "step timeout" in event.error
    assert gate.cancelled  # the stuck strategy coroutine was cancelled, not leaked
    _, ok = await registry.start_execution("twrk-chain", {"k": 1}, timeout=5)
    assert isinstance(ok, Paused)


async def test_strategy_unknown_to_the_worker(fake_cluster: FakeCluster) -> None:
    reg = fake_cluster.registry()
    # No worker has registered names yet, so the registry cannot refuse the name.
    sid = await reg.submit("twrk-not-in-any-catalog", {})
    await fake_cluster.worker()
    event = await reg.wait_event(sid, timeout=5)
    assert isinstance(event, Finished) and event.state is Phase.FAILED
    assert event.error is not None
    assert "twrk-not-in-any-catalog" in event.error and "not registered" in event.error


async def test_corrupt_pending_query_fails_only_that_session(
    registry: SessionRegistry, worker: Worker, gates: Any
) -> None:
    bad, _ = await paused(registry, "twrk-chain", {"k": 2, "tag": "bad"})
    good, _ = await paused(registry, "twrk-chain", {"k": 1, "tag": "good"})
    await registry.client.hset(registry.keys.session(bad).pending, "q-0", b"\xc1")
    # no live holder: the next step is a replay, which reads the stored queries (the live
    # holder would resume from the copy it has in memory and never look at them)
    await registry.client.hdel(registry.keys.session(bad).session, "holder", "holder_ch")
    done = await registry.feed_response(bad, "q-0", "x")
    assert isinstance(done, Finished) and done.state is Phase.FAILED
    assert done.error is not None and "cannot decode" in done.error
    ok = await registry.feed_response(good, "q-0", "y")
    assert isinstance(ok, Finished) and ok.result == ["y"]


async def test_workers_serve_the_shards_they_are_told(fake_settings: Any) -> None:
    """A worker told to serve shard 0 of 4 takes only that shard's sessions; the others
    wait for a worker that serves theirs, which then finishes them. A shard the namespace
    does not have is refused at start."""
    cluster = FakeCluster.fake(fake_settings.with_(shards=4))
    try:
        reg = cluster.registry()
        first = await cluster.worker(serve_shards=[0])
        shards = await reg.services.ready()
        sids = [await reg.submit("twrk-chain", {"k": 1, "tag": f"s{n}"}) for n in range(16)]
        mine = [sid for sid in sids if shards.of(sid).index == 0]
        others = [sid for sid in sids if sid not in mine]
        assert mine and others  # 16 sessions over 4 shards, at random
        for sid in mine:
            assert isinstance(await reg.wait_event(sid, timeout=5), Paused)
        assert {(await reg.status(sid))["phase"] for sid in others} == {"running"}
        assert [i.keys.index for i in first.intakes] == [0]

        await cluster.worker(serve_shards=[1, 2, 3])
        for sid in others:
            assert isinstance(await reg.wait_event(sid, timeout=5), Paused)
        with pytest.raises(InvalidInput, match="has 4"):
            await cluster.worker(serve_shards=[4])
    finally:
        await cluster.aclose()


async def test_unknown_job_kind_leaves_the_stream(registry: SessionRegistry,
                                                  worker: Worker) -> None:
    jobs = (await shard_keys(registry)).jobs
    await registry.client.xadd(jobs, {"k": "bogus", "sid": "s-0-x"})

    async def stream_empty() -> bool:
        return await registry.client.xlen(jobs) == 0

    await assert_eventually(stream_empty, timeout=5, message="bogus job never left the stream")


# -- cancellation, shutdown, takeover ---------------------------------------------------------


async def test_cancel_closes_the_live_execution(registry: SessionRegistry, worker: Worker,
                                                gates: Any) -> None:
    sid, _ = await paused(registry, "twrk-chain", {"k": 2, "tag": "cx"})
    await registry.cancel(sid)
    await assert_eventually(lambda: "cx" in CANCELLED, timeout=5,
                            message="the cancelled session's strategy kept running")


async def test_shutdown_cancels_an_in_flight_strategy(
    fake_cluster: FakeCluster, registry: SessionRegistry, gates: Any
) -> None:
    """A step cut short by shutdown must not leave its strategy coroutine running: it would
    go on (and do whatever it does) after the worker left."""
    w = await fake_cluster.worker()
    gate = new_gate("inflight")
    await registry.submit("twrk-gated", {"tag": "inflight"})
    await asyncio.wait_for(gate.entered.wait(), 5)
    await fake_cluster.stop_worker(w, grace_s=0.05)
    await assert_eventually(lambda: gate.cancelled, timeout=1,
                            message="strategy task still running after Worker.shutdown")


async def test_a_step_cut_short_is_claimed_by_another_worker(
    fake_cluster: FakeCluster, registry: SessionRegistry, gates: Any
) -> None:
    a = await fake_cluster.worker()
    gate = new_gate("takeover")
    sid = await registry.submit("twrk-gated", {"tag": "takeover"})
    await asyncio.wait_for(gate.entered.wait(), 5)
    await fake_cluster.stop_worker(a, grace_s=0.05)  # the start job stays pending on a
    assert (await registry.status(sid))["phase"] == "running"
    gate.open.set()
    b = await fake_cluster.worker(claim_idle_ms=100)
    event = await registry.wait_event(sid, timeout=5)
    assert event == Paused((LlmQuery(id="q-0", prompt="gated takeover"),))
    assert b.stats.claimed >= 1
    done = await registry.feed_response(sid, "q-0", "ok")
    assert isinstance(done, Finished) and done.result == {"answer": "ok"}


async def test_worker_registers_its_strategies_and_heartbeat(
    fake_cluster: FakeCluster, registry: SessionRegistry
) -> None:
    w = await fake_cluster.worker()
    names = {m.decode() for m in await registry.client.smembers(registry.keys.strategies)}
    assert {"cot", "reflect", "sc", "twrk-chain", "twrk-gated"} <= names
    assert names == set(catalog.names())
    assert await registry.client.exists(registry.keys.worker(w.id)) == 1
    await fake_cluster.stop_worker(w)
    assert await registry.client.exists(registry.keys.worker(w.id)) == 0


# -- built-in strategies through the whole stack ------------------------------------------------


async def test_builtin_sc_majority_vote(registry: SessionRegistry, worker: Worker) -> None:
    sid, event = await paused(registry, "sc", {"task": "2+2?", "n": 5})
    assert [q.id for q in event.queries] == [f"q-{i}" for i in range(5)]
    reasonings = [f"reasoning {i}" for i in range(5)]
    for i in (4, 2, 0, 3):
        await registry.feed_response(sid, f"q-{i}", reasonings[i])
    extract = await registry.feed_response(sid, "q-1", reasonings[1])
    assert isinstance(extract, Paused)  # one answer extraction per path, in path order
    assert [q.prompt.split("Reasoning:\n")[1].split("\n")[0] for q in extract.queries] == \
        reasonings
    answers = ["It is 4.", "5", "4", "4!", "5."]
    for i in (4, 2, 0, 3):
        await registry.feed_response(sid, f"q-{i}", answers[i])
    consensus = await registry.feed_response(sid, "q-1", answers[1])
    assert isinstance(consensus, Paused) and len(consensus.queries) == 1
    done = await registry.feed_response(sid, "q-0", "5, 2 of 5")
    assert isinstance(done, Finished)
    # the extracted answers, normalised, are the votes; "5" and "4" tie and "5" came first
    assert done.result["vote_counts"] == {"it is 4": 1, "5": 2, "4": 2}
    assert done.result["answer"] == "5"
    # in query order, not feed order
    assert [p["reasoning"] for p in done.result["paths"]] == reasonings
    assert [p["answer"] for p in done.result["paths"]] == answers


async def test_builtin_cot_and_reflect(registry: SessionRegistry, worker: Worker) -> None:
    sid, event = await paused(registry, "cot", {"task": "why?", "depth": 1})
    assert event.queries[0].system is not None
    await registry.feed_response(sid, "q-0", "because")
    done = await registry.feed_response(sid, "q-0", "final")
    assert isinstance(done, Finished)
    assert done.result == {"chain": ["because"], "conclusion": "final"}

    sid, _ = await paused(registry, "reflect", {"task": "essay", "max_rounds": 1})
    done = await answer_chain(registry, sid, ["draft", "critique", "better"])
    assert isinstance(done, Finished)
    assert done.result == {"output": "better", "total_rounds": 1, "converged": False,
                           "rounds": [{"round": 1, "critique": "critique",
                                       "converged": False}]}


# -- Execution, directly --------------------------------------------------------------------


async def _two_steps(ctx: Context, x: int = 0) -> dict[str, Any]:
    a = await ctx.llm(f"first {x}")
    b, c = await ctx.llm_batch(["b", {"prompt": "c", "max_tokens": 3}])
    return {"a": a, "b": b, "c": c}


async def test_execution_steps_to_its_end() -> None:
    ex = Execution(_two_steps, {"x": 1})
    out = await ex.step(None, 1)
    assert isinstance(out, Ask) and [q.prompt for q in out.queries] == ["first 1"]
    out = await ex.step(["A"], 1)
    assert isinstance(out, Ask) and [(q.id, q.max_tokens) for q in out.queries] == [
        ("q-0", 1024), ("q-1", 3)]
    out = await ex.step(["B", "C"], 1)
    assert out == Done({"a": "A", "b": "B", "c": "C"})
    assert ex.asked == 2


async def test_execution_replay_reaches_the_pending_ask() -> None:
    first = [LlmQuery(id="q-0", prompt="first 0")]
    ex = Execution(_two_steps, {})
    out = await ex.replay([JournalRound(digest(first), ["A"])], 1)
    assert isinstance(out, Ask) and [q.prompt for q in out.queries] == ["b", "c"]
    assert not ex.ctx.replaying
    assert await ex.step(["B", "C"], 1) == Done({"a": "A", "b": "B", "c": "C"})


async def test_execution_replay_detects_a_different_question() -> None:
    other = [LlmQuery(id="q-0", prompt="first 1")]
    ex = Execution(_two_steps, {})
    with pytest.raises(NonDeterminism, match="round 1"):
        await ex.replay([JournalRound(digest(other), ["A"])], 1)
    ex.close()


async def test_execution_step_timeout_and_close() -> None:
    gate = Gate()

    async def stuck(ctx: Context) -> None:
        await gate.pass_()

    ex = Execution(stuck, {})
    out = await ex.step(None, 0.05)
    assert isinstance(out, Crash) and out.error.startswith("step timeout")
    await assert_eventually(lambda: gate.cancelled, timeout=1)


async def test_execution_result_size_limit() -> None:
    async def big(ctx: Context) -> str:
        return "x" * 100

    out = await Execution(big, {}, max_result_bytes=50).step(None, 1)
    assert isinstance(out, Crash) and "over the limit" in out.error


@pytest.mark.timeout(2)
async def test_execution_circular_result_is_a_crash() -> None:
    async def circular(ctx: Context) -> Any:
        loop: list[Any] = []
        loop.append(loop)
        return {"loop": loop}

    out = await Execution(circular, {}).step(None, 1)
    assert isinstance(out, Crash) and "JSON-able" in out.error


def test_digest_depends_on_every_query_field() -> None:
    base = LlmQuery(id="q-0", prompt="p")
    variants = [LlmQuery(id="q-1", prompt="p"), LlmQuery(id="q-0", prompt="P"),
                LlmQuery(id="q-0", prompt="p", system="s"),
                LlmQuery(id="q-0", prompt="p", max_tokens=1),
                LlmQuery(id="q-0", prompt="p", grounded=True)]
    assert digest([base]) == digest([LlmQuery(id="q-0", prompt="p")])
    assert len({digest([base]), *(digest([v]) for v in variants)}) == 6
    assert len(digest([base])) == 8


# -- Context, directly ------------------------------------------------------------------------


def _ctx(**kw: Any) -> tuple[Context, list[list[LlmQuery]]]:
    asked: list[list[LlmQuery]] = []

    async def ask(queries: list[LlmQuery]) -> list[str]:
        asked.append(queries)
        return ["r" * 8 for _ in queries]

    return Context(ask, **kw), asked


@pytest.mark.parametrize(
    "items",
    [[], "a string", [{"prompt": "p", "temperature": 1}], [{"prompt": None}],
     [{"prompt": "p", "max_tokens": 0}], [{"prompt": "p", "max_tokens": True}],
     [{"prompt": "p", "system": 5}]],
)
async def test_context_rejects_bad_queries(items: Any) -> None:
    ctx, asked = _ctx()
    with pytest.raises(InvalidInput):
        await ctx.llm_batch(items)
    assert asked == []


async def test_context_counts_and_budget() -> None:
    ctx, asked = _ctx(budget={"llm_calls": 3, "tokens": 100})
    assert await ctx.llm("abcdefgh", system="s", grounded=True) == "r" * 8
    assert asked[0] == [LlmQuery(id="q-0", prompt="abcdefgh", system="s", grounded=True)]
    # the system text counts too, estimated on its own (upstream's way): 2 + 1
    assert (ctx.llm_calls, ctx.prompt_tokens, ctx.response_tokens) == (1, 3, 2)
    assert ctx.budget_remaining() == {"llm_calls": 2, "tokens": 95, "elapsed_ms": None}
    with pytest.raises(BudgetExceeded, match=r"max_llm_calls \(3\) would be passed"):
        await ctx.llm_batch(["a", "b", "c"])
    await ctx.llm_batch(["a", "b"])
    assert ctx.budget_remaining() == {"llm_calls": 0, "tokens": 89, "elapsed_ms": None}
    # calls and tokens replay exactly, so a replay is refused where the first run was
    ctx.replaying = True
    with pytest.raises(BudgetExceeded, match=r"max_llm_calls \(3\) reached \(3 used\)"):
        await ctx.llm("again")
    assert ctx.llm_calls == 3


async def test_context_logs_and_progress_are_silent_on_replay() -> None:
    ctx, _ = _ctx()
    assert ctx.budget_remaining() is None
    ctx.log("warn", "seen")
    ctx.progress(1, 2, "half")
    with pytest.raises(InvalidInput):
        ctx.log("loud", "x")
    ctx.replaying = True
    ctx.log("info", "not seen")
    ctx.progress(2, 2)
    assert [e["message"] for e in ctx.logs] == ["seen"]
    assert {e["source"] for e in ctx.logs} == {"ctx.log"}
    assert ctx.last_progress == {"step": 1, "total": 2, "message": "half"}


def test_catalog_registration_rules() -> None:
    with pytest.raises(ValueError):
        strategy("")

    async def other(ctx: Context) -> None:
        return None

    with pytest.raises(ValueError, match="already registered"):
        strategy("twrk-chain")(other)
    assert strategy("twrk-chain")(chain) is chain  # re-registering the same function is fine
    assert catalog.get("twrk-chain") is chain
    with pytest.raises(Exception, match="not registered"):
        catalog.get("twrk-nope")


@pytest.mark.parametrize("item", [7, ["prompt", "p"]])
async def test_context_rejects_items_that_are_neither_str_nor_dict(item: Any) -> None:
    """``llm_batch`` takes prompts or dicts; anything else is the strategy's mistake and
    should be the same typed ``InvalidInput`` as the other bad items, not a TypeError /
    ValueError from ``dict(item)``."""
    ctx, asked = _ctx()
    with pytest.raises(InvalidInput):
        await ctx.llm_batch([item])
    assert asked == []


@pytest.mark.redis
async def test_a_batch_of_5000_queries_commits_on_a_real_redis(
    redis_url: str, namespace: str
) -> None:
    """A pause writes its queries in chunks: Lua's ``unpack`` could
    not spread 10,000 arguments into one command."""
    from coordinator.settings import Settings

    settings = Settings(namespace=namespace)
    catalog.load([])
    worker = Worker(Transport.from_url(redis_url), settings)
    await worker.start()
    reg = SessionRegistry(Transport.from_url(redis_url), settings=settings)
    try:
        sid, event = await reg.start_execution("twrk-batch", {"n": 5000}, timeout=30)
        assert isinstance(event, Paused) and len(event.queries) == 5000
        assert (await reg.status(sid))["pending_queries"] == 5000
        for q in event.queries[:-1]:
            await reg.feed_response(sid, q.id, q.prompt.upper())
        done = await reg.feed_response(sid, event.queries[-1].id, "last", timeout=30)
        assert isinstance(done, Finished) and done.state is Phase.COMPLETED, done
        assert done.result[:2] == ["ITEM 0", "ITEM 1"] and done.result[-1] == "last"
        assert len(done.result) == 5000
    finally:
        await worker.shutdown(1.0)
        await reg.aclose()


@strategy("twrk-logged-batches")
async def logged_batches(ctx: Context, rounds: int = 3, **_: Any) -> list[list[str]]:
    out = []
    for r in range(rounds):
        ctx.log("info", f"round {r}")
        out.append(await ctx.llm_batch([f"r{r} a", f"r{r} b"]))
    return out


@pytest.mark.redis
async def test_every_session_key_always_carries_an_expiry(redis_url: str, namespace: str) -> None:
    """The backstop TTL is renewed lazily (not on every feed), so check the invariant it
    must keep: at every point of a run, each key of the session that exists expires."""
    from coordinator.settings import Settings

    settings = Settings(namespace=namespace)
    catalog.load([])
    worker = Worker(Transport.from_url(redis_url), settings)
    await worker.start()
    reg = SessionRegistry(Transport.from_url(redis_url), settings=settings)

    async def check(sid: str, when: str) -> int:
        sk = reg.keys.session(sid)
        names = [sk.session, sk.pending, sk.answers, sk.journal, sk.logs, sk.fed, sk.fed_prev]
        ttls = {n.rsplit(":", 1)[-1]: await reg.client.pttl(n) for n in names}
        assert all(t != -1 for t in ttls.values()), f"{when}: a key without expiry: {ttls}"
        return sum(t > 0 for t in ttls.values())

    try:
        sid, event = await reg.start_execution("twrk-logged-batches", {"rounds": 3})
        assert await check(sid, "paused first") >= 3
        for r in range(3):
            assert isinstance(event, Paused)
            await reg.feed_response(sid, event.queries[1].id, f"B{r}")
            assert await check(sid, f"round {r} half answered") >= 4
            event = await reg.feed_response(sid, event.queries[0].id, f"A{r}")
            assert await check(sid, f"after round {r}") >= 4
        assert isinstance(event, Finished) and event.result == [
            [f"A{r}", f"B{r}"] for r in range(3)]
    finally:
        await worker.shutdown(1.0)
        await reg.aclose()
