"""The MCP server, through the official SDK's own client over stdio: ``python -m coordinator
mcp`` as a subprocess, on the embedded default (no Redis at all) and on a real redis-server
with a worker process. Tools are named and shaped like algocline's; results are the
``to_json`` shapes as JSON text, errors the coordinator error's ``to_json()`` with isError.
"""

from __future__ import annotations

import json
import secrets
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest
from mcp import Client
from mcp.client.stdio import StdioServerParameters

from tests.test_http_api import ROOT, Procs, clean_env, cli, live_workers

TOOLS = {"alc_run", "alc_advice", "alc_continue", "alc_status", "alc_cancel", "alc_strategies"}


#: The test strategies (``mp-rounds``: rounds of width queries; its result is every answer).
STRATEGIES = "tests.strategies_mp"


@asynccontextmanager
async def mcp_client(*args: str, **env: str) -> AsyncIterator[Client]:
    """``coordinator mcp`` (with ``args``, e.g. ``--import MODULE``), through the SDK's
    stdio client."""
    params = StdioServerParameters(command=sys.executable,
                                   args=["-m", "coordinator", "mcp", *args],
                                   env=clean_env(**env), cwd=str(ROOT))
    async with Client(params) as client:
        yield client


async def call(client: Client, tool: str, **args: Any) -> dict[str, Any]:
    """A tool's result as the JSON it carries; fails the test if the tool errored."""
    res = await client.call_tool(tool, args)
    assert not res.is_error, res.content
    [content] = res.content
    out: dict[str, Any] = json.loads(content.text)  # type: ignore[union-attr]
    return out


async def call_error(client: Client, tool: str, **args: Any) -> dict[str, Any]:
    res = await client.call_tool(tool, args)
    assert res.is_error, res.content
    out: dict[str, Any] = json.loads(res.content[0].text)  # type: ignore[union-attr]
    assert out["status"] == "error"
    return out


async def test_tools_are_algoclines() -> None:
    async with mcp_client() as client:
        tools = {t.name: t for t in (await client.list_tools()).tools}
        info = client.server_info
    assert set(tools) == TOOLS
    assert info is not None and info.version == metadata.version("alc-coordinator")
    cont = tools["alc_continue"].input_schema
    assert set(cont["properties"]) == {"session_id", "response", "query_id", "responses",
                                       "usage"}
    assert cont["required"] == ["session_id"]
    status = tools["alc_status"].input_schema
    assert set(status["properties"]) == {"session_id", "pending_filter", "include_history",
                                         "limit", "phase", "strategy", "cursor"}
    assert not status.get("required")
    # a preset, or algocline's object naming the fields
    forms = status["properties"]["pending_filter"]["anyOf"]
    assert {"enum": ["meta", "preview", "full"], "type": "string"} in forms
    [shape] = [status["$defs"][f["$ref"].rsplit("/", 1)[1]] for f in forms if "$ref" in f]
    assert set(shape["properties"]) == {"query_id", "max_tokens", "system", "grounded",
                                        "underspecified", "prompt"}
    assert set(tools["alc_run"].input_schema["properties"]) == {
        "strategy", "ctx", "budget", "ttl", "idempotency_key"}
    assert set(tools["alc_advice"].input_schema["properties"]) == {
        "strategy", "task", "opts", "ttl", "idempotency_key"}
    assert tools["alc_cancel"].input_schema["required"] == ["session_id"]
    assert not tools["alc_strategies"].input_schema.get("properties")


async def test_run_to_completion_embedded() -> None:
    """No REDIS_URL: the server runs on the embedded in-process Redis and workers."""
    async with mcp_client("--import", STRATEGIES) as client:
        first = await call(client, "alc_run", strategy="mp-rounds",
                           ctx={"tag": "t", "rounds": 3, "width": 1})
        sid = first["session_id"]
        assert first["status"] == "needs_response" and first["query_id"] == "q-0"
        assert first["prompt"] == "session t: round 0, item 0"

        listed = await call(client, "alc_status", pending_filter="preview")
        assert listed["counts"]["paused"] == 1 and listed["next_cursor"] is None
        [snap] = listed["sessions"]
        assert snap["session_id"] == sid and snap["pending"][0]["query_id"] == "q-0"

        event, n = first, 0
        while event["status"] == "needs_response":
            n += 1
            event = await call(client, "alc_continue", session_id=sid, response=f"answer {n}")
        assert event["status"] == "completed" and n == 3
        assert event["result"] == {"tag": "t", "rounds": [["answer 1"], ["answer 2"],
                                                          ["answer 3"]]}
        assert event["stats"]["auto"]["llm_calls"] == 3

        status = await call(client, "alc_status", session_id=sid, include_history=True)
        assert status["phase"] == "completed" and status["result"] == event["result"]
        assert [e["response"] for e in status["metrics"]["conversation_history"]] == [
            "answer 1", "answer 2", "answer 3"]
        after = await call(client, "alc_status")
        assert after["active_sessions"] == 0 and after["counts"]["completed"] == 1
        assert [(s["session_id"], s["phase"]) for s in after["sessions"]] == [
            (sid, "completed")]  # listed while retained

        gone = await call_error(client, "alc_cancel", session_id=sid)
        assert gone["type"] == "invalid_transition" and gone["state"] == "completed"


