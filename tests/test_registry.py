"""The host API (``SessionRegistry``) end to end on fakeredis, with in-process workers.

Every strategy here is deterministic and its result is a pure function of its answers, so a
test knows the exact result to expect. Slow steps are made with ``asyncio.Event`` gates the
test opens itself; nothing here sleeps to synchronise.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import Iterator
from typing import Any

import pytest

from coordinator import (
    Accepted,
    AlreadyResponded,
    Finished,
    InvalidInput,
    InvalidTransition,
    NoPendingQuery,
    NotFound,
    Paused,
    PayloadTooLarge,
    Phase,
    SessionError,
    SessionRegistry,
    StaleRound,
    UnknownQuery,
    UnknownStrategy,
    WaitTimeout,
    snapshot,
)
from coordinator.models import LlmQuery
from tests.conftest import FakeCluster
from tests.helpers import assert_eventually, shard_keys
from workers import strategy
from workers.context import Context

#: The core specification: every test below runs on fakeredis and on a real redis-server.
ON_BOTH_SERVERS = True
#: ... and on a namespace of 4 shards (coordinator.shards), on fakeredis.
SHARDED_TOO = True
#: ... and on a real Redis Cluster (3 primaries, 12 shards): the registry contract.
ON_CLUSTER_TOO = True

# -- test strategies (names unique to this module) --------------------------------------------

class Gate:
    """The strategy sets ``entered`` on reaching the gate, then waits until ``set()``."""

    def __init__(self) -> None:
        self.entered = asyncio.Event()
        self.opened = asyncio.Event()

    def set(self) -> None:
        self.opened.set()

    async def pass_(self) -> None:
        self.entered.set()
        await self.opened.wait()


GATES: dict[str, Gate] = {}


@pytest.fixture(autouse=True)
def _open_gates_at_teardown() -> Iterator[None]:
    try:
        yield
    finally:
        for gate in GATES.values():
            gate.set()
        GATES.clear()


def new_gate(tag: str) -> Gate:
    GATES[tag] = Gate()
    return GATES[tag]


@strategy("treg-ask")
async def ask_one(
    ctx: Context,
    prompt: str = "the question",
    system: str | None = None,
    max_tokens: int = 1024,
    grounded: bool = False,
    underspecified: bool = False,
    **_: Any,
) -> dict[str, Any]:
    answer = await ctx.llm(prompt, system=system, max_tokens=max_tokens, grounded=grounded,
                           underspecified=underspecified)
    return {"answer": answer}


@strategy("treg-batch")
async def batch_then_final(
    ctx: Context, items: list[Any] | None = None, **_: Any
) -> dict[str, Any]:
    """One batch, then one question that quotes the batch's answers in the order received."""
    answers = await ctx.llm_batch(items or ["a", "b", "c"])
    final = await ctx.llm("final: " + " | ".join(answers))
    return {"batch": answers, "final": final}


@strategy("treg-rounds")
async def rounds_of(
    ctx: Context, rounds: int = 3, width: int = 1, logs: int = 0, progress: bool = False,
    **_: Any,
) -> list[list[str]]:
    out = []
    for r in range(rounds):
        for i in range(logs):
            ctx.log("info", f"r{r} log {i}")
        if progress:
            ctx.progress(r + 1, rounds, f"round {r}")
        out.append(await ctx.llm_batch([f"r{r} i{i}" for i in range(width)]))
    return out


@strategy("treg-gated")
async def gated(ctx: Context, tag: str = "", at: int = 0, **_: Any) -> dict[str, Any]:
    """Waits on gate ``tag`` before its question (``at`` 0) or after the answer (``at`` 1)."""
    if at == 0 and not ctx.replaying:
        await GATES[tag].pass_()
    answer = await ctx.llm(f"gated {tag}")
    if at == 1:
        await GATES[tag].pass_()
    return {"answer": answer}


@strategy("treg-fail")
async def fail_after_one(ctx: Context, **_: Any) -> None:
    answer = await ctx.llm("go?")
    raise RuntimeError(f"exploded on {answer}")


@strategy("treg-const")
async def const(ctx: Context, value: Any = None, **_: Any) -> Any:
    return value


# -- helpers ----------------------------------------------------------------------------------


def now_ms() -> int:
    return time.time_ns() // 1_000_000


async def paused(reg: SessionRegistry, name: str, inp: dict[str, Any] | None = None,
                 **kw: Any) -> tuple[str, Paused]:
    sid, event = await reg.start_execution(name, inp, **kw)
    assert isinstance(event, Paused), event
    return sid, event


async def subscribed(reg: SessionRegistry, sid: str) -> None:
    """Wait until someone listens on the session's event channel (a waiter is blocked)."""
    channel = reg.keys.session(sid).channel

    async def listening() -> bool:  # asked of the node owning the channel's slot
        _, n = await reg.redis.execute("PUBSUB", "SHARDNUMSUB", channel)
        return int(n) >= 1

    await assert_eventually(listening, timeout=5, message=f"nobody subscribed to {channel}")


#: algocline's ``stats.auto`` keys (``stats`` is ``{"auto": ..., "custom": ...}``).
STATS_KEYS = {
    "elapsed_ms", "llm_calls", "pauses", "rounds", "total_prompt_chars",
    "total_response_chars", "prompt_tokens", "response_tokens", "total_tokens",
}


def text_of(exchange: dict[str, Any]) -> dict[str, Any]:
    """An exchange of the conversation history without its tokens and times."""
    return {k: exchange[k] for k in ("query_id", "prompt", "response", "round")}


def est(text: str) -> int:
    """algocline's token estimate: ASCII four characters a token, other text 1.5."""
    ascii_chars = sum(c.isascii() for c in text)
    return math.ceil(ascii_chars / 4) + math.ceil((len(text) - ascii_chars) * 2 / 3)

# -- JSON shapes of real sessions -------------------------------------------------------------


async def test_single_query_shape_without_flags(registry: SessionRegistry, worker: Any) -> None:
    sid, event = await paused(registry, "treg-ask", {"prompt": "What is 2+2?"})
    assert event.to_json(sid) == {
        "status": "needs_response", "session_id": sid, "query_id": "q-0",
        "prompt": "What is 2+2?", "system": None, "max_tokens": 1024,
    }


@pytest.mark.parametrize(
    ("flags", "extra"),
    [
        ({"grounded": True}, {"grounded": True}),
        ({"underspecified": True}, {"underspecified": True}),
        ({"grounded": True, "underspecified": True}, {"grounded": True, "underspecified": True}),
        ({"grounded": False, "underspecified": False}, {}),
    ],
)
async def test_single_query_shape_flags_only_when_true(
    registry: SessionRegistry, worker: Any, flags: dict[str, bool], extra: dict[str, bool]
) -> None:
    sid, event = await paused(registry, "treg-ask",
                              {"prompt": "p", "system": "be brief", "max_tokens": 77, **flags})
    assert event.to_json(sid) == {
        "status": "needs_response", "session_id": sid, "query_id": "q-0", "prompt": "p",
        "system": "be brief", "max_tokens": 77, **extra,
    }


