"""Composition: ``ctx.fork``, ``ctx.run``, ``ctx.pipe``, ``ctx.metric`` and ``ctx.llm_json``,
each driven through a registry and in-process workers, and each handed over mid-way to a
second worker that has nothing in memory: it replays the journal and must ask the very same
rounds (ids, prompts) and reach the very same result as the first run would.
"""

from __future__ import annotations

import asyncio
from typing import Any

from coordinator import Finished, Paused, SessionRegistry
from coordinator.models import FeedResult
from coordinator.records import SessionRecord
from tests.conftest import FakeCluster
from tests.helpers import shard_keys
from workers import strategy
from workers.context import Context

ON_BOTH_SERVERS = True

Round = list[tuple[str, str]]

# -- test strategies (names unique to this module) -------------------------------------------


@strategy("tcmp-steps")
async def steps(ctx: Context, n: int = 2, tag: str = "s", width: int = 1,
                dawdle: int = 0, **_: Any) -> list[str]:
    """``n`` rounds of ``width`` questions each; ``dawdle`` yields to the loop before each
    ask, so this child asks later in real time than a sibling that does not."""
    answers: list[str] = []
    for i in range(n):
        for _turn in range(dawdle):
            await asyncio.sleep(0)
        if width == 1:
            answers.append(await ctx.llm(f"{tag} {i}"))
        else:
            answers += await ctx.llm_batch([f"{tag} {i}.{j}" for j in range(width)])
    return answers


@strategy("tcmp-boom")
async def boom(ctx: Context, asks: int = 1, **_: Any) -> None:
    last = ""
    for i in range(asks):
        last = await ctx.llm(f"boom {i}")
    raise ValueError(f"boom after {last}")


@strategy("tcmp-fork")
async def forking(ctx: Context, children: list[str], child_input: dict[str, Any],
                  on_error: str = "skip", **_: Any) -> Any:
    return await ctx.fork(children, child_input, on_error=on_error)  # type: ignore[arg-type]


@strategy("tcmp-budgeted")
async def budgeted(ctx: Context, tag: str = "b", width: int = 1, **_: Any) -> dict[str, Any]:
    """Asks until the shared budget refuses it, and says so."""
    answers: list[str] = []
    try:
        for i in range(10):
            answers += await ctx.llm_batch([f"{tag} {i}.{j}" for j in range(width)])
    except Exception as exc:
        return {"answers": answers, "stopped": str(exc)}
    return {"answers": answers, "stopped": None}


@strategy("tcmp-runner")
async def runner(ctx: Context, **_: Any) -> dict[str, Any]:
    first = await ctx.llm("before")
    inner = await ctx.run("tcmp-steps", {"n": 2, "tag": "inner"})
    try:
        await ctx.run("tcmp-boom", {"asks": 1})
    except ValueError as exc:
        caught = str(exc)
    last = await ctx.llm(f"after {inner}")
    return {"first": first, "inner": inner, "caught": caught, "last": last}


@strategy("tcmp-wrap")
async def wrap(ctx: Context, task: str, **_: Any) -> dict[str, str]:
    return {"wrapped": await ctx.llm(f"wrap {task}")}


@strategy("tcmp-echo")
async def echo(ctx: Context, task: str, **_: Any) -> str:
    return await ctx.llm(f"echo {task}")


@strategy("tcmp-pipe")
async def piping(ctx: Context, stages: list[str], task: str, **_: Any) -> Any:
    return await ctx.pipe(stages, {"task": task, "lang": "en"})


@strategy("tcmp-metrics")
async def metrics(ctx: Context, **_: Any) -> str:
    ctx.metric("phase", "start")
    a = await ctx.llm("one")
    ctx.metric("answers", [a])
    b = await ctx.llm("two")
    ctx.metric("answers", [a, b])
    ctx.metric("phase", "done")
    ctx.metric("score", {"value": 0.5, "n": 2})
    return a + b


@strategy("tcmp-json")
async def wants_json(ctx: Context, **_: Any) -> Any:
    return await ctx.llm_json("give me json", max_tokens=50)


# -- driving ---------------------------------------------------------------------------------


def answer(prompt: str, qid: str) -> str:
    return f"<{prompt}|{qid}>"


async def feed_round(registry: SessionRegistry, sid: str, event: Paused,
                     answers: dict[str, str] | None = None) -> FeedResult:
    """Answer every question of the round (answers by id, else ``answer``), last to first:
    the strategies must see them in their own order whatever order they were fed in."""
    result: FeedResult | None = None
    for q in reversed(event.queries):
        text = (answers or {}).get(q.id) or answer(q.prompt, q.id)
        result = await registry.feed_response(sid, q.id, text, round=event.round)
    assert result is not None
    return result


