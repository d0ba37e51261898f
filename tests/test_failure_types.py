"""A failed session says what kind of failure it was (``errors.FAILURE_TYPES``), and for a
crash of strategy code, where: the strategy's traceback, file and line, from its own first
frame. The host sees ``{"status": "error", "error", "type"}``; ``status`` shows the type and
the traceback.

One test per kind, each driven the way it happens: a strategy that raises, overspends, checks
its input, returns what cannot be stored, overruns its step, replays differently; state that
does not decode; a step failing in the worker, or dying with it, until dead-lettered.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from coordinator import Finished, Paused, Phase, SessionRegistry
from coordinator.errors import FAILURE_TYPES, InvalidInput
from tests.conftest import FakeCluster
from tests.helpers import line_of
from workers import strategy
from workers.context import Context
from workers.runtime import MAX_TRACEBACK_CHARS, Ask, Crash, Execution
from workers.worker import Worker

#: Every test runs on fakeredis and on a real redis-server.
ON_BOTH_SERVERS = True

HERE = Path(__file__)


@strategy("tft-divide")
async def tft_divide(ctx: Context, **_: Any) -> float:
    divisor = await ctx.llm("divide 1 by?")
    return 1 / int(divisor)  # TFT-DIVIDE


@strategy("tft-spend")
async def tft_spend(ctx: Context, **_: Any) -> list[str]:
    return await ctx.llm_batch(["a", "b", "c"])


@strategy("tft-needs")
async def tft_needs(ctx: Context, n: Any = None, **_: Any) -> int:
    if not isinstance(n, int):
        raise InvalidInput("this strategy needs input {'n': <int>}")
    return n


@strategy("tft-unstorable")
async def tft_unstorable(ctx: Context, **_: Any) -> Any:
    await ctx.llm("anything")
    return {"a set": {1, 2}}


@strategy("tft-hang")
async def tft_hang(ctx: Context, **_: Any) -> None:
    await asyncio.Event().wait()  # nobody sets it: the step timeout ends it


#: What ``tft-drift`` asks: changed between workers, as a clock read would change it.
DRIFT = {"v": 0}


@strategy("tft-drift")
async def tft_drift(ctx: Context, **_: Any) -> str:
    first = await ctx.llm(f"version {DRIFT['v']}")
    return await ctx.llm(f"after {first}")


@strategy("tft-ask")
async def tft_ask(ctx: Context, tag: str = "", **_: Any) -> str:
    return await ctx.llm(f"{tag} question")


@pytest.fixture(autouse=True)
def _reset() -> None:
    DRIFT["v"] = 0


async def failed(reg: SessionRegistry, sid: str, event: Any, kind: str) -> Finished:
    """``event`` is the failure of ``kind``, on the wire and in ``status`` alike."""
    assert kind in FAILURE_TYPES
    assert isinstance(event, Finished) and event.state is Phase.FAILED, event
    assert event.error_type == kind, (event.error_type, event.error)
    assert event.to_json(sid) == {"status": "error", "error": event.error, "type": kind}
    status = await reg.status(sid)
    assert (status["error_type"], status["error"]) == (kind, event.error), status
    assert status["traceback"] == event.traceback
    return event


async def test_a_strategy_crash_carries_its_type_and_traceback_file_and_line(
        registry: SessionRegistry, worker: Worker) -> None:
    sid, first = await registry.start_execution("tft-divide", {})
    assert isinstance(first, Paused)
    done = await failed(registry, sid, await registry.feed_response(sid, "q-0", "0"),
                        "strategy_error")
    assert done.error == "ZeroDivisionError: division by zero"
    tb = done.traceback or ""
    assert f'File "{HERE}", line {line_of(HERE, "TFT-DIVIDE")}, in tft_divide' in tb, tb
    assert tb.rstrip().endswith("ZeroDivisionError: division by zero"), tb
    # It starts at the strategy: the worker's machinery above it tells nobody anything.
    assert tb.startswith("Traceback (most recent call last):\n" + f'  File "{HERE}"'), tb
    assert "workers/runtime.py" not in tb and "workers/watchdog.py" not in tb, tb


async def test_budget_input_and_result_failures_have_their_own_types(
        registry: SessionRegistry, worker: Worker) -> None:
    sid, event = await registry.start_execution("tft-spend", {}, budget={"llm_calls": 2})
    spent = await failed(registry, sid, event, "budget_exceeded")
    assert "budget_exceeded: max_" in (spent.error or "")

    sid, event = await registry.start_execution("tft-needs", {})
    refused = await failed(registry, sid, event, "invalid_input")
    assert refused.error == "this strategy needs input {'n': <int>}"
    assert "tft_needs" in (refused.traceback or ""), refused.traceback  # where it refused

    sid, first = await registry.start_execution("tft-unstorable", {})
    assert isinstance(first, Paused)
    bad = await failed(registry, sid, await registry.feed_response(sid, "q-0", "x"),
                       "invalid_result")
    assert "JSON" in (bad.error or "") and bad.traceback is None


async def test_a_step_timeout_is_typed_and_has_no_traceback(fake_cluster: FakeCluster) -> None:
    reg = fake_cluster.registry()
    await fake_cluster.worker(step_timeout_s=0.2)
    sid, event = await reg.start_execution("tft-hang", {}, timeout=10)
    done = await failed(reg, sid, event, "step_timeout")
    assert done.traceback is None


async def test_a_replay_that_asks_otherwise_is_non_determinism(
        fake_cluster: FakeCluster) -> None:
    reg = fake_cluster.registry()
    a = await fake_cluster.worker()
    sid, first = await reg.start_execution("tft-drift", {})
    assert isinstance(first, Paused)
    await fake_cluster.stop_worker(a)  # its live execution goes with it: the next step replays
    DRIFT["v"] = 1
    await fake_cluster.worker()
    await failed(reg, sid, await reg.feed_response(sid, "q-0", "x"), "non_determinism")


async def test_state_that_does_not_decode_is_corrupt_state(registry: SessionRegistry,
                                                           worker: Worker) -> None:
    sid, _ = await registry.start_execution("tft-ask", {"tag": "bad"})
    sk = registry.keys.session(sid)
    await registry.client.hset(sk.pending, "q-0", b"\xc1")
    # no live holder, so the next step reads the stored question (and cannot)
    await registry.client.hdel(sk.session, "holder", "holder_ch")
    await failed(registry, sid, await registry.feed_response(sid, "q-0", "x"), "corrupt_state")


async def test_a_step_failing_in_the_worker_every_time_is_dead_lettered_as_worker_error(
        fake_cluster: FakeCluster) -> None:
    reg = fake_cluster.registry()
    w: Worker = await fake_cluster.worker(claim_idle_ms=50, max_attempts=2)
    commit = w._commit

    async def failing_commit(sid: str, lock: Any, **kw: Any) -> bool:
        if isinstance(kw["outcome"], Ask):
            raise RuntimeError("injected: this commit always fails")
        return await commit(sid, lock, **kw)

    w._commit = failing_commit  # type: ignore[method-assign]
    sid = await reg.submit("tft-ask", {"tag": "poison"})
    done = await failed(reg, sid, await reg.wait_event(sid, timeout=20), "worker_error")
    assert "RuntimeError: injected" in (done.error or ""), done.error


async def test_a_step_whose_worker_died_every_time_is_dead_lettered_as_worker_lost(
        fake_cluster: FakeCluster) -> None:
    reg = fake_cluster.registry()
    sid = await reg.submit("tft-ask", {"tag": "lost"})
    # Each worker that died mid-step counted a try (lock A taken) and recorded no error: as
    # if max_attempts of them had.
    await reg.client.hset(reg.keys.session(sid).session, "tries", 2)
    await fake_cluster.worker(max_attempts=2)
    done = await failed(reg, sid, await reg.wait_event(sid, timeout=20), "worker_lost")
    assert "the worker died mid-step" in (done.error or ""), done.error


# -- Crash, directly ----------------------------------------------------------------------------


async def test_a_traceback_is_cut_to_its_end() -> None:
    async def loud(ctx: Context) -> None:
        raise ValueError("start-of-message " + "x" * (2 * MAX_TRACEBACK_CHARS) + " end-of-it")

    out = await Execution(loud, {}).step(None, timeout_s=5)
    assert isinstance(out, Crash) and out.kind == "strategy_error"
    tb = out.traceback or ""
    assert tb.startswith("... (traceback cut)\n") and tb.rstrip().endswith("end-of-it"), tb[:80]
    assert len(tb) <= MAX_TRACEBACK_CHARS + len("... (traceback cut)\n")
    assert isinstance(out.exc, ValueError)  # for the worker's log line


async def test_a_chained_exception_keeps_its_cause() -> None:
    async def chained(ctx: Context) -> None:
        try:
            {}["missing"]
        except KeyError as exc:
            raise RuntimeError("lookup failed") from exc

    out = await Execution(chained, {}).step(None, timeout_s=5)
    assert isinstance(out, Crash) and out.error == "RuntimeError: lookup failed"
    tb = out.traceback or ""
    assert "KeyError: 'missing'" in tb and "direct cause" in tb, tb