async def test_batch_shape_lists_queries_in_order(registry: SessionRegistry, worker: Any) -> None:
    items = ["first", {"prompt": "second", "system": "s2", "max_tokens": 5, "grounded": True},
             {"prompt": "third", "underspecified": True}]
    sid, event = await paused(registry, "treg-batch", {"items": items})
    assert event.to_json(sid) == {
        "status": "needs_response",
        "session_id": sid,
        "queries": [
            {"id": "q-0", "prompt": "first", "system": None, "max_tokens": 1024},
            {"id": "q-1", "prompt": "second", "system": "s2", "max_tokens": 5, "grounded": True},
            {"id": "q-2", "prompt": "third", "system": None, "max_tokens": 1024,
             "underspecified": True},
        ],
    }
    json.dumps(event.to_json(sid))  # what a host serialises


async def test_accepted_and_completed_shapes(registry: SessionRegistry, worker: Any) -> None:
    sid, _ = await paused(registry, "treg-batch", {"items": ["aaaa", "bbbbbbbb"]})
    accepted = await registry.feed_response(sid, "q-0", "xxxx")
    assert accepted == Accepted(1)
    assert accepted.to_json(sid) == {"status": "accepted", "remaining": 1}
    nxt = await registry.feed_response(sid, "q-1", "yy")
    assert isinstance(nxt, Paused)
    done = await registry.feed_response(sid, "q-0", "zzz")
    assert isinstance(done, Finished)
    out = done.to_json(sid)
    assert set(out) == {"status", "result", "stats"}
    assert out["status"] == "completed"
    assert out["result"] == {"batch": ["xxxx", "yy"], "final": "zzz"}
    assert set(out["stats"]) == {"auto", "custom"} and out["stats"]["custom"] == {}
    stats = out["stats"]["auto"]
    assert set(stats) == STATS_KEYS
    final_prompt = "final: xxxx | yy"
    assert stats["llm_calls"] == 3
    assert stats["pauses"] == 2
    assert stats["rounds"] == 2
    assert stats["total_prompt_chars"] == 4 + 8 + len(final_prompt)
    assert stats["total_response_chars"] == 4 + 2 + 3
    assert stats["prompt_tokens"] == {"tokens": 1 + 2 + est(final_prompt),
                                      "source": "estimated"}
    assert stats["response_tokens"] == {"tokens": 1 + 1 + 1, "source": "estimated"}
    assert stats["total_tokens"] == {"tokens": 1 + 2 + est(final_prompt) + 3,
                                     "source": "estimated"}


async def test_usage_replaces_the_estimates_and_says_provided(registry: SessionRegistry,
                                                              worker: Any) -> None:
    """algocline's ``usage``: both counts honoured; a count the host gave for every call is
    ``provided``, one it gave for some calls only stays ``estimated`` (the weakest source)."""
    items = ["aaaa", "日本語のテキスト"]
    sid, _ = await paused(registry, "treg-batch", {"items": items})
    await registry.feed_response(sid, "q-0", "x", {"prompt_tokens": 10, "completion_tokens": 7})
    await registry.feed_response(sid, "q-1", "y", {"prompt_tokens": 20, "completion_tokens": 8})
    done = await registry.feed_response(sid, "q-0", "zz", {"completion_tokens": 5})
    assert isinstance(done, Finished)
    auto = done.to_json(sid)["stats"]["auto"]
    final = est("final: x | y")
    assert auto["prompt_tokens"] == {"tokens": 10 + 20 + final, "source": "estimated"}
    assert auto["response_tokens"] == {"tokens": 7 + 8 + 5, "source": "provided"}
    assert auto["total_tokens"] == {"tokens": 30 + final + 20, "source": "estimated"}

    sid, _ = await paused(registry, "treg-ask", {"prompt": "日本"})
    done = await registry.feed_response(sid, "q-0", "a",
                                        {"prompt_tokens": 3, "completion_tokens": 1})
    assert isinstance(done, Finished)
    auto = done.to_json(sid)["stats"]["auto"]
    assert auto["prompt_tokens"] == {"tokens": 3, "source": "provided"}
    assert auto["total_tokens"] == {"tokens": 4, "source": "provided"}


async def test_error_shape(registry: SessionRegistry, worker: Any) -> None:
    sid, _ = await paused(registry, "treg-fail")
    event = await registry.feed_response(sid, "q-0", "now")
    assert isinstance(event, Finished)
    assert event.state is Phase.FAILED
    assert event.to_json(sid) == {"status": "error", "error": "RuntimeError: exploded on now",
                                  "type": "strategy_error"}


async def test_cancelled_shape(registry: SessionRegistry, worker: Any) -> None:
    sid, _ = await paused(registry, "treg-ask")
    event = await registry.cancel(sid)
    out = event.to_json(sid)
    assert set(out) == {"status", "stats"}
    assert out["status"] == "cancelled"
    assert set(out["stats"]["auto"]) == STATS_KEYS
    assert out["stats"]["auto"]["llm_calls"] == 1


async def test_session_without_questions_completes_at_start(
    registry: SessionRegistry, worker: Any
) -> None:
    sid, event = await registry.start_execution("treg-const", {"value": {"k": [1, "two"]}})
    assert isinstance(event, Finished)
    assert event.to_json(sid)["result"] == {"k": [1, "two"]}


# -- batches ----------------------------------------------------------------------------------


async def test_batch_fed_out_of_order_resumes_with_answers_in_query_order(
    registry: SessionRegistry, worker: Any
) -> None:
    sid, event = await paused(registry, "treg-batch")
    assert [q.id for q in event.queries] == ["q-0", "q-1", "q-2"]
    assert await registry.feed_response(sid, "q-2", "C") == Accepted(2)
    assert await registry.feed_response(sid, "q-0", "A") == Accepted(1)
    nxt = await registry.feed_response(sid, "q-1", "B")
    assert nxt == Paused((LlmQuery(id="q-0", prompt="final: A | B | C"),))
    done = await registry.feed_response(sid, "q-0", "F")
    assert isinstance(done, Finished)
    assert done.result == {"batch": ["A", "B", "C"], "final": "F"}


async def test_query_ids_restart_each_round(registry: SessionRegistry, worker: Any) -> None:
    sid, event = await paused(registry, "treg-rounds", {"rounds": 2, "width": 2})
    assert [q.id for q in event.queries] == ["q-0", "q-1"]
    await registry.feed_response(sid, "q-1", "b")
    event = await registry.feed_response(sid, "q-0", "a")
    assert isinstance(event, Paused)
    assert [(q.id, q.prompt) for q in event.queries] == [("q-0", "r1 i0"), ("q-1", "r1 i1")]


async def test_pauses_carry_their_round(registry: SessionRegistry, worker: Any) -> None:
    sid, event = await paused(registry, "treg-rounds", {"rounds": 2, "width": 1})
    assert event.round == 1
    nxt = await registry.feed_response(sid, "q-0", "a")
    assert isinstance(nxt, Paused) and nxt.round == 2
    again = await registry.wait_event(sid)
    assert isinstance(again, Paused) and again.round == 2


