"""The strategy side of upstream parity: log entries, token estimates, budget keys and
messages, per-query deadlines, custom metrics, the effects hook, ``llm_json`` and the checks
of ``fork``/``run``/``pipe``; first on a ``Context`` alone, then through a worker (where a
replay on a second worker must ask the same questions, deadlines included).
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable
from typing import Any

import pytest

from coordinator import Finished, Paused, SessionRegistry
from coordinator.errors import BudgetExceeded, InvalidInput, UnknownStrategy
from coordinator.models import LlmQuery
from coordinator.records import server_now_ms
from tests.conftest import FakeCluster
from tests.helpers import shard_keys
from workers import strategy
from workers.context import Context, normalise_budget
from workers.runtime import digest

ON_BOTH_SERVERS = True

Asked = list[list[LlmQuery]]


def make(answers: Callable[[LlmQuery], str] | None = None,
         **kw: Any) -> tuple[Context, Asked]:
    asked: Asked = []

    async def ask(queries: list[LlmQuery]) -> list[str]:
        asked.append(queries)
        return [(answers or (lambda q: f"a:{q.id}:{q.prompt}"))(q) for q in queries]

    return Context(ask, **kw), asked


# -- logs, tokens, budget ------------------------------------------------------------------------


def test_log_entries_have_upstream_fields() -> None:
    ctx, _ = make()
    before = server_now_ms()
    ctx.log("info", "hello")
    ctx.log("warn", 42)  # type: ignore[arg-type]
    (first, second) = ctx.logs
    assert set(first) == {"ts", "level", "source", "message"}
    assert first["ts"] >= before
    assert (first["level"], first["source"], first["message"]) == ("info", "ctx.log", "hello")
    assert second["message"] == "42"


async def test_prompt_tokens_count_system_and_non_ascii() -> None:
    ctx, _ = make(lambda q: "あいう")  # 3 non-ASCII characters: 2 tokens
    await ctx.llm("What is 2+2?", system="Expert")  # 12 ASCII: 3, and 6 ASCII: 2
    assert (ctx.prompt_tokens, ctx.response_tokens) == (5, 2)
    await ctx.llm_batch(["hello あ", {"prompt": "p", "system": None}])  # 2 + 1, and 1
    assert ctx.prompt_tokens == 9


@pytest.mark.parametrize("budget", [
    {"llm_calls": 2, "tokens": 50}, {"max_llm_calls": 2, "max_tokens": 50}])
def test_budget_either_spelling_and_remaining_lists_every_limit(budget: dict[str, int]) -> None:
    assert normalise_budget(budget) == {"max_llm_calls": 2, "max_tokens": 50}
    ctx, _ = make(budget=budget)
    assert ctx.budget_remaining() == {"llm_calls": 2, "tokens": 50, "elapsed_ms": None}
    assert make()[0].budget_remaining() is None


async def test_budget_messages_name_upstream_keys() -> None:
    ctx, _ = make(lambda q: "x" * 40, budget={"max_tokens": 10})
    await ctx.llm("p")  # 1 + 10 tokens: over, and the next ask is refused
    with pytest.raises(BudgetExceeded, match=r"^budget_exceeded: max_tokens \(10\) reached "
                                             r"\(11 used\)$"):
        await ctx.llm("again")
    assert ctx.llm_calls == 1

    late, _ = make(budget={"elapsed_ms": 5}, started_at_ms=server_now_ms() - 60_000)
    with pytest.raises(BudgetExceeded, match=r"^budget_exceeded: max_elapsed_ms \(5ms\) "
                                             r"reached \(\d+ms elapsed\)$"):
        await late.llm("p")
    late.replaying = True  # a replay runs later by design: time is not held against it
    assert await late.llm("p") == "a:q-0:p"
    assert late.budget_remaining() == {"llm_calls": None, "tokens": None, "elapsed_ms": 0}


# -- deadlines -----------------------------------------------------------------------------------


async def test_deadline_becomes_an_absolute_server_time() -> None:
    ctx, asked = make()
    before = server_now_ms()
    await ctx.llm("p", deadline_s=1.5, on_timeout="(no answer)")
    after = server_now_ms()
    q = asked[0][0]
    assert q.deadline_at is not None and before + 1500 <= q.deadline_at <= after + 1500
    assert q.on_timeout == "(no answer)"
    assert q.to_record()["dl"] == q.deadline_at and q.to_record()["to"] == "(no answer)"
    await ctx.llm_batch([{"prompt": "a", "deadline_s": 60}, "b"])
    a, b = asked[1]
    assert a.deadline_at is not None and a.on_timeout is None
    assert b.deadline_at is None


async def test_deadline_is_left_out_of_the_replay_digest() -> None:
    one = LlmQuery(id="q-0", prompt="p", deadline_at=1, on_timeout="d")
    two = LlmQuery(id="q-0", prompt="p", deadline_at=2, on_timeout="d")
    assert digest([one]) == digest([two])
    assert digest([one]) != digest([LlmQuery(id="q-0", prompt="p", deadline_at=1)])


@pytest.mark.parametrize("opts", [
    {"deadline_s": 0}, {"deadline_s": -1}, {"deadline_s": True}, {"deadline_s": "5"},
    {"deadline_s": math.nan}, {"deadline_s": math.inf}, {"deadline_s": 31 * 24 * 3600},
    {"on_timeout": "x"}, {"deadline_s": 5, "on_timeout": 7},
    {"deadline_s": 5, "on_timeout": "\ud800"},
])
async def test_bad_deadlines_are_refused_before_asking(opts: dict[str, Any]) -> None:
    ctx, asked = make()
    with pytest.raises(InvalidInput):
        await ctx.llm("p", **opts)
    with pytest.raises(InvalidInput):
        await ctx.llm_batch([{"prompt": "p", **opts}])
    assert asked == [] and ctx.llm_calls == 0


# -- metrics and effects -------------------------------------------------------------------------


def test_metric_records_json_and_is_kept_on_replay() -> None:
    ctx, _ = make()
    ctx.metric("n", 1)
    value = {"votes": [1, 2]}
    ctx.metric("tally", value)
    value["votes"].append(3)  # recorded as it was, not as it becomes
    ctx.replaying = True
    ctx.metric("n", 2)  # a replay rebuilds the dict: it must not be skipped
    assert ctx.custom == {"n": 2, "tally": {"votes": [1, 2]}}


@pytest.mark.parametrize(("key", "value"), [
    ("", 1), (5, 1), ("k" * 201, 1), ("k", {1, 2}), ("k", math.nan), ("k", "x" * 300_000),
    ("\ud800", 1)])
def test_metric_refuses_what_cannot_be_stored(key: Any, value: Any) -> None:
    ctx, _ = make()
    ctx.metric("kept", True)
    with pytest.raises(InvalidInput):
        ctx.metric(key, value)
    assert ctx.custom == {"kept": True}


def test_metric_total_is_bounded() -> None:
    ctx, _ = make()
    for i in range(3):
        ctx.metric(f"k{i}", "x" * 80_000)
    with pytest.raises(InvalidInput):
        ctx.metric("k3", "x" * 80_000)
    ctx.metric("k0", "small")  # replacing a value with a smaller one is fine
    assert sorted(ctx.custom) == ["k0", "k1", "k2"]


class FakeEffects:
    def __init__(self) -> None:
        self.state = {"store": True}
        self.ran: list[str] = []

    async def side_effect(self, name: str, fn: Callable[[], Any]) -> Any:
        self.ran.append(name)
        return fn()


async def test_effects_are_delegated_or_refused_without_a_worker() -> None:
    bare, _ = make()
    with pytest.raises(InvalidInput, match="side effects and state need a worker"):
        await bare.side_effect("x", lambda: 1)
    with pytest.raises(InvalidInput, match="side effects and state need a worker"):
        _ = bare.state
    effects = FakeEffects()
    ctx, _ = make(effects=effects)
    assert await ctx.side_effect("send", lambda: 42) == 42
    assert ctx.state == {"store": True} and effects.ran == ["send"]


# -- llm_json ------------------------------------------------------------------------------------


async def test_llm_json_first_answer_parsed_without_retry() -> None:
    ctx, asked = make(lambda q: 'Here: {"a": [1, 2]} done')
    assert await ctx.llm_json("json please", system="s") == {"a": [1, 2]}
    assert len(asked) == 1 and asked[0][0].system == "s"


async def test_llm_json_retry_quotes_a_long_answer_clipped() -> None:
    answers = iter(["x" * 20_000, "[1]"])
    ctx, asked = make(lambda q: next(answers))
    assert await ctx.llm_json("json please") == [1]
    retry = asked[1][0].prompt
    assert "x" * 16_000 + "\n..." in retry and "x" * 16_001 not in retry
    assert retry.endswith("Original request:\njson please")
    assert [e["level"] for e in ctx.logs] == ["warn"]


# -- composition checks ---------------------------------------------------------------------------


@strategy("tpar-one")
async def one(ctx: Context, tag: str = "one", **_: Any) -> str:
    return await ctx.llm(f"{tag}?")


@strategy("tpar-two-asks-at-once")
async def two_at_once(ctx: Context, **_: Any) -> list[str]:
    return list(await asyncio.gather(ctx.llm("a"), ctx.llm("b")))


@strategy("tpar-nested")
async def nested(ctx: Context, **_: Any) -> Any:
    return await ctx.fork(["tpar-one", "tpar-one"], {"tag": "inner"})


async def test_fork_checks_its_arguments() -> None:
    ctx, asked = make()
    for bad in ([], "tpar-one", [""], [1]):
        with pytest.raises(InvalidInput):
            await ctx.fork(bad)  # type: ignore[arg-type]
    with pytest.raises(InvalidInput):
        await ctx.fork(["tpar-one"], on_error="ignore")  # type: ignore[arg-type]
    with pytest.raises(InvalidInput):
        await ctx.fork(["tpar-one"], {"x": {1, 2}})
    with pytest.raises(InvalidInput):
        await ctx.fork(["tpar-one"] * 65)
    with pytest.raises(UnknownStrategy):
        await ctx.fork(["tpar-one", "tpar-missing"])
    with pytest.raises(UnknownStrategy):
        await ctx.run("tpar-missing")
    with pytest.raises(InvalidInput):
        await ctx.pipe([])
    assert asked == []


async def test_fork_child_asking_twice_at_once_gets_an_error_entry() -> None:
    ctx, _ = make()
    entries = await ctx.fork(["tpar-two-asks-at-once", "tpar-one"])
    assert entries[0]["ok"] is False and "concurrent ctx.llm" in entries[0]["error"]
    assert entries[1] == {"strategy": "tpar-one", "result": "a:f-1-0:one?", "ok": True}


@strategy("tpar-orphan")
async def orphan(ctx: Context, **_: Any) -> None:
    asking = asyncio.ensure_future(ctx.llm("never read"))
    await asyncio.sleep(0)  # the other coroutine asks, then this one fails
    assert not asking.done()
    raise ValueError("gone")


async def test_fork_does_not_ask_for_a_child_that_ended() -> None:
    ctx, asked = make()
    entries = await ctx.fork(["tpar-orphan", "tpar-one"])
    assert entries[0] == {"strategy": "tpar-orphan", "error": "ValueError: gone", "ok": False}
    # the failed child's stray ask is not put to the host: nobody would read its answer
    assert [[(q.id, q.prompt) for q in r] for r in asked] == [[("f-1-0", "one?")]]


async def test_nested_fork_asks_through_the_outer_one() -> None:
    ctx, asked = make()
    entries = await ctx.fork(["tpar-nested", "tpar-one"], on_error="fail")
    # the inner fork's round is child 0's one ask: renamed again by the outer fork
    assert [[(q.id, q.prompt) for q in r] for r in asked] == [
        [("f-0-0", "inner?"), ("f-0-1", "inner?"), ("f-1-0", "one?")]]
    assert entries[0]["result"] == [
        {"strategy": "tpar-one", "result": "a:f-0-0:inner?", "ok": True},
        {"strategy": "tpar-one", "result": "a:f-0-1:inner?", "ok": True}]
    assert ctx.llm_calls == 3  # each question counted once


@strategy("tpar-slow-logger")
async def slow_logger(ctx: Context, tag: str = "x", **_: Any) -> str:
    ctx.log("info", f"{tag} before")
    for _turn in range(5):  # as a side effect's I/O would, lets the loop run others
        await asyncio.sleep(0)
    ctx.log("info", f"{tag} after")
    answer = await ctx.llm(f"{tag}?")
    ctx.log("info", f"{tag} got {answer}")
    return answer


@strategy("tpar-quick-logger")
async def quick_logger(ctx: Context, **_: Any) -> str:
    ctx.log("info", "quick before")
    answer = await ctx.llm("quick?")
    ctx.log("info", f"quick got {answer}")
    return answer


async def test_fork_children_take_turns_in_child_order() -> None:
    """Between two rounds each child runs alone, in child order: a child awaiting other
    things (I/O) does not let its siblings run in between, so everything children do is
    in the same order on a replay."""
    ctx, _ = make(lambda q: q.id)
    await ctx.fork(["tpar-slow-logger", "tpar-quick-logger"])
    assert [e["message"] for e in ctx.logs] == [
        "x before", "x after", "quick before", "x got f-0-0", "quick got f-1-0"]


async def test_fork_counts_each_question_once_and_logs_into_the_parent() -> None:
    ctx, _ = make(budget={"llm_calls": 10})
    await ctx.fork(["tpar-one", "tpar-one"])
    assert ctx.llm_calls == 2
    assert ctx.budget_remaining() == {"llm_calls": 8, "tokens": None, "elapsed_ms": None}


# -- through a worker ----------------------------------------------------------------------------


@strategy("tpar-deadline")
async def with_deadline(ctx: Context, **_: Any) -> list[str]:
    ctx.log("info", "asking with a deadline")
    first = await ctx.llm("first", system="sys", deadline_s=3600, on_timeout="late")
    second = await ctx.llm_batch([{"prompt": "x", "deadline_s": 7200}, "y"])
    return [first, *second]


async def test_deadlines_and_logs_through_a_worker_and_a_replay(
        fake_cluster: FakeCluster, registry: SessionRegistry) -> None:
    first_worker = await fake_cluster.worker()
    before = server_now_ms()
    sid, event = await registry.start_execution("tpar-deadline", {})
    assert isinstance(event, Paused)
    q = event.queries[0]
    assert q.deadline_at is not None and q.deadline_at >= before + 3_600_000
    assert q.on_timeout == "late"
    key = (await shard_keys(registry, sid)).session(sid).session
    assert int(await registry.client.hget(key, "qdl")) == q.deadline_at

    await fake_cluster.stop_worker(first_worker)
    second = await fake_cluster.worker()
    event = await registry.feed_response(sid, "q-0", "one")  # replayed: deadline differs
    assert isinstance(event, Paused) and second.stats.replays == 1
    x, y = event.queries
    assert x.deadline_at is not None and y.deadline_at is None
    assert int(await registry.client.hget(key, "qdl")) == x.deadline_at
    await registry.feed_response(sid, "q-1", "B")
    done = await registry.feed_response(sid, "q-0", "A")
    assert isinstance(done, Finished) and done.result == ["one", "A", "B"]
    auto = done.metrics["auto"]
    # "first" + "sys" (2 + 1 tokens, 8 chars), then "x" and "y" (1 + 1, 2 chars)
    assert auto["prompt_tokens"]["tokens"] == 5
    assert auto["total_prompt_chars"] == 10
    logs = (await registry.status(sid))["metrics"]["recent_logs"]
    assert [(e["level"], e["source"], e["message"]) for e in logs] == [
        ("info", "ctx.log", "asking with a deadline")]