async def handed_over(
    cluster: FakeCluster, registry: SessionRegistry, name: str, inp: dict[str, Any], *,
    after: int = 1, budget: dict[str, int] | None = None,
    answers: dict[int, dict[str, str]] | None = None,
) -> tuple[list[Round], Finished, list[Paused]]:
    """Run ``name`` on one worker for ``after`` rounds, stop that worker, and finish on a
    fresh one (which must replay); the rounds asked and the end."""
    first = await cluster.worker()
    sid, event = await registry.start_execution(name, inp, budget=budget)
    rounds: list[Round] = []
    pauses: list[Paused] = []
    second = None
    while isinstance(event, Paused):
        rounds.append([(q.id, q.prompt) for q in event.queries])
        pauses.append(event)
        if len(rounds) == after + 1:
            await cluster.stop_worker(first)
            second = await cluster.worker()
        event = await feed_round(registry, sid, event, (answers or {}).get(len(rounds)))
    assert isinstance(event, Finished), event
    assert second is not None, f"the session ended after {len(rounds)} round(s)"
    assert second.stats.replays == 1
    return rounds, event, pauses


# -- fork --------------------------------------------------------------------------------------


async def test_fork_merges_children_rounds_in_child_order(
        fake_cluster: FakeCluster, registry: SessionRegistry) -> None:
    # both children get the same input: 2 rounds of 2 questions each, merged: 4 a round,
    # each answer routed back to the child that asked it
    rounds, done, _ = await handed_over(fake_cluster, registry, "tcmp-fork", {
        "children": ["tcmp-steps", "tcmp-steps"],
        "child_input": {"n": 2, "width": 2, "dawdle": 3, "tag": "A"},
    })
    assert rounds == [
        [("f-0-0", "A 0.0"), ("f-0-1", "A 0.1"), ("f-1-0", "A 0.0"), ("f-1-1", "A 0.1")],
        [("f-0-2", "A 1.0"), ("f-0-3", "A 1.1"), ("f-1-2", "A 1.0"), ("f-1-3", "A 1.1")],
    ]
    assert done.result == [
        {"strategy": "tcmp-steps", "ok": True, "result": [
            answer("A 0.0", "f-0-0"), answer("A 0.1", "f-0-1"),
            answer("A 1.0", "f-0-2"), answer("A 1.1", "f-0-3")]},
        {"strategy": "tcmp-steps", "ok": True, "result": [
            answer("A 0.0", "f-1-0"), answer("A 0.1", "f-1-1"),
            answer("A 1.0", "f-1-2"), answer("A 1.1", "f-1-3")]},
    ]
    assert done.metrics["auto"]["llm_calls"] == 8


async def test_fork_children_with_different_round_counts(
        fake_cluster: FakeCluster, registry: SessionRegistry) -> None:
    """Three children: 3 rounds (dawdling), 1 round, 2 rounds: each round holds only the
    children still asking, in child order, numbered per child across the fork."""
    rounds, done, _ = await handed_over(fake_cluster, registry, "tcmp-mixed", {})
    assert rounds == [
        [("f-0-0", "x 0"), ("f-1-0", "y 0.0"), ("f-1-1", "y 0.1"), ("f-2-0", "z 0")],
        [("f-0-1", "x 1"), ("f-2-1", "z 1")],
        [("f-0-2", "x 2")],
    ]
    assert done.result == [
        {"strategy": "tcmp-x", "ok": True,
         "result": [answer("x 0", "f-0-0"), answer("x 1", "f-0-1"), answer("x 2", "f-0-2")]},
        {"strategy": "tcmp-y", "ok": True,
         "result": [answer("y 0.0", "f-1-0"), answer("y 0.1", "f-1-1")]},
        {"strategy": "tcmp-z", "ok": True,
         "result": [answer("z 0", "f-2-0"), answer("z 1", "f-2-1")]},
    ]


@strategy("tcmp-mixed")
async def mixed(ctx: Context, **_: Any) -> Any:
    """Three differently shaped children (fork gives every child the same input, so each
    shape is a strategy of its own)."""
    return await ctx.fork(["tcmp-x", "tcmp-y", "tcmp-z"])


@strategy("tcmp-x")
async def child_x(ctx: Context, **_: Any) -> list[str]:
    return await steps(ctx, n=3, tag="x", dawdle=5)


