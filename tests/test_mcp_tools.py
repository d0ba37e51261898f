"""The MCP tools as an LLM host sees them, through the SDK's own client connected in-process
to ``build_server`` on an in-process cluster (fakeredis, and a real redis-server): what the
descriptions tell the model, the version the server reports, the strategy list, the bounded
session listing and its paging, and the error a host gets when no worker can run a strategy.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib import metadata
from typing import Any

from mcp import Client

import tests.strategies_mp  # noqa: F401  (registers mp-rounds and mp-slow)
from coordinator.mcp_server import build_server
from tests.conftest import FakeCluster
from tests.test_mcp import TOOLS, call, call_error

ON_BOTH_SERVERS = True

#: What each tool's description must point the model to after its result.
NEXT_STEP = {
    "alc_run": "answer each pending query with alc_continue",
    "alc_advice": "answer each pending query with alc_continue",
    "alc_continue": "alc_continue",
    "alc_status": "cursor=next_cursor",
    "alc_cancel": "alc_run",
    "alc_strategies": "alc_run",
}


@asynccontextmanager
async def connect(reg: Any, **kwargs: Any) -> AsyncIterator[Client]:
    async with Client(build_server(reg), **kwargs) as client:
        yield client


def one_paragraph(text: str | None, what: str) -> None:
    """Text a model reads as it is: no indentation, hard line breaks or doubled spaces."""
    assert text, f"{what} has no description"
    assert "\n" not in text and "  " not in text and text == text.strip(), f"{what}: {text!r}"


def schema_descriptions(schema: dict[str, Any], where: str) -> list[tuple[str, str | None]]:
    """(where, description) of every argument, nested models' fields and models included."""
    out = [(f"{where}.{name}", prop.get("description"))
           for name, prop in schema.get("properties", {}).items()]
    for name, sub in schema.get("$defs", {}).items():
        out.append((f"{where}.$defs.{name}", sub.get("description")))
        out.extend(schema_descriptions(sub, f"{where}.$defs.{name}"))
    return out


async def test_each_description_is_one_paragraph_that_says_what_to_do_next(
    registry: Any,
) -> None:
    async with connect(registry, mode="legacy") as client:
        tools = {t.name: t for t in (await client.list_tools()).tools}
        init = client.session.initialize_result
    assert set(tools) == TOOLS
    for name, tool in tools.items():
        one_paragraph(tool.description, name)
        assert NEXT_STEP[name] in (tool.description or ""), (name, tool.description)
        for where, text in schema_descriptions(tool.input_schema, name):
            one_paragraph(text, where)
    assert init is not None and init.instructions is not None
    one_paragraph(init.instructions, "instructions")
    assert "alc_strategies" in init.instructions and "alc_continue" in init.instructions
    status = tools["alc_status"]
    assert status.annotations is not None and status.annotations.read_only_hint
    assert "page" in (status.description or "")


async def test_the_server_reports_the_installed_version(registry: Any) -> None:
    installed = metadata.version("alc-coordinator")
    assert installed
    async with connect(registry, mode="legacy") as client:
        init = client.session.initialize_result
        assert init is not None and init.server_info.version == installed
        assert init.server_info.name == "alc-coordinator"
    async with connect(registry) as client:  # the newer discover handshake says it too
        assert client.server_info is not None and client.server_info.version == installed


async def test_strategies_lists_what_live_workers_offer_with_their_inputs(
    fake_cluster: FakeCluster,
) -> None:
    await fake_cluster.worker()
    await fake_cluster.worker()
    async with connect(fake_cluster.registry()) as client:
        listed = await call(client, "alc_strategies")
        resource = await client.read_resource("alc://strategies")
    by_name = {s["name"]: s for s in listed["strategies"]}
    assert [s["name"] for s in listed["strategies"]] == sorted(by_name)
    assert {"cot", "reflect", "sc", "mp-rounds"} <= set(by_name)
    rounds = by_name["mp-rounds"]
    assert rounds["workers"] == 2
    assert rounds["description"].startswith("``rounds`` rounds of ``width`` queries each")
    params = {p["name"]: p for p in rounds["params"]}
    assert params["rounds"]["default"] == 5 and params["rounds"]["required"] is False
    assert params["rounds"]["annotation"] == "int"
    assert params["width"]["default"] == 3
    [content] = resource.contents
    assert json.loads(content.text) == listed  # type: ignore[union-attr]