async def test_advice_batch_partial_and_errors_embedded() -> None:
    async with mcp_client("--import", STRATEGIES) as client:
        first = await call(client, "alc_advice", strategy="mp-rounds", task="2+2",
                           opts={"tag": "v", "rounds": 1})
        sid = first["session_id"]
        assert [q["id"] for q in first["queries"]] == ["q-0", "q-1", "q-2"]

        sole = await call_error(client, "alc_continue", session_id=sid, response="4")
        assert sole["type"] == "no_pending_query" and "q-0, q-1, q-2" in sole["error"]
        assert await call(client, "alc_continue", session_id=sid, query_id="q-2",
                          response="5", usage={"completion_tokens": 3}) == {
            "status": "accepted", "remaining": 2}
        dup = await call_error(client, "alc_continue", session_id=sid, query_id="q-2",
                               response="5")
        assert dup["type"] == "already_responded" and dup["query_id"] == "q-2"
        done = await call(client, "alc_continue", session_id=sid, responses=[
            {"query_id": "q-0", "response": "4"}, {"query_id": "q-1", "response": "4"}])
        # alc_advice's result is algocline's: the whole ctx, the strategy's result inside
        assert done["status"] == "completed" and done["result"] == {
            "task": "2+2", "tag": "v", "rounds": 1,
            "result": {"tag": "v", "rounds": [["4", "4", "5"]]}}

        assert (await call_error(client, "alc_run", strategy="no-such"))["type"] == \
            "unknown_strategy"
        assert (await call_error(client, "alc_continue", session_id="s-0-0",
                                 response="x"))["type"] == "not_found"
        assert (await call_error(client, "alc_continue", session_id=sid))["type"] == \
            "invalid_input"
        second = await call(client, "alc_run", strategy="mp-rounds", ctx={"tag": "c"})
        cancelled = await call(client, "alc_cancel", session_id=second["session_id"])
        assert cancelled["status"] == "cancelled" and "stats" in cancelled
        bad = await client.call_tool("alc_status", {"pending_filter": "everything"})
        assert bad.is_error  # the SDK validates arguments against the tool's schema


@pytest.mark.redis
async def test_run_on_real_redis(redis_url: str, tmp_path: Path) -> None:
    """With REDIS_URL the server is a host of the shared deployment: a worker process
    steps the session, and a second MCP server sees it too. Before any worker is up, a run
    is refused at once as no_worker (it could only wait) and no strategy is listed."""
    ns = f"mcp{secrets.token_hex(4)}"
    procs = Procs(tmp_path)
    try:
        env = {"REDIS_URL": redis_url, "ALC_NAMESPACE": ns}
        async with mcp_client(**env) as one, mcp_client(**env) as other:
            refused = await call_error(one, "alc_run", strategy="mp-rounds", ctx={"tag": "x"})
            assert refused["type"] == "no_worker" and "mp-rounds" in refused["error"]
            assert await call(other, "alc_strategies") == {"strategies": []}
            procs.spawn("worker", cli("worker", "--redis", redis_url, "--namespace", ns,
                                      "--import", STRATEGIES))
            await live_workers(redis_url, ns, 1)
            offered = (await call(other, "alc_strategies"))["strategies"]
            assert {s["name"]: s["workers"] for s in offered}["mp-rounds"] == 1

            first = await call(one, "alc_run", strategy="mp-rounds",
                               ctx={"tag": "x", "rounds": 2, "width": 1})
            sid = first["session_id"]
            seen = await call(other, "alc_status", session_id=sid, pending_filter="full")
            assert seen["phase"] == "paused" and seen["pending"][0]["prompt"] == first["prompt"]
            step = await call(other, "alc_continue", session_id=sid, response="2 and 2")
            assert step["status"] == "needs_response" and step["query_id"] == "q-0"
            final = await call(one, "alc_continue", session_id=sid, query_id="q-0",
                               response="4")
            assert final["status"] == "completed"
            assert final["result"] == {"tag": "x", "rounds": [["2 and 2"], ["4"]]}
    finally:
        procs.close()