@strategy("tcmp-y")
async def child_y(ctx: Context, **_: Any) -> list[str]:
    return await steps(ctx, n=1, tag="y", width=2)


@strategy("tcmp-z")
async def child_z(ctx: Context, **_: Any) -> list[str]:
    return await steps(ctx, n=2, tag="z")


async def test_fork_on_error_skip_keeps_the_others_going(
        fake_cluster: FakeCluster, registry: SessionRegistry) -> None:
    rounds, done, _ = await handed_over(fake_cluster, registry, "tcmp-fork", {
        "children": ["tcmp-boom", "tcmp-steps"],
        "child_input": {"asks": 2, "n": 3, "tag": "ok"},
    })
    assert rounds == [
        [("f-0-0", "boom 0"), ("f-1-0", "ok 0")],
        [("f-0-1", "boom 1"), ("f-1-1", "ok 1")],
        [("f-1-2", "ok 2")],
    ]
    assert done.result == [
        {"strategy": "tcmp-boom", "ok": False,
         "error": f"ValueError: boom after {answer('boom 1', 'f-0-1')}"},
        {"strategy": "tcmp-steps", "ok": True, "result": [
            answer("ok 0", "f-1-0"), answer("ok 1", "f-1-1"), answer("ok 2", "f-1-2")]},
    ]


async def test_fork_on_error_fail_fails_the_parent_with_the_first_error(
        fake_cluster: FakeCluster, registry: SessionRegistry) -> None:
    rounds, done, _ = await handed_over(fake_cluster, registry, "tcmp-fork", {
        "children": ["tcmp-steps", "tcmp-boom", "tcmp-boom"],
        "child_input": {"asks": 2, "n": 3, "tag": "ok"}, "on_error": "fail",
    })
    # both boom children fail after round 2; the fork asks nothing more, and the first
    # failing child by position (1, not 2) is the parent's error
    assert rounds == [
        [("f-0-0", "ok 0"), ("f-1-0", "boom 0"), ("f-2-0", "boom 0")],
        [("f-0-1", "ok 1"), ("f-1-1", "boom 1"), ("f-2-1", "boom 1")],
    ]
    assert done.error_type == "strategy_error"
    assert done.error == f"ValueError: boom after {answer('boom 1', 'f-1-1')}"


async def test_fork_children_share_the_parent_budget(
        fake_cluster: FakeCluster, registry: SessionRegistry) -> None:
    # 4 calls for everyone. Round 1: child 0 takes 2, child 1 takes 1 (3 used). Round 2:
    # child 0 wants 2 more (refused: it stops), child 1 gets its 4th. Round 3: child 1 is
    # refused and stops too. Refusals go in child order, so the replay refuses the same.
    rounds, done, _ = await handed_over(fake_cluster, registry, "tcmp-shared", {},
                                        budget={"llm_calls": 4})
    assert rounds == [
        [("f-0-0", "w 0.0"), ("f-0-1", "w 0.1"), ("f-1-0", "n 0.0")],
        [("f-1-1", "n 1.0")],
    ]
    assert done.result == [
        {"strategy": "tcmp-wide", "ok": True, "result": {
            "answers": [answer("w 0.0", "f-0-0"), answer("w 0.1", "f-0-1")],
            "stopped": "budget_exceeded: max_llm_calls (4) would be passed (3 used, 2 more "
                       "asked at once)"}},
        {"strategy": "tcmp-narrow", "ok": True, "result": {
            "answers": [answer("n 0.0", "f-1-0"), answer("n 1.0", "f-1-1")],
            "stopped": "budget_exceeded: max_llm_calls (4) reached (4 used)"}},
    ]
    assert done.metrics["auto"]["llm_calls"] == 4
    assert done.metrics["auto"]["budget"] == {"max_llm_calls": 4}


@strategy("tcmp-shared")
async def shared(ctx: Context, **_: Any) -> Any:
    return await ctx.fork(["tcmp-wide", "tcmp-narrow"])


@strategy("tcmp-wide")
async def wide(ctx: Context, **_: Any) -> Any:
    return await budgeted(ctx, tag="w", width=2)


@strategy("tcmp-narrow")
async def narrow(ctx: Context, **_: Any) -> Any:
    return await budgeted(ctx, tag="n", width=1)


# -- run and pipe ----------------------------------------------------------------------------