async def test_an_answer_for_a_round_the_session_left_is_stale(
    fake_cluster: FakeCluster, registry: SessionRegistry, worker: Any
) -> None:
    """q-0 recurs every round: a host still at round 1 whose session another caller moved on
    (or a failover moved back) must not answer round 2's q-0. It gets ``StaleRound``,
    nothing is written, and re-reading then answering what it is shown finishes the
    session right."""
    other = fake_cluster.registry()
    sid, first = await paused(registry, "treg-rounds", {"rounds": 3, "width": 1})
    assert first.round == 1
    assert (await other.wait_event(sid)).round == 1  # type: ignore[attr-defined]
    moved = await other.feed_response(sid, "q-0", "by-other")
    assert isinstance(moved, Paused) and moved.round == 2
    with pytest.raises(StaleRound) as caught:  # the host names the round it answers
        await registry.feed_response(sid, "q-0", "meant-for-round-1", round=1)
    assert caught.value.session_id == sid and caught.value.state == "round 2"
    assert caught.value.to_json()["type"] == "stale_round"
    snap = await registry.status(sid, pending_filter="meta")
    assert snap["phase"] == "paused" and [p["query_id"] for p in snap["pending"]] == ["q-0"]
    # an explicit round overrides what the registry remembers
    with pytest.raises(StaleRound):
        await other.feed_response(sid, "q-0", "x", round=3)
    with pytest.raises(InvalidInput):
        await other.feed_response(sid, "q-0", "x", round=0)
    # A registry that showed a later round than the session is at (a failover took the
    # session back) refuses an answer without a round: it was meant for that later round.
    registry._rounds[sid] = 5
    with pytest.raises(StaleRound):
        await registry.feed_response(sid, "q-0", "meant-for-round-5")
    shown = await registry.wait_event(sid)
    assert isinstance(shown, Paused) and shown.round == 2
    third = await registry.feed_response(sid, "q-0", "r2")
    assert isinstance(third, Paused) and third.round == 3
    done = await registry.feed_response(sid, "q-0", "r3", round=3)
    assert isinstance(done, Finished) and done.result == [["by-other"], ["r2"], ["r3"]], done


# -- typed errors -----------------------------------------------------------------------------


async def test_feed_unknown_session_is_not_found(registry: SessionRegistry, worker: Any) -> None:
    with pytest.raises(NotFound) as info:
        await registry.feed_response("s-0-deadbeef", "q-0", "x")
    assert info.value.session_id == "s-0-deadbeef"


async def test_feed_unknown_query_id(registry: SessionRegistry, worker: Any) -> None:
    sid, _ = await paused(registry, "treg-batch")
    with pytest.raises(UnknownQuery) as info:
        await registry.feed_response(sid, "q-3", "x")
    assert (info.value.session_id, info.value.query_id) == (sid, "q-3")
    with pytest.raises(UnknownQuery):
        await registry.feed_response(sid, "f-0-0", "x")
    # nothing was recorded: the batch still needs all three
    assert await registry.feed_response(sid, "q-0", "x") == Accepted(2)


async def test_feed_twice_is_already_responded(registry: SessionRegistry, worker: Any) -> None:
    sid, _ = await paused(registry, "treg-batch")
    await registry.feed_response(sid, "q-1", "first")
    with pytest.raises(AlreadyResponded) as info:
        await registry.feed_response(sid, "q-1", "second")
    assert info.value.query_id == "q-1"
    await registry.feed_response(sid, "q-0", "a")
    event = await registry.feed_response(sid, "q-2", "c")
    assert isinstance(event, Paused)
    assert event.queries[0].prompt == "final: a | first | c"  # the first answer stood


async def test_feed_completed_session_is_invalid_transition(
    registry: SessionRegistry, worker: Any
) -> None:
    sid, _ = await paused(registry, "treg-ask")
    assert isinstance(await registry.feed_response(sid, "q-0", "done"), Finished)
    with pytest.raises(InvalidTransition) as info:
        await registry.feed_response(sid, "q-0", "again")
    assert info.value.state == "completed"
    assert info.value.session_id == sid


async def test_feed_cancelled_session_is_invalid_transition(
    registry: SessionRegistry, worker: Any
) -> None:
    sid, _ = await paused(registry, "treg-ask")
    await registry.cancel(sid)
    with pytest.raises(InvalidTransition) as info:
        await registry.feed_response(sid, "q-0", "late")
    assert info.value.state == "cancelled"


async def test_feed_running_session_is_invalid_transition(
    registry: SessionRegistry, worker: Any
) -> None:
    gate = new_gate("feed-running")
    sid, _ = await paused(registry, "treg-gated", {"tag": "feed-running", "at": 1})
    with pytest.raises(WaitTimeout):
        await registry.feed_response(sid, "q-0", "a", timeout=0.05)
    with pytest.raises(InvalidTransition) as info:
        await registry.feed_response(sid, "q-0", "b")
    assert info.value.state == "running"
    gate.set()
    event = await registry.wait_event(sid)
    assert isinstance(event, Finished)
    assert event.result == {"answer": "a"}


async def test_response_over_the_byte_limit(fake_cluster: FakeCluster) -> None:
    await fake_cluster.worker()
    reg = fake_cluster.registry(max_response_bytes=8)
    sid, _ = await paused(reg, "treg-ask")
    with pytest.raises(PayloadTooLarge):
        await reg.feed_response(sid, "q-0", "x" * 9)
    with pytest.raises(PayloadTooLarge):
        await reg.feed_response(sid, "q-0", "é" * 5)  # 5 characters but 10 bytes
    event = await reg.feed_response(sid, "q-0", "é" * 4)  # exactly 8 bytes
    assert isinstance(event, Finished)
    assert event.result == {"answer": "éééé"}


@pytest.mark.parametrize("response", [None, 42, 4.2, ["a"], {"r": "a"}, "\ud800"])
async def test_non_string_response_is_invalid_input(
    registry: SessionRegistry, worker: Any, response: Any
) -> None:
    sid, _ = await paused(registry, "treg-ask")
    with pytest.raises(InvalidInput):
        await registry.feed_response(sid, "q-0", response)
    assert (await registry.status(sid))["pending_queries"] == 1


async def test_non_utf8_bytes_are_invalid_input(registry: SessionRegistry, worker: Any) -> None:
    sid, _ = await paused(registry, "treg-ask")
    with pytest.raises(InvalidInput, match="UTF-8"):
        await registry.feed_response(sid, "q-0", b"\xff\xfeok")
    event = await registry.feed_response(sid, "q-0", "ünï".encode())
    assert isinstance(event, Finished)
    assert event.result == {"answer": "ünï"}  # valid UTF-8 bytes reach the strategy as str


@pytest.mark.parametrize("query_id", ["", None, 0])
async def test_bad_query_id_is_invalid_input(
    registry: SessionRegistry, worker: Any, query_id: Any
) -> None:
    sid, _ = await paused(registry, "treg-ask")
    with pytest.raises(InvalidInput):
        await registry.feed_response(sid, query_id, "x")


