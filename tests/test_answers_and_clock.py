"""Answers always match their questions, and every clock is Redis's.

1. A round whose questions or answers cannot all be read fails the session with
   ``CorruptState``, on the host's side (a pause whose questions are lost) and on the
   worker's (a resume whose questions or answers are lost or unreadable); the runtime refuses
   to resume a strategy with another number of answers than it asked for. Once, a lost
   pending hash handed a strategy ``[]`` for a batch of 4 (it completed), and showed its host
   a pause with no questions (it was stuck).
2. Budgets, elapsed times and heartbeats are measured on Redis's clock (``TIME``, which
   stamps every session), not on the host's: a worker 2 h fast once failed a 10-minute
   budget at once. These tests move this process's wall clock (``time.time_ns``, which
   ``coordinator.records.local_now_ms`` reads) hours off, on a real redis-server whose clock
   they cannot move.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest

from coordinator import records
from coordinator.codec import pack
from coordinator.errors import CorruptState, WaitTimeout
from coordinator.models import Finished, LlmQuery, Paused
from coordinator.records import SessionRecord, decode_queries, parse_time, server_now_ms
from coordinator.registry import SessionRegistry
from coordinator.states import Phase
from tests.conftest import FakeCluster
from tests.procs import InProcessCluster
from workers import strategy
from workers.context import Context
from workers.runtime import Ask, Crash, Done, Execution, JournalRound, digest
from workers.worker import Worker

#: The answer tests run on fakeredis and on a real redis-server; the clock tests need a real
#: one (its clock is the one that must not move with this process's).
ON_BOTH_SERVERS = True

HOUR_MS = 3_600_000

#: What ``tac-batch`` was resumed with, per tag: it must never see a short round.
RECEIVED: dict[str, list[str]] = {}


@strategy("tac-batch")
async def batch(ctx: Context, n: int = 4, tag: str = "", **_: Any) -> list[str]:
    answers = await ctx.llm_batch([f"{tag} item {i}" for i in range(n)])
    RECEIVED[tag] = answers
    return answers


@strategy("tac-two")
async def two(ctx: Context, **_: Any) -> list[str]:
    return [await ctx.llm("first"), await ctx.llm("second")]


@pytest.fixture(autouse=True)
def _received() -> Iterator[None]:
    RECEIVED.clear()
    yield
    RECEIVED.clear()


async def paused(reg: SessionRegistry, name: str, inp: dict[str, Any]) -> tuple[str, Paused]:
    sid, event = await reg.start_execution(name, inp, timeout=10)
    assert isinstance(event, Paused), event
    return sid, event


def assert_failed_corrupt(event: Any, *words: str) -> None:
    assert isinstance(event, Finished) and event.state is Phase.FAILED, event
    assert event.error is not None
    for word in words:
        assert word in event.error, event.error


# -- 1. answers match their questions: the host's side ----------------------------------------


async def test_a_pause_whose_questions_are_lost_fails_for_the_host_on_wait(
    registry: SessionRegistry, worker: Worker
) -> None:
    """Not ``Paused(())``: the host could never answer it, and would wait for ever."""
    sid, event = await paused(registry, "tac-batch", {"n": 4, "tag": "w"})
    assert len(event.queries) == 4
    await registry.client.delete(registry.keys.session(sid).pending)
    with pytest.raises(CorruptState, match="missing from its pending queries"):
        await registry.wait_event(sid, timeout=2)
    # the session was failed, so every caller from now on sees it ended, not stuck
    again = await registry.wait_event(sid, timeout=2)
    assert_failed_corrupt(again, "q-0", "missing")
    status = await registry.status(sid)
    assert status["phase"] == "failed" and "missing" in status["error"]
    assert RECEIVED == {}


async def test_a_pause_whose_questions_are_lost_fails_for_the_host_on_status(
    registry: SessionRegistry, worker: Worker
) -> None:
    sid, _ = await paused(registry, "tac-batch", {"n": 4, "tag": "s"})
    # one question lost out of four: the round is as unanswerable as with none
    await registry.client.hdel(registry.keys.session(sid).pending, "q-2")
    with pytest.raises(CorruptState, match="q-2"):
        await registry.status(sid, pending_filter="meta")
    status = await registry.status(sid)
    assert status["state"] == "terminal" and status["phase"] == "failed"
    assert "q-2" in status["error"]
    assert sid not in await registry.list_snapshots()
    total, dead = await registry.dead_letters()
    assert total == 1 and dead[0]["sid"] == sid and dead[0]["reason"] == "corrupt state"


async def test_a_partly_answered_pause_with_its_questions_lost_fails_too(
    registry: SessionRegistry, worker: Worker
) -> None:
    """Also the questions answered already: the round cannot be resumed without them."""
    sid, _ = await paused(registry, "tac-batch", {"n": 2, "tag": "p"})
    await registry.feed_response(sid, "q-0", "a")
    await registry.client.hdel(registry.keys.session(sid).pending, "q-0")
    with pytest.raises(CorruptState, match="q-0"):
        await registry.wait_event(sid, timeout=2)


async def test_a_round_that_ends_between_the_hosts_reads_is_not_taken_for_corrupt(
    registry: SessionRegistry, worker: Worker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The host's reads of a session are one write, not one transaction: a session cancelled
    (its questions deleted) right after its hash was read must be read again and seen
    cancelled, not failed as corrupt."""
    sid, _ = await paused(registry, "tac-batch", {"n": 2, "tag": "race"})
    sk = registry.keys.session(sid)
    real = registry.redis.execute_many
    raced: list[str] = []

    async def interleaved(commands: Any, **kw: Any) -> Any:
        if not raced and commands[0] == ("HGETALL", sk.session) and len(commands) == 4:
            raced.append(sid)
            first = await real(commands[:1], **kw)
            await registry.terminate.cancel(sid)  # lands between the hash and its round
            return [*first, *await real(commands[1:], **kw)]
        return await real(commands, **kw)

    monkeypatch.setattr(registry.redis, "execute_many", interleaved)
    event = await registry.wait_event(sid, timeout=2)
    assert raced == [sid]
    assert isinstance(event, Finished) and event.state is Phase.CANCELLED, event
    total, _ = await registry.dead_letters()
    assert total == 0


