"""MCP progress notifications and ``notifications/cancelled``, through the SDK's own client
(``progress_callback``; cancelling a call sends the notification) connected in-process to
``build_server`` on an in-process cluster whose worker steps the sessions, on fakeredis and
on a real redis-server.

A call that carries a progress token hears its session's new log lines, its progress and
the pause or end it waited for, each notification's progress above the last; one without a
token hears nothing. A cancelled ``alc_run`` / ``alc_continue`` cancels its session.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from mcp import Client

from coordinator.mcp_server import build_server
from tests.conftest import FakeCluster
from tests.helpers import GATES, Gate, assert_eventually
from tests.test_mcp import call
from workers.catalog import strategy
from workers.context import Context

ON_BOTH_SERVERS = True


@strategy("progress-demo")
async def progress_demo(ctx: Context, task: str = "", **_: Any) -> dict[str, Any]:
    """Two questions, with a log line and a progress report around each."""
    ctx.progress(1, 3, "asking")
    ctx.log("info", "first question")
    first = await ctx.llm(f"first: {task}")
    ctx.log("warn", f"got {first}")
    ctx.progress(2, 3, "second")
    second = await ctx.llm("second")
    ctx.progress(3, 3, "done")
    return {"first": first, "second": second}


@strategy("progress-gated")
async def progress_gated(ctx: Context, tag: str = "", before: bool = False,
                         **_: Any) -> dict[str, Any]:
    """Holds its step at the gate ``tag``: before its question (``before``), or after
    the answer, so a test acts while a call waits on the step."""
    if before and not ctx.replaying:
        GATES[tag].entered.set()
        await GATES[tag].open.wait()
    answer = await ctx.llm(f"{tag}: question")
    if not before and not ctx.replaying:
        GATES[tag].entered.set()
        await GATES[tag].open.wait()
    return {"answer": answer}


Note = tuple[float, float | None, str | None]


@asynccontextmanager
async def connect(reg: Any, every_s: float = 10.0) -> AsyncIterator[Client]:
    """A client on the JSON-RPC path, as over stdio: the SDK's in-process shortcut (its
    default here) calls a progress callback directly, with no progress token on the wire."""
    async with Client(build_server(reg, progress_every_s=every_s), mode="legacy") as client:
        yield client


async def call_heard(client: Client, tool: str, **args: Any) -> tuple[dict[str, Any],
                                                                      list[Note]]:
    """A tool's JSON result and the progress notifications it sent, all of them: the
    last one (the pause or the end) is awaited, as the client hands notifications to the
    callback in tasks of their own."""
    heard: list[Note] = []

    async def hear(progress: float, total: float | None, message: str | None) -> None:
        heard.append((progress, total, message))

    res = await client.call_tool(tool, args, progress_callback=hear)
    assert not res.is_error, res.content
    out: dict[str, Any] = json.loads(res.content[0].text)  # type: ignore[union-attr]
    end = out["status"]
    await assert_eventually(lambda: heard and (heard[-1][2] or "").startswith(end),
                            message=f"the {end} notification")
    return out, heard


def increasing(heard: list[Note]) -> None:
    values = [p for p, _, _ in heard]
    assert values == sorted(set(values)), f"progress must grow with each notification: {values}"


async def test_a_call_with_a_token_hears_logs_progress_and_its_pause_or_end(
    fake_cluster: FakeCluster,
) -> None:
    await fake_cluster.worker()
    async with connect(fake_cluster.registry()) as client:
        first, heard = await call_heard(client, "alc_run", strategy="progress-demo",
                                        ctx={"task": "t"})
        sid = first["session_id"]
        assert heard == [
            (0.0, None, f"session {sid} started (progress-demo)"),
            (0.5, None, "info: first question"),
            (1.0, 3.0, "step 1 of 3: asking"),
            (1.5, 3.0, "needs_response: 1 query to answer (q-0)"),
        ]
        second, heard = await call_heard(client, "alc_continue", session_id=sid,
                                         response="A")
        assert second["status"] == "needs_response"
        assert heard == [  # only what this call brought: not the first round's log again
            (1.0, 3.0, "warn: got A"),
            (2.0, 3.0, "step 2 of 3: second"),
            (2.5, 3.0, "needs_response: 1 query to answer (q-0)"),
        ]
        end, heard = await call_heard(client, "alc_continue", session_id=sid, response="B")
        assert end["status"] == "completed" and end["result"] == {"first": "A", "second": "B"}
        assert heard == [(3.0, 3.0, "step 3 of 3: done"), (3.5, 3.5, "completed")]
        increasing(heard)



async def test_a_batch_an_accepted_answer_and_a_failure_are_reported(
    fake_cluster: FakeCluster,
) -> None:
    await fake_cluster.worker()
    async with connect(fake_cluster.registry()) as client:
        first, heard = await call_heard(client, "alc_run", strategy="sc",
                                        ctx={"task": "2+2", "n": 3})
        sid = first["session_id"]
        assert heard[-1][2] == "needs_response: 3 queries to answer (q-0, q-1, q-2)"
        increasing(heard)
        part, heard = await call_heard(client, "alc_continue", session_id=sid,
                                       query_id="q-1", response="4")
        assert part == {"status": "accepted", "remaining": 2}
        assert heard[-1][2] == "accepted: 2 answers of the round still missing"

        bad, heard = await call_heard(client, "alc_run", strategy="progress-demo",
                                      ctx={"task": "t", "budget": {"max_llm_calls": 1}})
        end, heard = await call_heard(client, "alc_continue",
                                      session_id=bad["session_id"], response="A")
        assert end["status"] == "error" and end["type"] == "budget_exceeded"
        assert heard[-1][2] == f"error (budget_exceeded): {end['error']}"
        assert heard[-1][0] == heard[-1][1]  # the end: progress == total
        increasing(heard)


async def test_a_long_wait_says_the_session_still_runs(
    fake_cluster: FakeCluster, gates: dict[str, Gate],
) -> None:
    gates["slow"] = gate = Gate()
    await fake_cluster.worker()
    async with connect(fake_cluster.registry(), every_s=0.05) as client:
        first = await call(client, "alc_run", strategy="progress-gated", ctx={"tag": "slow"})
        sid = first["session_id"]
        heard: list[Note] = []

        async def hear(progress: float, total: float | None, message: str | None) -> None:
            heard.append((progress, total, message))

        answering = asyncio.ensure_future(client.call_tool(
            "alc_continue", {"session_id": sid, "response": "yes"}, progress_callback=hear))
        await asyncio.wait_for(gate.entered.wait(), 10)
        running = f"session {sid} is running"
        await assert_eventually(lambda: sum(m == running for _, _, m in heard) >= 2,
                                message="two notifications while the step is held")
        gate.open.set()
        res = await answering
        out = json.loads(res.content[0].text)  # type: ignore[union-attr]
        assert out["status"] == "completed" and out["result"] == {"answer": "yes"}
        await assert_eventually(lambda: heard[-1][2] == "completed")
        increasing(heard)


async def test_cancelling_a_waiting_call_cancels_its_session(
    fake_cluster: FakeCluster, gates: dict[str, Gate],
) -> None:
    """The SDK's client sends notifications/cancelled when a call is abandoned; the
    server cancels the session that call was waiting on: a start (before its first
    event) and a continue (while the worker steps)."""
    gates["run"], gates["cont"] = run_gate, cont_gate = Gate(), Gate()
    await fake_cluster.worker()
    reg = fake_cluster.registry()
    async with connect(reg) as client:
        starting = asyncio.ensure_future(client.call_tool(
            "alc_run", {"strategy": "progress-gated", "ctx": {"tag": "run", "before": True}}))
        await asyncio.wait_for(run_gate.entered.wait(), 10)
        [held] = (await reg.list_sessions(phase="running")).sessions
        starting.cancel()
        await assert_eventually(lambda: phase_of(reg, held["session_id"], "cancelled"))

        first = await call(client, "alc_run", strategy="progress-gated", ctx={"tag": "cont"})
        sid = first["session_id"]
        answering = asyncio.ensure_future(client.call_tool(
            "alc_continue", {"session_id": sid, "response": "yes"}))
        await asyncio.wait_for(cont_gate.entered.wait(), 10)
        answering.cancel()
        await assert_eventually(lambda: phase_of(reg, sid, "cancelled"))

        # a call that ended normally leaves its session alone
        other = await call(client, "alc_run", strategy="progress-demo")
        assert (await reg.status(other["session_id"]))["phase"] == "paused"


async def phase_of(reg: Any, sid: str, phase: str) -> bool:
    return bool((await reg.status(sid))["phase"] == phase)