@pytest.mark.parametrize(
    "inp",
    [{"x": object()}, {"x": float("nan")}, {"x": {1, 2}}, {"x": b"raw"}, ["not", "a", "dict"],
     "text"],
)
async def test_input_not_json_able_is_invalid_input(
    registry: SessionRegistry, worker: Any, inp: Any
) -> None:
    with pytest.raises(InvalidInput):
        await registry.start_execution("treg-const", inp)
    assert await registry.list_snapshots() == {}


async def test_input_with_non_string_keys_is_invalid_input(
    registry: SessionRegistry, worker: Any
) -> None:
    """A JSON object has string keys; ``json.dumps`` silently turns 1 into "1", so the check
    passes and the strategy is then called with ``**{1: ...}``."""
    with pytest.raises(InvalidInput):
        await registry.submit("treg-const", {1: "one"})  # type: ignore[dict-item]


@pytest.mark.timeout(2)
async def test_circular_input_is_invalid_input(registry: SessionRegistry) -> None:
    loop: list[Any] = []
    loop.append(loop)
    with pytest.raises(InvalidInput):
        await registry.submit("treg-const", {"value": loop})


async def test_input_nested_too_deep_is_invalid_input(registry: SessionRegistry) -> None:
    value: Any = "leaf"
    for _ in range(5000):
        value = [value]
    with pytest.raises(InvalidInput):
        await registry.submit("treg-const", {"value": value})


async def test_input_over_the_byte_limit(fake_cluster: FakeCluster) -> None:
    reg = fake_cluster.registry(max_input_bytes=32)
    with pytest.raises(PayloadTooLarge):
        await reg.submit("treg-const", {"value": "x" * 40})


@pytest.mark.parametrize(
    "budget", [{}, {"llm_calls": 0}, {"llm_calls": -1}, {"llm_calls": True}, {"calls": 3},
               {"tokens": 1.5}],
)
async def test_bad_budget_is_invalid_input(
    registry: SessionRegistry, worker: Any, budget: dict[str, Any]
) -> None:
    with pytest.raises(InvalidInput):
        await registry.submit("treg-const", {}, budget=budget)


@pytest.mark.parametrize("ttl", [0, -1.0])
async def test_bad_ttl_is_invalid_input(registry: SessionRegistry, ttl: float) -> None:
    with pytest.raises(InvalidInput):
        await registry.submit("treg-const", {}, ttl=ttl)


@pytest.mark.parametrize("name", ["", None, 3])
async def test_bad_strategy_name_is_invalid_input(registry: SessionRegistry, name: Any) -> None:
    with pytest.raises(InvalidInput):
        await registry.submit(name, {})


async def test_unknown_strategy_once_workers_registered_names(
    registry: SessionRegistry, worker: Any
) -> None:
    with pytest.raises(UnknownStrategy) as info:
        await registry.start_execution("treg-no-such-strategy", {})
    assert "treg-no-such-strategy" in info.value.message
    assert "treg-ask" in info.value.message  # the known ones are listed
    assert await registry.client.zcard(registry.keys.deadlines) == 0  # nothing was created


async def test_usage_must_be_json_able(registry: SessionRegistry, worker: Any) -> None:
    """Everything a caller passes in is checked before it reaches Redis; ``usage`` is not, so
    msgpack's own TypeError / OverflowError escape the ``SessionError`` tree."""
    sid, _ = await paused(registry, "treg-ask")
    for usage in ({"completion_tokens": 3, "note": object()}, {"completion_tokens": 10**30},
                  {"completion_tokens": -1}, {"completion_tokens": 2**31}):
        with pytest.raises(InvalidInput):
            await registry.feed_response(sid, "q-0", "x", usage=usage)
    assert (await registry.status(sid))["pending_queries"] == 1  # nothing was recorded


async def test_usage_tokens_are_counted(registry: SessionRegistry, worker: Any) -> None:
    sid, _ = await paused(registry, "treg-batch")
    await registry.feed_response(sid, "q-0", "x", usage={"completion_tokens": 40})
    await registry.feed_response(sid, "q-1", "yyyy", usage={"output_tokens": 7})
    snap = (await registry.list_snapshots())[sid]
    assert snap["metrics"]["tokens"]["response_total"] == 47
    with pytest.raises(InvalidInput):
        await registry.feed_response(sid, "q-2", "z", usage=["completion_tokens"])  # type: ignore[arg-type]


async def test_concurrent_feeds_complete_the_round_exactly_once(
    fake_cluster: FakeCluster, registry: SessionRegistry, worker: Any
) -> None:
    hosts = [registry, fake_cluster.registry(), fake_cluster.registry()]
    sid, _ = await paused(registry, "treg-batch")
    results = await asyncio.gather(*(
        host.feed_response(sid, f"q-{i}", "abc"[i]) for i, host in enumerate(hosts)
    ))
    accepted = sorted(r.remaining for r in results if isinstance(r, Accepted))
    assert accepted == [1, 2]
    [nxt] = [r for r in results if isinstance(r, Paused)]
    assert nxt.queries[0].prompt == "final: a | b | c"


async def test_racing_duplicate_feeds_record_one_answer(
    fake_cluster: FakeCluster, registry: SessionRegistry, worker: Any
) -> None:
    other = fake_cluster.registry()
    sid, _ = await paused(registry, "treg-batch")
    results = await asyncio.gather(
        registry.feed_response(sid, "q-0", "mine"), other.feed_response(sid, "q-0", "theirs"),
        return_exceptions=True,
    )
    assert sorted(type(r).__name__ for r in results) == ["Accepted", "AlreadyResponded"]
    winner = "mine" if isinstance(results[0], Accepted) else "theirs"
    await registry.feed_response(sid, "q-1", "b")
    event = await registry.feed_response(sid, "q-2", "c")
    assert isinstance(event, Paused)
    assert event.queries[0].prompt == f"final: {winner} | b | c"


# -- resolve_sole_pending_id ------------------------------------------------------------------


async def test_resolve_sole_pending_id(registry: SessionRegistry, worker: Any) -> None:
    sid, _ = await paused(registry, "treg-ask")
    assert await registry.resolve_sole_pending_id(sid) == "q-0"


async def test_resolve_with_several_pending(registry: SessionRegistry, worker: Any) -> None:
    sid, _ = await paused(registry, "treg-batch")
    with pytest.raises(NoPendingQuery) as info:
        await registry.resolve_sole_pending_id(sid)
    assert info.value.message == ("3 queries are pending (q-0, q-1, q-2): name the one you "
                                  "answer (query_id)")
    await registry.feed_response(sid, "q-1", "b")
    with pytest.raises(NoPendingQuery, match=r"^2 queries are pending \(q-0, q-2\): name"):
        await registry.resolve_sole_pending_id(sid)
    await registry.feed_response(sid, "q-0", "a")
    assert await registry.resolve_sole_pending_id(sid) == "q-2"  # the one left unanswered