# -- 1. answers match their questions: the worker's side --------------------------------------


async def test_questions_lost_while_the_resume_job_waits_fail_the_replay(
    fake_cluster: FakeCluster, registry: SessionRegistry
) -> None:
    """No worker is up when the round completes: the next one rebuilds the execution from
    the journal and must fail the session as corrupt (not as non-deterministic, and never
    resume it with no answers)."""
    a = await fake_cluster.worker()
    sid, _ = await paused(registry, "tac-batch", {"n": 4, "tag": "r"})
    await fake_cluster.stop_worker(a)
    for i in range(3):
        await registry.feed_response(sid, f"q-{i}", f"a{i}")
    with pytest.raises(WaitTimeout):  # recorded; the resume job waits for a worker
        await registry.feed_response(sid, "q-3", "a3", timeout=0)
    await registry.client.delete(registry.keys.session(sid).pending)
    b = await fake_cluster.worker()
    done = await registry.wait_event(sid, timeout=10)
    assert_failed_corrupt(done, "missing from its pending queries")
    assert "non-determinism" not in (done.error or "")
    assert b.stats.replays == 0  # failed before anything ran
    assert RECEIVED == {}


async def test_questions_lost_under_a_live_execution_never_reach_the_strategy(
    registry: SessionRegistry, worker: Worker
) -> None:
    """The live execution reads the round from Redis (no handoff: its holder was not told)
    and finds 1 of its 4 questions: it fails the session rather than hand the strategy 1
    answer for a batch of 4, which it would carry on with."""
    sid, _ = await paused(registry, "tac-batch", {"n": 4, "tag": "live"})
    sk = registry.keys.session(sid)
    for i in range(3):
        await registry.feed_response(sid, f"q-{i}", f"a{i}")
    await registry.client.hdel(sk.pending, "q-0", "q-1", "q-2")
    await registry.client.hdel(sk.session, "holder_ch")  # the job goes by the stream
    done = await registry.feed_response(sid, "q-3", "a3", timeout=10)
    assert_failed_corrupt(done, "q-0", "missing")
    assert worker.stats.replays == 0
    assert RECEIVED == {}


async def test_an_answer_lost_fails_the_session(registry: SessionRegistry,
                                                worker: Worker) -> None:
    sid, _ = await paused(registry, "tac-batch", {"n": 2, "tag": "lost"})
    await registry.feed_response(sid, "q-0", "a")
    await registry.client.hdel(registry.keys.session(sid).answers, "q-0")
    done = await registry.feed_response(sid, "q-1", "b", timeout=10)
    assert_failed_corrupt(done, "q-0", "has no answer")
    assert RECEIVED == {}


@pytest.mark.parametrize("stored", [b"\xc1", pack(["not", "an answer"]), pack(5),
                                    pack({"u": {}})], ids=["bytes", "list", "int", "no-r"])