async def test_no_live_worker_is_a_no_worker_error_and_an_empty_list(
    fake_cluster: FakeCluster,
) -> None:
    """A worker that has gone offers nothing: starting its strategy is refused at once
    (the session would only wait), with a type the host can act on."""
    worker = await fake_cluster.worker()
    async with connect(fake_cluster.registry()) as client:
        assert (await call(client, "alc_strategies"))["strategies"]
    await fake_cluster.stop_worker(worker)
    async with connect(fake_cluster.registry()) as client:
        refused = await call_error(client, "alc_run", strategy="cot", ctx={"task": "t"})
        assert refused["type"] == "no_worker" and "cot" in refused["error"]
        advice = await call_error(client, "alc_advice", strategy="reflect", task="t")
        assert advice["type"] == "no_worker"
        assert await call(client, "alc_strategies") == {"strategies": []}
        listing = await call(client, "alc_status")
    assert listing["sessions"] == [] and listing["active_sessions"] == 0  # nothing queued


async def start_many(client: Client, strategy: str, n: int) -> list[str]:
    return [(await call(client, "alc_run", strategy=strategy,
                        ctx={"tag": f"t{i}", "rounds": 1, "width": 1}))["session_id"]
            for i in range(n)]


async def pages(client: Client, **filters: Any) -> list[dict[str, Any]]:
    """Every page of alc_status's listing, following next_cursor."""
    out = [await call(client, "alc_status", **filters)]
    while out[-1]["next_cursor"] is not None:
        out.append(await call(client, "alc_status", cursor=out[-1]["next_cursor"], **filters))
        assert len(out) < 50, "the cursor does not advance"
    return out


async def test_status_without_a_session_is_one_bounded_page_with_counts(
    fake_cluster: FakeCluster,
) -> None:
    await fake_cluster.worker()
    async with connect(fake_cluster.registry()) as client:
        cots = await start_many(client, "mp-rounds", 23)
        reflects = await start_many(client, "mp-slow", 3)
        done = cots[0]
        await call(client, "alc_continue", session_id=done, response="4")

        first = await call(client, "alc_status")
        assert set(first) == {"active_sessions", "counts", "sessions", "next_cursor"}
        assert len(first["sessions"]) == 20 and first["next_cursor"] is not None
        assert first["active_sessions"] == 25
        assert first["counts"] == {"running": 0, "paused": 25, "completed": 1, "failed": 0,
                                   "cancelled": 0}
        assert all(s["session_id"] for s in first["sessions"])

        listed = [s["session_id"] for p in await pages(client) for s in p["sessions"]]
        assert sorted(listed) == sorted(cots + reflects)  # each once, the finished one too

        small = await pages(client, limit=7, phase="paused")
        assert [len(p["sessions"]) for p in small] == [7, 7, 7, 4]
        assert {s["phase"] for p in small for s in p["sessions"]} == {"paused"}

        by_strategy = [s for p in await pages(client, strategy="mp-slow", limit=2)
                       for s in p["sessions"]]
        assert sorted(s["session_id"] for s in by_strategy) == sorted(reflects)

        [completed] = (await call(client, "alc_status", phase="completed"))["sessions"]
        assert completed["session_id"] == done and completed["phase"] == "completed"
        preview = await call(client, "alc_status", limit=1, phase="paused",
                             pending_filter="preview")
        assert preview["sessions"][0]["pending"][0]["query_id"] == "q-0"


async def test_status_arguments_are_checked(registry: Any) -> None:
    async with connect(registry) as client:
        for bad in ({"limit": 0}, {"limit": 101}, {"phase": "sleeping"}):
            err = await call_error(client, "alc_status", **bad)
            assert err["type"] == "invalid_input", bad
            assert next(iter(bad)) in err["error"]
        mixed = await call_error(client, "alc_status", session_id="s-0-0", limit=5)
        assert mixed["type"] == "invalid_input" and "without session_id" in mixed["error"]
        bad_cursor = await call_error(client, "alc_status", cursor="not a cursor")
        assert bad_cursor["type"] == "invalid_input"
        missing = await call_error(client, "alc_status", session_id="s-0-0")
        assert missing["type"] == "not_found"
        for shape in ({"prompt_text": True}, {"prompt": {"mode": "some"}},
                      {"prompt": {"mode": "preview", "chars": -1}}, {"query_id": "yes"}):
            err = await call_error(client, "alc_status", pending_filter=shape)
            assert err["type"] == "invalid_input" and "pending_filter" in err["error"], shape
        for start in ({"ttl": 0}, {"ttl": -2}, {"idempotency_key": ""},
                      {"budget": {"max_llm_calls": 1.5}}):
            err = await call_error(client, "alc_run", strategy="mp-rounds", **start)
            assert err["type"] == "invalid_input", start