async def test_resolve_with_nothing_pending(registry: SessionRegistry, worker: Any) -> None:
    gate = new_gate("resolve-running")
    sid = await registry.submit("treg-gated", {"tag": "resolve-running"})
    with pytest.raises(NoPendingQuery) as info:
        await registry.resolve_sole_pending_id(sid)  # running
    assert info.value.session_id == sid and info.value.state == "running"
    gate.set()
    assert isinstance(await registry.wait_event(sid), Paused)
    await registry.feed_response(sid, await registry.resolve_sole_pending_id(sid), "a")
    # finished: refused as a feed naming its query is, whether or not the caller named one
    with pytest.raises(InvalidTransition) as ended:
        await registry.resolve_sole_pending_id(sid)
    assert ended.value.state == "completed" and ended.value.session_id == sid
    with pytest.raises(InvalidTransition):
        await registry.feed_response(sid, "q-0", "late")
    with pytest.raises(NotFound):
        await registry.resolve_sole_pending_id("s-0-unknown")


# -- waiting ----------------------------------------------------------------------------------


async def test_wait_event_returns_the_pause_minus_answered(
    registry: SessionRegistry, worker: Any
) -> None:
    sid, first = await paused(registry, "treg-batch")
    assert await registry.wait_event(sid) == first
    await registry.feed_response(sid, "q-1", "b")
    event = await registry.wait_event(sid)
    assert isinstance(event, Paused)
    assert [q.id for q in event.queries] == ["q-0", "q-2"]
    await registry.feed_response(sid, "q-0", "a")
    event = await registry.wait_event(sid)
    assert isinstance(event, Paused)
    assert event.to_json(sid) == {
        "status": "needs_response", "session_id": sid, "query_id": "q-2", "prompt": "c",
        "system": None, "max_tokens": 1024,
    }


async def test_wait_event_returns_finished_with_result(
    registry: SessionRegistry, worker: Any
) -> None:
    sid, _ = await paused(registry, "treg-ask")
    done = await registry.feed_response(sid, "q-0", "42")
    assert await registry.wait_event(sid) == done
    assert isinstance(done, Finished) and done.result == {"answer": "42"}


async def test_wait_event_unknown_session(registry: SessionRegistry) -> None:
    with pytest.raises(NotFound):
        await registry.wait_event("s-0-nope", timeout=1)


async def test_reattach_from_a_second_registry(
    fake_cluster: FakeCluster, registry: SessionRegistry, worker: Any
) -> None:
    other = fake_cluster.registry()
    sid, first = await paused(registry, "treg-batch")
    assert await other.wait_event(sid) == first
    assert await other.feed_response(sid, "q-0", "a") == Accepted(2)
    event = await registry.wait_event(sid)
    assert isinstance(event, Paused) and [q.id for q in event.queries] == ["q-1", "q-2"]
    await registry.feed_response(sid, "q-1", "b")
    await other.feed_response(sid, "q-2", "c")
    event = await registry.wait_event(sid)
    assert isinstance(event, Paused) and event.queries[0].prompt == "final: a | b | c"
    done = await other.feed_response(sid, "q-0", "f")
    assert await registry.wait_event(sid) == done
    assert (await registry.status(sid))["result"] == {"batch": ["a", "b", "c"], "final": "f"}


async def test_waiters_on_two_registries_both_see_the_next_event(
    fake_cluster: FakeCluster, registry: SessionRegistry, worker: Any
) -> None:
    gate = new_gate("two-waiters")
    other = fake_cluster.registry()
    sid = await registry.submit("treg-gated", {"tag": "two-waiters"})
    waiters = [asyncio.create_task(r.wait_event(sid)) for r in (registry, other)]
    await subscribed(registry, sid)
    assert not any(w.done() for w in waiters)
    gate.set()
    a, b = await asyncio.gather(*waiters)
    assert a == b == Paused((LlmQuery(id="q-0", prompt="gated two-waiters"),))


async def test_wait_timeout_while_a_step_is_slow_then_the_session_carries_on(
    registry: SessionRegistry, worker: Any
) -> None:
    gate = new_gate("slow-start")
    with pytest.raises(WaitTimeout) as info:
        await registry.start_execution("treg-gated", {"tag": "slow-start"}, timeout=0.05)
    sid = info.value.session_id
    assert sid is not None  # the host can re-attach
    assert info.value.state == "running"
    with pytest.raises(WaitTimeout):
        await registry.wait_event(sid, timeout=0.02)
    assert (await registry.status(sid))["phase"] == "running"
    gate.set()
    event = await registry.wait_event(sid, timeout=5)
    assert event == Paused((LlmQuery(id="q-0", prompt="gated slow-start"),))
    done = await registry.feed_response(sid, "q-0", "fine")
    assert isinstance(done, Finished) and done.result == {"answer": "fine"}


async def test_wait_timeout_on_feed_then_reattach(registry: SessionRegistry, worker: Any) -> None:
    gate = new_gate("slow-resume")
    sid, _ = await paused(registry, "treg-gated", {"tag": "slow-resume", "at": 1})
    with pytest.raises(WaitTimeout) as info:
        await registry.feed_response(sid, "q-0", "kept", timeout=0.05)
    assert info.value.session_id == sid
    gate.set()
    done = await registry.wait_event(sid, timeout=5)
    assert isinstance(done, Finished)
    assert done.result == {"answer": "kept"}  # the answer fed before the timeout counted


# -- snapshots --------------------------------------------------------------------------------

SNAP_KEYS = {"state", "phase", "started_at", "last_activity_at", "strategy", "pending_queries",
             "metrics", "round"}
METRIC_KEYS = {"elapsed_ms", "llm_calls", "rounds", "tokens", "recent_logs"}


async def test_list_snapshots_holds_only_paused_sessions(
    registry: SessionRegistry, worker: Any
) -> None:
    gate = new_gate("snap-running")
    paused_sid, _ = await paused(registry, "treg-ask")
    running_sid = await registry.submit("treg-gated", {"tag": "snap-running"})
    done_sid, done = await registry.start_execution("treg-const", {"value": 7})
    assert isinstance(done, Finished)
    assert set(await registry.list_snapshots()) == {paused_sid}

    status = await registry.status(done_sid)
    assert status["state"] == "terminal" and status["phase"] == "completed"
    assert status["result"] == 7
    assert status["session_id"] == done_sid
    assert "pending_queries" not in status
    running = await registry.status(running_sid)
    assert (running["state"], running["phase"], running["pending_queries"]) == (
        "running", "running", 0)
    gate.set()
    await registry.wait_event(running_sid)
    assert set(await registry.list_snapshots()) == {paused_sid, running_sid}