async def test_an_unreadable_answer_fails_the_session(registry: SessionRegistry,
                                                      worker: Worker, stored: bytes) -> None:
    """At once, as corrupt: not a step error retried until it is dead-lettered."""
    sid, _ = await paused(registry, "tac-batch", {"n": 2, "tag": "bad"})
    await registry.feed_response(sid, "q-0", "a")
    await registry.client.hset(registry.keys.session(sid).answers, "q-0", stored)
    done = await registry.feed_response(sid, "q-1", "b", timeout=10)
    assert_failed_corrupt(done)
    assert "decode" in (done.error or "") or "not an answer" in (done.error or "")
    assert worker.stats.step_errors == 0
    assert RECEIVED == {}


# -- 1. answers match their questions: the runtime, the last line of defence --------------


async def _batch_of(ctx: Context, n: int = 4) -> list[str]:
    return await ctx.llm_batch([f"item {i}" for i in range(n)])


@pytest.mark.parametrize("answers", [[], ["a"], ["a", "b", "c", "d", "e"]])
async def test_execution_refuses_answers_that_do_not_match_its_questions(
    answers: list[str]
) -> None:
    ex = Execution(_batch_of, {})
    asked = await ex.step(None, 1)
    assert isinstance(asked, Ask) and len(asked.queries) == 4
    out = await ex.step(answers, 1)
    assert isinstance(out, Crash), out
    assert out.error.startswith("corrupt state:") and "4 question(s)" in out.error
    task = ex._task
    assert task is not None  # the strategy was ended, not resumed
    await asyncio.wait({task}, timeout=1)
    assert task.cancelled()


async def test_execution_with_matching_answers_resumes() -> None:
    ex = Execution(_batch_of, {"n": 2})
    assert isinstance(await ex.step(None, 1), Ask)
    assert await ex.step(["x", "y"], 1) == Done(["x", "y"])


async def test_replay_refuses_a_journal_round_with_too_few_answers() -> None:
    asked = [LlmQuery(id=f"q-{i}", prompt=f"item {i}") for i in range(4)]
    ex = Execution(_batch_of, {})
    with pytest.raises(CorruptState, match="journal round 1 holds 3 answer"):
        await ex.replay([JournalRound(digest(asked), ["a", "b", "c"])], 1)
    ex.close()


def _record(phase: str, qids: Any) -> SessionRecord:
    raw = {b"phase": phase.encode(), b"strategy": b"s", b"started_at": b"1",
           b"last_activity_at": b"1", b"ttl_ms": b"1000", b"asked": b"1"}
    if qids is not None:
        raw[b"qids"] = pack(qids)
    return SessionRecord.from_hash("s-1", raw)


@pytest.mark.parametrize("qids", [5, "q-0", [1, 2], ["q-0", "q-0"], {"q-0": 1}])
def test_query_ids_that_cannot_match_answers_are_corrupt(qids: Any) -> None:
    with pytest.raises(CorruptState, match="query ids"):
        _record("paused", qids)


def test_decode_queries_refuses_a_query_stored_under_another_id() -> None:
    rec = _record("running", ["q-0", "q-1"])
    pending = {b"q-0": pack(LlmQuery(id="q-0", prompt="a").to_record()),
               b"q-1": pack(LlmQuery(id="q-0", prompt="b").to_record())}
    with pytest.raises(CorruptState, match="stored as 'q-0'"):
        decode_queries(rec, pending)
    with pytest.raises(CorruptState, match="is not a query"):
        decode_queries(rec, {**pending, b"q-1": pack({"prompt": "no id"})})


# -- 2. one clock: Redis's ------------------------------------------------------------------


@pytest.fixture
async def real_cluster(redis_url: str, fake_settings: Any) -> AsyncIterator[InProcessCluster]:
    """Registry and worker in this process, on a real redis-server: its clock stays where
    it is when this process's moves."""
    cluster = InProcessCluster.real(redis_url, fake_settings.with_(
        url=redis_url, namespace=f"t{secrets.token_hex(4)}"))
    try:
        yield cluster
    finally:
        await cluster.aclose()


@pytest.fixture
def host_clock(monkeypatch: pytest.MonkeyPatch) -> Callable[[int], None]:
    """``host_clock(ms)`` moves this process's wall clock ``ms`` off (the whole host's, as a
    badly synced machine's would be); the learned offset is forgotten first and restored
    after, so no other test inherits it."""
    monkeypatch.setattr(records, "SERVER_CLOCK", records.ServerClock())
    real = time.time_ns

    def move(ms: int) -> None:
        monkeypatch.setattr(time, "time_ns", lambda: real() + ms * 1_000_000)

    return move


async def redis_ms(reg: SessionRegistry) -> int:
    return parse_time(await reg.client.time())