async def test_run_calls_a_strategy_inline(fake_cluster: FakeCluster,
                                           registry: SessionRegistry) -> None:
    rounds, done, _ = await handed_over(fake_cluster, registry, "tcmp-runner", {}, after=2)
    inner = [answer("inner 0", "q-0"), answer("inner 1", "q-0")]
    assert rounds == [[("q-0", "before")], [("q-0", "inner 0")], [("q-0", "inner 1")],
                      [("q-0", "boom 0")], [("q-0", f"after {inner}")]]
    assert done.result == {
        "first": answer("before", "q-0"), "inner": inner,
        "caught": f"boom after {answer('boom 0', 'q-0')}",
        "last": answer(f"after {inner}", "q-0"),
    }


async def test_pipe_hands_each_result_on_as_the_next_task(
        fake_cluster: FakeCluster, registry: SessionRegistry) -> None:
    rounds, done, _ = await handed_over(fake_cluster, registry, "tcmp-pipe", {
        "stages": ["tcmp-wrap", "tcmp-echo", "tcmp-echo"], "task": "t0"})
    first = {"wrapped": answer("wrap t0", "q-0")}
    as_json = '{"wrapped":"' + answer("wrap t0", "q-0") + '"}'  # compact JSON, as upstream
    second = answer(f"echo {as_json}", "q-0")
    third = answer(f"echo {second}", "q-0")
    assert rounds == [[("q-0", "wrap t0")], [("q-0", f"echo {as_json}")],
                      [("q-0", f"echo {second}")]]
    assert done.result == {
        "task": second, "lang": "en", "result": third,
        "pipe_history": [{"strategy": "tcmp-wrap", "result": first},
                         {"strategy": "tcmp-echo", "result": second},
                         {"strategy": "tcmp-echo", "result": third}],
    }


# -- metrics and JSON answers -------------------------------------------------------------------


async def test_metrics_land_in_stats_custom(fake_cluster: FakeCluster,
                                            registry: SessionRegistry) -> None:
    rounds, done, _ = await handed_over(fake_cluster, registry, "tcmp-metrics", {})
    assert rounds == [[("q-0", "one")], [("q-0", "two")]]
    a, b = answer("one", "q-0"), answer("two", "q-0")
    custom = {"phase": "done", "answers": [a, b], "score": {"value": 0.5, "n": 2}}
    assert done.metrics["custom"] == custom
    assert done.result == a + b


async def test_metrics_are_stored_with_each_pause(fake_cluster: FakeCluster,
                                                 registry: SessionRegistry) -> None:
    """The whole dict is written with every commit: a paused session's record holds what
    the strategy recorded so far (its ``stats().custom``)."""
    await fake_cluster.worker()
    sid, event = await registry.start_execution("tcmp-metrics", {})
    assert isinstance(event, Paused)
    assert (await _record(registry, sid)).stats()["custom"] == {"phase": "start"}
    event = await feed_round(registry, sid, event)
    assert (await _record(registry, sid)).stats()["custom"] == {
        "phase": "start", "answers": [answer("one", "q-0")]}


async def _record(registry: SessionRegistry, sid: str) -> SessionRecord:
    key = (await shard_keys(registry, sid)).session(sid).session
    return SessionRecord.from_hash(sid, await registry.client.hgetall(key))


async def test_llm_json_asks_once_more_when_the_answer_is_not_json(
        fake_cluster: FakeCluster, registry: SessionRegistry) -> None:
    rounds, done, pauses = await handed_over(
        fake_cluster, registry, "tcmp-json", {},
        answers={1: {"q-0": "Sure! Here you go: name=x"},
                 2: {"q-0": 'Fixed:\n```json\n{"name": "x", "n": [1, 2]}\n```'}})
    assert rounds[0] == [("q-0", "give me json")]
    retry = pauses[1].queries[0]
    assert retry.prompt == ("The previous response was not valid JSON.\n\nPrevious output:\n"
                            "Sure! Here you go: name=x\n\nFix the JSON and return ONLY valid "
                            "JSON.\n\nOriginal request:\ngive me json")
    assert retry.system == "Output ONLY valid JSON. No markdown fences, no explanation."
    assert retry.max_tokens == 50
    assert done.result == {"name": "x", "n": [1, 2]}


async def test_llm_json_fails_after_the_retry(fake_cluster: FakeCluster,
                                              registry: SessionRegistry) -> None:
    rounds, done, _ = await handed_over(
        fake_cluster, registry, "tcmp-json", {},
        answers={1: {"q-0": "no"}, 2: {"q-0": "still no {json"}})
    assert len(rounds) == 2
    assert done.error_type == "invalid_input"
    assert done.error is not None and "llm_json" in done.error and "still no" in done.error