async def test_snapshot_shape_and_metrics(registry: SessionRegistry, worker: Any) -> None:
    before = now_ms()
    sid, _ = await paused(registry, "treg-batch", {"items": ["aaaa", "bbbbbbbb", "c"]})
    snaps = await registry.list_snapshots()
    snap = snaps[sid]
    assert set(snap) == SNAP_KEYS
    assert (snap["state"], snap["phase"], snap["strategy"]) == ("paused", "paused", "treg-batch")
    assert snap["pending_queries"] == 3
    assert before - 1000 <= snap["started_at"] <= snap["last_activity_at"] <= now_ms() + 1000
    metrics = snap["metrics"]
    assert set(metrics) == METRIC_KEYS
    assert metrics["llm_calls"] == 3 and metrics["rounds"] == 0
    assert metrics["recent_logs"] == []
    current = {"query_id": "q-0", "prompt_tokens": 4,
               "started_waiting_at": metrics["tokens"]["current_query"]["started_waiting_at"]}
    assert metrics["tokens"] == {"prompt_total": 4, "response_total": 0, "total": 4,
                                 "current_query": current}
    assert snap["started_at"] <= current["started_waiting_at"] <= snap["last_activity_at"]
    assert isinstance(metrics["elapsed_ms"], int) and metrics["elapsed_ms"] >= 0

    await registry.feed_response(sid, "q-0", "xxxxx")
    snap = (await registry.list_snapshots())[sid]
    assert snap["pending_queries"] == 2
    assert snap["metrics"]["tokens"] == {"prompt_total": 4, "response_total": 2, "total": 6,
                                         "current_query": current}
    json.dumps(snaps)


async def test_snapshot_progress_and_logs(registry: SessionRegistry, worker: Any) -> None:
    plain_sid, _ = await paused(registry, "treg-rounds", {"rounds": 2})
    sid, _ = await paused(registry, "treg-rounds", {"rounds": 3, "logs": 12, "progress": True})
    snaps = await registry.list_snapshots()
    assert "progress" not in snaps[plain_sid]["metrics"]
    metrics = snaps[sid]["metrics"]
    assert metrics["progress"] == {"step": 1, "total": 3, "message": "round 0"}
    assert [e["message"] for e in metrics["recent_logs"]] == [f"r0 log {i}" for i in range(12)]
    assert all(e["source"] == "ctx.log" for e in metrics["recent_logs"])
    assert all(e["level"] == "info" and isinstance(e["ts"], int) for e in metrics["recent_logs"])

    await registry.feed_response(sid, "q-0", "a")
    metrics = (await registry.list_snapshots())[sid]["metrics"]
    assert metrics["progress"] == {"step": 2, "total": 3, "message": "round 1"}
    msgs = [e["message"] for e in metrics["recent_logs"]]
    assert len(msgs) == 20  # the last 20 of 24
    assert msgs == [f"r0 log {i}" for i in range(4, 12)] + [f"r1 log {i}" for i in range(12)]


async def test_snapshot_budget_remaining(registry: SessionRegistry, worker: Any) -> None:
    plain, _ = await paused(registry, "treg-batch")
    sid, _ = await paused(registry, "treg-batch", budget={"llm_calls": 10})
    snaps = await registry.list_snapshots()
    assert "budget_remaining" not in snaps[plain]["metrics"]
    # every limit, null when unset (algocline's shape); our former keys are taken as aliases
    assert snaps[sid]["metrics"]["budget_remaining"] == {"llm_calls": 7, "tokens": None,
                                                         "elapsed_ms": None}
    ctx_budget, _ = await paused(registry, "treg-batch",
                                 {"budget": {"max_llm_calls": 5, "max_tokens": 10**6}})
    left = (await registry.status(ctx_budget))["metrics"]["budget_remaining"]
    assert left["llm_calls"] == 2 and left["tokens"] > 0 and left["elapsed_ms"] is None


async def test_snapshot_pending_only_with_a_filter(registry: SessionRegistry, worker: Any) -> None:
    sid, _ = await paused(registry, "treg-batch")
    assert "pending" not in (await registry.list_snapshots())[sid]
    assert "pending" not in await registry.status(sid)
    assert "pending" in (await registry.list_snapshots("meta"))[sid]
    with pytest.raises(InvalidInput):
        await registry.list_snapshots("everything")


async def test_snapshot_pending_filters(registry: SessionRegistry, worker: Any) -> None:
    long_prompt = "😀" * 150 + "é" * 100  # 250 code points, multi-byte
    items = [{"prompt": long_prompt, "system": "sys", "max_tokens": 9, "grounded": True},
             "short", "third"]
    sid, _ = await paused(registry, "treg-batch", {"items": items})
    await registry.feed_response(sid, "q-1", "answered")

    meta = (await registry.list_snapshots("meta"))[sid]["pending"]
    assert meta == [{"query_id": "q-0", "max_tokens": 9}, {"query_id": "q-2", "max_tokens": 1024}]

    preview = (await registry.list_snapshots("preview"))[sid]["pending"]
    assert [set(p) for p in preview] == [{"query_id", "max_tokens", "prompt_preview"}] * 2
    assert len(preview[0]["prompt_preview"]) == 200
    assert preview[0]["prompt_preview"] == "😀" * 150 + "é" * 50
    assert preview[1]["prompt_preview"] == "third"

    full = (await registry.status(sid, pending_filter="full"))["pending"]
    assert full == [
        {"query_id": "q-0", "max_tokens": 9, "system": "sys", "grounded": True,
         "underspecified": False, "prompt": long_prompt},
        {"query_id": "q-2", "max_tokens": 1024, "system": None, "grounded": False,
         "underspecified": False, "prompt": "third"},
    ]


async def test_conversation_history_only_on_request_last_ten(
    registry: SessionRegistry, worker: Any
) -> None:
    sid, _ = await paused(registry, "treg-rounds", {"rounds": 4, "width": 4})
    for r in range(3):
        for i in range(4):
            await registry.feed_response(sid, f"q-{i}", f"ans r{r} i{i}")
    assert "conversation_history" not in (await registry.list_snapshots())[sid]["metrics"]
    history = (await registry.list_snapshots(include_history=True))[sid]["metrics"][
        "conversation_history"]
    expected = [{"query_id": f"q-{i}", "prompt": f"r{r} i{i}", "response": f"ans r{r} i{i}",
                 "round": r + 1} for r in range(3) for i in range(4)]
    assert [text_of(h) for h in history] == expected[-10:]
    status = await registry.status(sid, include_history=True)
    assert [text_of(h) for h in status["metrics"]["conversation_history"]] == expected[-10:]
    assert status["round"] == 4  # the history's rounds are the ones a feed names
    for h in history:  # algocline's fields: tokens (estimated here) and times
        assert (h["prompt_tokens"], h["response_tokens"]) == (est(h["prompt"]),
                                                              est(h["response"]))
        assert 0 < h["started_at"] <= h["completed_at"]


async def test_conversation_history_shorter_than_ten(registry: SessionRegistry,
                                                     worker: Any) -> None:
    sid, _ = await paused(registry, "treg-rounds", {"rounds": 3})
    status = await registry.status(sid, include_history=True)
    assert status["metrics"]["conversation_history"] == []
    await registry.feed_response(sid, "q-0", "one", {"prompt_tokens": 7,
                                                     "completion_tokens": 3})
    snap = (await registry.list_snapshots("meta", include_history=True))[sid]
    [entry] = snap["metrics"]["conversation_history"]
    assert {**entry, "started_at": 0, "completed_at": 0} == {
        "query_id": "q-0", "prompt": "r0 i0", "response": "one", "prompt_tokens": 7,
        "response_tokens": 3, "started_at": 0, "completed_at": 0, "round": 1}
    assert snap["pending"] == [{"query_id": "q-0", "max_tokens": 1024}]