@pytest.mark.redis
async def test_a_worker_hours_fast_keeps_a_ten_minute_budget(
    real_cluster: InProcessCluster, host_clock: Callable[[int], None]
) -> None:
    host_clock(2 * HOUR_MS)
    reg = real_cluster.registry()
    w = await real_cluster.worker()
    sid, event = await reg.start_execution("tac-two", {}, budget={"elapsed_ms": 600_000},
                                           timeout=10)
    assert isinstance(event, Paused), event  # not failed at once with "time limit"
    snap = await reg.status(sid)
    left = snap["metrics"]["budget_remaining"]["elapsed_ms"]
    assert 590_000 <= left <= 600_000, snap["metrics"]
    assert 0 <= snap["metrics"]["elapsed_ms"] <= 10_000
    assert isinstance(await reg.feed_response(sid, "q-0", "a", timeout=10), Paused)
    done = await reg.feed_response(sid, "q-0", "b", timeout=10)
    assert isinstance(done, Finished) and done.state is Phase.COMPLETED, done
    assert done.result == ["a", "b"]
    assert 0 <= done.metrics["auto"]["elapsed_ms"] <= 10_000
    # heartbeats and strategy logs are on the server's clock as well
    now = await redis_ms(reg)
    assert abs((await reg.workers())[w.id] - now) < 10_000
    assert abs((await reg.worker_stats())[w.id]["at"] - now) < 10_000
    assert abs(server_now_ms() - now) < 1_000


@pytest.mark.redis
async def test_a_worker_hours_slow_still_enforces_the_budget(
    real_cluster: InProcessCluster, host_clock: Callable[[int], None]
) -> None:
    """Measured on this host's clock the session would start 2 h in the future and never
    run out of time."""
    host_clock(-2 * HOUR_MS)
    reg = real_cluster.registry()
    await real_cluster.worker()
    sid, event = await reg.start_execution("tac-two", {}, budget={"elapsed_ms": 1_000},
                                           timeout=10)
    assert isinstance(event, Paused), event
    started = (await reg.status(sid))["started_at"]
    # let the server's clock pass the budget (about a second: it cannot be moved)
    await asyncio.sleep(max(0, started + 1_050 - await redis_ms(reg)) / 1000)
    done = await reg.feed_response(sid, "q-0", "a", timeout=10)
    assert isinstance(done, Finished) and done.state is Phase.FAILED, done
    assert done.error is not None and "max_elapsed_ms (1000ms) reached" in done.error
    assert (await reg.status(sid))["metrics"]["budget_remaining"] == {
        "elapsed_ms": 0, "llm_calls": None, "tokens": None}


@pytest.mark.redis
async def test_every_heartbeat_relearns_the_servers_clock(
    real_cluster: InProcessCluster, host_clock: Callable[[int], None]
) -> None:
    """A host clock that jumps after the worker started (NTP, a VM resumed) is caught up
    with at the next heartbeat, which carries ``TIME`` in its own write."""
    host_clock(HOUR_MS)
    w = await real_cluster.worker()
    reg = real_cluster.registry()
    assert abs(server_now_ms() - await redis_ms(reg)) < 1_000
    host_clock(-3 * HOUR_MS)  # jumps 4 h back
    assert server_now_ms() < await redis_ms(reg) - 3 * HOUR_MS
    await w._beat()
    assert abs(server_now_ms() - await redis_ms(reg)) < 1_000


@pytest.mark.redis
async def test_a_listing_reads_the_servers_clock_with_its_first_batch(
    real_cluster: InProcessCluster, host_clock: Callable[[int], None]
) -> None:
    """A registry alone (no worker in its process to learn the clock) shows elapsed times
    on the server's clock, learned in the listing's own first write."""
    host_clock(5 * HOUR_MS)
    reg = real_cluster.registry()
    sid = await reg.submit("tac-two", {}, budget={"elapsed_ms": 60_000})
    snap = await reg.status(sid)
    assert 0 <= snap["metrics"]["elapsed_ms"] <= 5_000
    assert 55_000 <= snap["metrics"]["budget_remaining"]["elapsed_ms"] <= 60_000
    assert abs(server_now_ms() - await redis_ms(reg)) < 1_000


def test_server_clock_takes_the_midpoint_of_the_round_trip() -> None:
    clock = records.ServerClock()
    assert clock.learn([b"1000", b"500000"], 10_000, 10_010) == 1_000_500
    assert clock.offset_ms == 1_000_500 - 10_005
    assert clock.learn([7, 0], 0, 0) == 7000
    for bad in (b"OK", [b"1"], None, [b"x", b"y"]):
        with pytest.raises(CorruptState):
            clock.learn(bad, 0, 0)