async def test_history_rounds_stay_exact_when_a_round_is_journaled_mid_read(
    registry: SessionRegistry, worker: Any
) -> None:
    """The journal's tail is read between two LLENs; when a step appends a round between
    them (possible where Redis ends a read of a long pipeline), the tail is read again by
    absolute index, so each exchange still carries its own round."""
    sid, _ = await paused(registry, "treg-rounds", {"rounds": 14, "width": 1})
    for r in range(12):
        await registry.feed_response(sid, "q-0", f"ans r{r}")
    journal = registry.keys.session(sid).journal
    extra = (await registry.redis.execute("LRANGE", journal, -1, -1))[0]
    pushed: list[bool] = []

    async def racing_run(commands: list[tuple[Any, ...]]) -> list[Any]:
        at = next((n for n, c in enumerate(commands) if c[:2] == ("LRANGE", journal)), None)
        if at is None or pushed:
            return await registry.redis.execute_many(commands)
        first = await registry.redis.execute_many(commands[:at])
        await registry.redis.execute("RPUSH", journal, extra)  # a round appended right here
        pushed.append(True)
        return first + await registry.redis.execute_many(commands[at:])

    snaps = await snapshot.read_many(racing_run, registry.keys, [sid], pending_filter=None,
                                     include_history=True)
    history = snaps[sid]["metrics"]["conversation_history"]
    assert pushed
    assert [(h["round"], h["response"]) for h in history] == [
        (r + 1, f"ans r{r}") for r in range(2, 12)]
    # Without the race the same read numbers the appended entry as the next round.
    plain = await snapshot.read_many(registry.redis.execute_many, registry.keys, [sid],
                                     pending_filter=None, include_history=True)
    assert [h["round"] for h in plain[sid]["metrics"]["conversation_history"]] == list(
        range(4, 14))


async def test_finished_sessions_leave_the_listing_but_keep_their_status(
    registry: SessionRegistry, worker: Any
) -> None:
    sid, _ = await paused(registry, "treg-ask")
    assert sid in await registry.list_snapshots()
    await registry.feed_response(sid, "q-0", "bye")
    assert sid not in await registry.list_snapshots()
    status = await registry.status(sid)
    assert (status["state"], status["phase"], status["result"]) == (
        "terminal", "completed", {"answer": "bye"})
    assert "error" not in status
    failed, _ = await paused(registry, "treg-fail")
    await registry.feed_response(failed, "q-0", "x")
    status = await registry.status(failed)
    assert status["phase"] == "failed"
    assert status["error"] == "RuntimeError: exploded on x"


async def test_one_corrupt_session_does_not_blind_the_listing(
    registry: SessionRegistry, worker: Any
) -> None:
    good, _ = await paused(registry, "treg-ask")
    bad, _ = await paused(registry, "treg-ask")
    await registry.client.hset(registry.keys.session(bad).session, "started_at", "yesterday")
    snaps = await registry.list_snapshots("meta")
    assert set(snaps) == {good, bad}
    assert snaps[good]["phase"] == "paused"
    assert (snaps[bad]["state"], snaps[bad]["phase"]) == ("terminal", "corrupt")
    assert bad in snaps[bad]["error"]
    assert (await registry.status(bad))["phase"] == "corrupt"


async def test_status_unknown_session(registry: SessionRegistry) -> None:
    with pytest.raises(NotFound):
        await registry.status("s-0-nope")


# -- cancel -----------------------------------------------------------------------------------


async def test_cancel_paused_session(registry: SessionRegistry, worker: Any) -> None:
    sid, _ = await paused(registry, "treg-batch")
    await registry.feed_response(sid, "q-0", "a")
    event = await registry.cancel(sid)
    assert isinstance(event, Finished)
    assert event.state is Phase.CANCELLED and event.result is None
    assert event.metrics["auto"]["llm_calls"] == 3
    assert await registry.wait_event(sid) == event
    assert sid not in await registry.list_snapshots()
    assert (await registry.status(sid))["phase"] == "cancelled"
    with pytest.raises(InvalidTransition) as info:
        await registry.feed_response(sid, "q-1", "b")
    assert info.value.state == "cancelled"
    with pytest.raises(InvalidTransition) as info:
        await registry.cancel(sid)
    assert info.value.state == "cancelled"


async def test_cancel_finished_and_unknown_sessions(registry: SessionRegistry,
                                                    worker: Any) -> None:
    sid, _ = await paused(registry, "treg-ask")
    await registry.feed_response(sid, "q-0", "a")
    with pytest.raises(InvalidTransition) as info:
        await registry.cancel(sid)
    assert info.value.state == "completed"
    assert (await registry.status(sid))["result"] == {"answer": "a"}
    with pytest.raises(NotFound):
        await registry.cancel("s-0-nope")


async def test_cancel_wakes_a_waiter(fake_cluster: FakeCluster) -> None:
    reg = fake_cluster.registry()  # no worker: the session waits for one, running
    sid = await reg.submit("treg-ask", {})
    waiter = asyncio.create_task(reg.wait_event(sid))
    await subscribed(reg, sid)
    assert not waiter.done()
    event = await reg.cancel(sid)
    assert await asyncio.wait_for(waiter, 5) == event
    assert event.state is Phase.CANCELLED


async def test_cancel_mid_step_wins_over_the_late_commit(
    registry: SessionRegistry, worker: Any
) -> None:
    gate = new_gate("cancel-mid-step")
    sid = await registry.submit("treg-gated", {"tag": "cancel-mid-step"})
    await asyncio.wait_for(gate.entered.wait(), 5)  # the worker is mid-step, under lock A
    event = await registry.cancel(sid)
    assert event.state is Phase.CANCELLED
    gate.set()  # the step now asks its question; its commit must not resurrect the session
    await assert_eventually(lambda: worker.stats.steps == 1, message="the step never committed")
    status = await registry.status(sid)
    assert status["phase"] == "cancelled"
    assert status["metrics"]["llm_calls"] == 0
    assert sid not in await registry.list_snapshots()

    async def lock_released() -> bool:
        return await registry.client.exists(registry.keys.session(sid).lock) == 0

    await assert_eventually(lock_released, timeout=5, message="lock A kept after the step")


# -- GC ---------------------------------------------------------------------------------------


async def test_gc_expires_an_idle_paused_session_once(
    registry: SessionRegistry, worker: Any
) -> None:
    sid, _ = await paused(registry, "treg-ask")
    future = now_ms() + 10 * 3600 * 1000
    assert await registry.gc_sweep(now_ms=future) == [sid]
    event = await registry.wait_event(sid)
    assert isinstance(event, Finished) and event.state is Phase.FAILED
    assert event.error is not None and "expired" in event.error
    assert sid not in await registry.list_snapshots()
    status = await registry.status(sid)
    assert status["phase"] == "failed" and "expired" in status["error"]
    with pytest.raises(InvalidTransition) as info:
        await registry.feed_response(sid, "q-0", "too late")
    assert info.value.state == "failed"
    assert await registry.gc_sweep(now_ms=future) == []
    assert await registry.gc_sweep(now_ms=future + 1000) == []


async def test_gc_leaves_fresh_sessions_alone(registry: SessionRegistry, worker: Any) -> None:
    sid, first = await paused(registry, "treg-ask")
    assert await registry.gc_sweep(now_ms=now_ms()) == []
    assert await registry.gc_sweep() == []  # server clock
    assert await registry.wait_event(sid) == first
    done = await registry.feed_response(sid, "q-0", "still alive")
    assert isinstance(done, Finished) and done.state is Phase.COMPLETED


async def test_gc_honours_each_session_ttl(registry: SessionRegistry, worker: Any) -> None:
    short, _ = await paused(registry, "treg-ask", ttl=1.0)
    long, _ = await paused(registry, "treg-ask", ttl=3600.0)
    assert await registry.gc_sweep(now_ms=now_ms() + 60_000) == [short]
    assert set(await registry.list_snapshots()) == {long}


async def test_gc_deadline_is_last_activity_plus_ttl(registry: SessionRegistry,
                                                     worker: Any) -> None:
    sid, _ = await paused(registry, "treg-batch", ttl=10.0)
    await registry.feed_response(sid, "q-0", "a")  # activity moves the idle deadline
    last = (await registry.status(sid))["last_activity_at"]
    deadlines = (await shard_keys(registry, sid)).deadlines
    assert await registry.client.zscore(deadlines, sid) == last + 10_000
    assert await registry.gc_sweep(now_ms=last + 9_999) == []
    assert await registry.gc_sweep(now_ms=last + 10_000) == [sid]


async def test_gc_rechecks_the_deadline_under_the_lock(registry: SessionRegistry,
                                                      worker: Any) -> None:
    """A stale deadline in the index (a feed landed after the sweep read it) must not reap
    the session: the expiry re-checks last activity atomically and re-files the deadline."""
    sid, first = await paused(registry, "treg-ask", ttl=60.0)
    last = (await registry.status(sid))["last_activity_at"]
    deadlines = (await shard_keys(registry, sid)).deadlines
    await registry.client.zadd(deadlines, {sid: 1})
    assert await registry.gc_sweep(now_ms=last + 1_000) == []
    assert await registry.client.zscore(deadlines, sid) == last + 60_000
    assert await registry.wait_event(sid) == first


async def test_gc_waiter_gets_the_expired_result(fake_cluster: FakeCluster) -> None:
    reg = fake_cluster.registry()  # no worker yet: the start job waits
    sid = await reg.submit("treg-ask", {})
    waiter = asyncio.create_task(reg.wait_event(sid))
    await subscribed(reg, sid)
    # Waiting for a worker is not idling (the host owes it nothing): never reaped.
    assert await reg.gc_sweep(now_ms=now_ms() + 10 * 3600 * 1000) == []
    assert not waiter.done()
    await fake_cluster.worker()
    assert isinstance(await asyncio.wait_for(waiter, 5), Paused)
    # Paused and never answered: idle, so reaped, and whoever waits on it next is told.
    assert await reg.gc_sweep(now_ms=now_ms() + 10 * 3600 * 1000) == [sid]
    event = await reg.wait_event(sid)
    assert isinstance(event, Finished) and event.state is Phase.FAILED
    assert event.error is not None and "expired" in event.error
    assert event.to_json(sid) == {"status": "error", "error": event.error, "type": "expired"}
    assert await reg.client.xlen(reg.keys.jobs) == 0


# -- odds and ends ----------------------------------------------------------------------------


async def test_registry_lists_live_workers(fake_cluster: FakeCluster,
                                           registry: SessionRegistry) -> None:
    w = await fake_cluster.worker()
    workers = await registry.workers()
    assert list(workers) == [w.id]
    assert abs(workers[w.id] - now_ms()) < 60_000
    await fake_cluster.stop_worker(w)
    assert await registry.workers() == {}


async def test_worker_stats_publish_each_workers_load_and_counters(
        fake_cluster: FakeCluster, registry: SessionRegistry) -> None:
    w = await fake_cluster.worker(concurrency=3, heartbeat_ttl_ms=300)  # beats every 100 ms
    sid, ev = await registry.start_execution("reflect", {"task": "t"})
    while isinstance(ev, Paused):
        ev = await registry.feed_response(sid, ev.queries[0].id, "fine")
    assert isinstance(ev, Finished) and ev.state is Phase.COMPLETED
    assert w.stats.steps >= 3

    async def reported() -> bool:
        report = (await registry.worker_stats()).get(w.id, {})
        return report.get("steps") == w.stats.steps
    await assert_eventually(reported, message="the heartbeat never published the steps")

    report = (await registry.worker_stats())[w.id]
    assert (report["concurrency"], report["busy"]) == (3, 0)
    assert report["live_resumes"] + report["replays"] > 0
    assert abs(report["at"] - now_ms()) < 60_000
    # A report that does not decode shows as {}, and the worker as alive.
    await registry.client.set(registry.keys.worker("odd"), b"\xc1", px=60_000)
    await registry.client.zadd(registry.keys.workers, {"odd": now_ms()})
    assert (await registry.worker_stats())["odd"] == {}
    await fake_cluster.stop_worker(w)
    assert set(await registry.worker_stats()) == {"odd"}


async def test_gc_forgets_workers_whose_heartbeat_expired(fake_cluster: FakeCluster,
                                                          registry: SessionRegistry) -> None:
    w = await fake_cluster.worker(start=False)  # no GC loop of its own: the test sweeps
    await w._beat()
    await registry.client.zadd(registry.keys.workers, {"ghost": 1})  # its key expired long ago
    assert set(await registry.workers()) == {w.id, "ghost"}
    await registry.gc_sweep()
    assert set(await registry.workers()) == {w.id}


async def test_registry_as_async_context_manager(fake_cluster: FakeCluster) -> None:
    await fake_cluster.worker()
    async with SessionRegistry(fake_cluster.transport(), settings=fake_cluster.settings) as reg:
        _, event = await reg.start_execution("treg-const", {"value": "ok"})
        assert isinstance(event, Finished) and event.result == "ok"


async def test_namespaces_do_not_see_each_other(fake_cluster: FakeCluster, worker: Any) -> None:
    reg = fake_cluster.registry()
    other = fake_cluster.registry(namespace=fake_cluster.settings.namespace + "x")
    sid, _ = await paused(reg, "treg-ask")
    assert await other.list_snapshots() == {}
    with pytest.raises(NotFound):
        await other.feed_response(sid, "q-0", "x")
    with pytest.raises(SessionError):
        await other.status(sid)
