"""Compatibility: algocline host conversations replayed against ``coordinator mcp`` and the
HTTP API, every field of every reply checked against upstream's shapes.

Upstream's shapes (``algocline-engine/src/session.rs::FeedResult::to_json``, ``Session::
snapshot``, ``algocline-core/src/metrics.rs``, ``budget.rs``; the field-by-field comparison
is /work/shared/reference/algocline-upstream.md): key sets are compared exactly. Where ours
is a documented superset, the extra keys are named here (``OURS_*``) and compared exactly
too, so a key that appears or disappears fails the test either way.

Both fronts run against a real redis-server with a real ``coordinator worker`` process that
imports this module for its strategies; the MCP server is the real ``coordinator mcp``
command, driven by the SDK's stdio client; the HTTP API is the ASGI app, driven by httpx.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, Protocol

import httpx
import pytest
from mcp import Client

from coordinator.http_api import create_app
from coordinator.registry import SessionRegistry
from tests.helpers import assert_eventually
from tests.procs import WorkerPool
from tests.test_mcp import mcp_client
from workers.catalog import strategy
from workers.context import Context

pytestmark = [pytest.mark.redis]

THIS = "tests.test_host_compat"


# -- the strategies the conversations drive ----------------------------------------------

@strategy("compat-steps")
async def compat_steps(ctx: Context, task: str = "", fail: bool = False,
                       metric: bool = False, **_: Any) -> dict[str, Any]:
    """One question with a system prompt, then a batch of two with flags; a log line and
    progress first. ``fail`` raises after the batch; ``metric`` records a custom metric."""
    ctx.log("info", "starting")
    ctx.progress(1, 2, "first")
    first = await ctx.llm(f"Q1: {task}", system="be brief", max_tokens=64)
    ctx.progress(2, 2, "pair")
    pair = await ctx.llm_batch([
        {"prompt": f"P0: {first}", "grounded": True},
        {"prompt": "P1", "system": "sys", "underspecified": True}])
    if metric:
        ctx.metric("votes", 3)
    if fail:
        raise ValueError("the strategy gave up")
    return {"first": first, "pair": pair}


# -- upstream's shapes --------------------------------------------------------------------

#: ``FeedResult::to_json``. Ours adds ``session_id`` to every event of a start, and
#: ``type`` (the failure's kind) to an error.
NEEDS_ONE = {"status", "session_id", "query_id", "prompt", "system", "max_tokens"}
NEEDS_MANY = {"status", "session_id", "queries"}
QUERY = {"id", "prompt", "system", "max_tokens"}
ACCEPTED = {"status", "remaining"}
COMPLETED = {"status", "result", "stats"}
CANCELLED = {"status", "stats"}
ERROR = {"status", "error"}
OURS_START = {"session_id"}
OURS_ERROR = {"type"}
#: ``ExecutionMetrics::to_json``.
STATS = {"auto", "custom"}
AUTO = {"elapsed_ms", "llm_calls", "pauses", "rounds", "total_prompt_chars",
        "total_response_chars", "prompt_tokens", "response_tokens", "total_tokens"}
TOKEN_COUNT = {"tokens", "source"}
#: ``Session::snapshot`` + ``alc_status``'s ``strategy`` and ``session_id``; ours adds the
#: round the session is at (what a feed names to never answer another round).
SNAPSHOT = {"state", "phase", "started_at", "last_activity_at", "metrics", "strategy",
            "session_id"}
OURS_SNAPSHOT = {"round"}
#: A single session's status (not a listing's snapshots) also carries the input it was
#: started with and, while paused, every query id of the round (answered ones too).
OURS_STATUS = {"input", "round_query_ids"}
METRICS = {"elapsed_ms", "llm_calls", "rounds", "tokens", "recent_logs"}
TOKENS = {"prompt_total", "response_total", "total", "current_query"}
CURRENT_QUERY = {"query_id", "prompt_tokens", "started_waiting_at"}
#: ``recent_logs`` entries; ours numbers them (``seq``: what a reader has seen).
LOG = {"ts", "level", "source", "message"}
OURS_LOG = {"seq"}
PROGRESS = {"step", "total", "message"}
BUDGET_REMAINING = {"llm_calls", "elapsed_ms", "tokens"}
HISTORY = {"query_id", "prompt", "response", "prompt_tokens", "response_tokens",
           "started_at", "completed_at"}
#: Ours adds the round each exchange belongs to (1-based: the snapshot's ``round`` when the
#: query was asked), so round 2's ``q-0`` is told from round 1's.
OURS_HISTORY = {"round"}
#: ``alc_status`` without a session; ours is a bounded page with the counts per phase.
LISTING = {"active_sessions", "sessions"}
OURS_LISTING = {"counts", "next_cursor"}
#: ``project_query`` for each preset.
PENDING_META = {"query_id", "max_tokens"}
PENDING_PREVIEW = {"query_id", "max_tokens", "prompt_preview"}
PENDING_FULL = {"query_id", "max_tokens", "system", "grounded", "underspecified", "prompt"}


def keys(obj: dict[str, Any], expected: set[str], what: str) -> None:
    assert isinstance(obj, dict), f"{what} is {type(obj).__name__}, not an object"
    assert set(obj) == expected, (f"{what}: extra {sorted(set(obj) - expected)}, missing "
                                  f"{sorted(expected - set(obj))}")


def count(obj: dict[str, Any], tokens: int, source: str, what: str) -> None:
    keys(obj, TOKEN_COUNT, what)
    assert obj == {"tokens": tokens, "source": source}, what


def natural(value: Any, what: str) -> None:
    assert isinstance(value, int) and not isinstance(value, bool) and value >= 0, \
        f"{what} = {value!r}"


def check_stats(stats: dict[str, Any], *, calls: int, pauses: int, rounds: int,
                prompt_chars: int, response_chars: int, prompt: tuple[int, str],
                response: tuple[int, str], budget: dict[str, int] | None,
                custom: dict[str, Any]) -> None:
    keys(stats, STATS, "stats")
    auto = stats["auto"]
    keys(auto, AUTO | ({"budget"} if budget else set()), "stats.auto")
    natural(auto["elapsed_ms"], "stats.auto.elapsed_ms")
    assert (auto["llm_calls"], auto["pauses"], auto["rounds"]) == (calls, pauses, rounds)
    assert auto["total_prompt_chars"] == prompt_chars
    assert auto["total_response_chars"] == response_chars
    count(auto["prompt_tokens"], *prompt, "stats.auto.prompt_tokens")
    count(auto["response_tokens"], *response, "stats.auto.response_tokens")
    # the total is as precise as the less precise of its parts
    weaker = "estimated" if "estimated" in (prompt[1], response[1]) else "provided"
    count(auto["total_tokens"], prompt[0] + response[0], weaker, "stats.auto.total_tokens")
    if budget:
        assert auto["budget"] == budget
    assert stats["custom"] == custom


def estimate(*texts: str) -> int:
    """upstream's estimate for ASCII text, each text rounded up on its own."""
    return sum(-(-len(t) // 4) for t in texts)


# -- the two fronts, one interface ----------------------------------------------------------

class Host(Protocol):
    async def run(self, strategy: str, ctx: dict[str, Any], **extra: Any) -> dict[str, Any]:
        ...

    async def cont(self, sid: str, **args: Any) -> dict[str, Any]: ...

    async def status(self, sid: str | None = None, **args: Any) -> dict[str, Any]: ...

    async def cancel(self, sid: str) -> dict[str, Any]: ...

    async def refused(self, kind: str, call: str, **args: Any) -> dict[str, Any]: ...


class McpHost:
    """``coordinator mcp`` through the SDK's stdio client."""

    def __init__(self, client: Client) -> None:
        self.client = client

    async def _call(self, tool: str, args: dict[str, Any]) -> tuple[bool, dict[str, Any]]:
        res = await self.client.call_tool(tool, args)
        [content] = res.content
        return res.is_error, json.loads(content.text)  # type: ignore[union-attr]

    async def _ok(self, tool: str, args: dict[str, Any]) -> dict[str, Any]:
        failed, out = await self._call(tool, args)
        assert not failed, out
        return out

    async def run(self, strategy: str, ctx: dict[str, Any], **extra: Any) -> dict[str, Any]:
        return await self._ok("alc_run", {"strategy": strategy, "ctx": ctx, **extra})

    async def advice(self, strategy: str, task: str, opts: dict[str, Any]) -> dict[str, Any]:
        return await self._ok("alc_advice", {"strategy": strategy, "task": task,
                                             "opts": opts})

    async def cont(self, sid: str, **args: Any) -> dict[str, Any]:
        return await self._ok("alc_continue", {"session_id": sid, **args})

    async def status(self, sid: str | None = None, **args: Any) -> dict[str, Any]:
        return await self._ok("alc_status", {**({"session_id": sid} if sid else {}), **args})

    async def cancel(self, sid: str) -> dict[str, Any]:
        return await self._ok("alc_cancel", {"session_id": sid})

    async def refused(self, kind: str, call: str, **args: Any) -> dict[str, Any]:
        tool = {"run": "alc_run"}[call]
        failed, out = await self._call(tool, args)
        assert failed, out
        keys(out, ERROR | OURS_ERROR | ({"session_id"} if "session_id" in out else set()),
             "a refused call")
        assert out["type"] == kind, out
        return out


class HttpHost:
    """The HTTP API: the same conversations as routes and bodies."""

    def __init__(self, client: httpx.AsyncClient) -> None:
        self.client = client

    async def _ok(self, res: httpx.Response, status: int = 200) -> dict[str, Any]:
        assert res.status_code == status, res.text
        out: dict[str, Any] = res.json()
        return out

    async def run(self, strategy: str, ctx: dict[str, Any], **extra: Any) -> dict[str, Any]:
        body = {"strategy": strategy, "input": ctx, **extra}
        return await self._ok(await self.client.post("/sessions", json=body), 201)

    async def cont(self, sid: str, **args: Any) -> dict[str, Any]:
        return await self._ok(await self.client.post(f"/sessions/{sid}/responses", json=args))

    async def status(self, sid: str | None = None, **args: Any) -> dict[str, Any]:
        params = {"pending": args.pop("pending_filter")} if "pending_filter" in args else {}
        if args.pop("include_history", False):
            params["history"] = "true"
        assert not args, args
        return await self._ok(await self.client.get(f"/sessions/{sid}" if sid else "/sessions",
                                                    params=params))

    async def cancel(self, sid: str) -> dict[str, Any]:
        return await self._ok(await self.client.delete(f"/sessions/{sid}"))

    async def refused(self, kind: str, call: str, **args: Any) -> dict[str, Any]:
        assert call == "run"
        body = {"strategy": args.pop("strategy"), "input": args.pop("ctx", {}), **args}
        res = await self.client.post("/sessions", json=body)
        assert res.status_code == {"idempotency_conflict": 409, "invalid_input": 422}[kind], \
            res.text
        out: dict[str, Any] = res.json()
        keys(out, ERROR | OURS_ERROR | ({"session_id"} if "session_id" in out else set()),
             "a refused call")
        assert out["type"] == kind, out
        return out


@pytest.fixture
async def workers(worker_pool: WorkerPool) -> WorkerPool:
    worker_pool.imports = (THIS,)
    await worker_pool.start()
    return worker_pool


@asynccontextmanager
async def mcp_host(pool: WorkerPool) -> AsyncIterator[McpHost]:
    async with mcp_client(REDIS_URL=pool.url, ALC_NAMESPACE=pool.namespace) as client:
        yield McpHost(client)


@asynccontextmanager
async def http_host(pool: WorkerPool) -> AsyncIterator[HttpHost]:
    app = create_app(lambda: SessionRegistry.from_url(pool.url, namespace=pool.namespace,
                                                      wait_slice_s=0.2))
    async with (app.router.lifespan_context(app),
                httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                  base_url="http://api", timeout=30) as client):
        yield HttpHost(client)


# -- the conversations ------------------------------------------------------------------------

async def budget_and_usage(host: Host, *, ours_budget: bool = False) -> str:
    """``alc_run`` with ``ctx.budget``, a single then a batch pause, answers with usage (the
    token objects then say ``provided``), ``accepted``, and the completed shape."""
    limits = {"max_llm_calls": 5, "max_tokens": 100_000}
    first = await host.run("compat-steps", {"task": "T", "budget": limits})
    keys(first, NEEDS_ONE | OURS_START, "needs_response (one query)")
    sid = first["session_id"]
    assert (first["status"], first["query_id"], first["prompt"], first["system"],
            first["max_tokens"]) == ("needs_response", "q-0", "Q1: T", "be brief", 64)

    snap = await host.status(sid)
    keys(snap, SNAPSHOT | OURS_SNAPSHOT | OURS_STATUS | {"pending_queries"},
         "snapshot (paused)")
    assert snap["input"] == {"task": "T", "budget": limits}
    assert snap["round_query_ids"] == ["q-0"]
    assert (snap["state"], snap["phase"], snap["strategy"], snap["session_id"],
            snap["pending_queries"]) == ("paused", "paused", "compat-steps", sid, 1)
    natural(snap["started_at"], "started_at")
    assert snap["last_activity_at"] >= snap["started_at"]
    metrics = snap["metrics"]
    keys(metrics, METRICS | {"progress", "budget_remaining"}, "snapshot.metrics")
    natural(metrics["elapsed_ms"], "metrics.elapsed_ms")
    assert (metrics["llm_calls"], metrics["rounds"]) == (1, 0)
    asked = estimate("Q1: T", "be brief")
    keys(metrics["tokens"], TOKENS, "metrics.tokens")
    assert {k: v for k, v in metrics["tokens"].items() if k != "current_query"} == {
        "prompt_total": asked, "response_total": 0, "total": asked}
    [log] = metrics["recent_logs"]
    keys(log, LOG | OURS_LOG, "a recent_logs entry")
    assert (log["level"], log["source"], log["message"]) == ("info", "ctx.log", "starting")
    natural(log["ts"], "log ts")
    keys(metrics["progress"], PROGRESS, "metrics.progress")
    assert metrics["progress"] == {"step": 1, "total": 2, "message": "first"}
    keys(metrics["budget_remaining"], BUDGET_REMAINING, "metrics.budget_remaining")
    assert metrics["budget_remaining"] == {"llm_calls": 4, "tokens": 100_000 - asked,
                                           "elapsed_ms": None}

    pair = await host.cont(sid, response="A1",
                           usage={"prompt_tokens": 11, "completion_tokens": 7})
    keys(pair, NEEDS_MANY, "needs_response (several queries)")
    assert (pair["status"], pair["session_id"]) == ("needs_response", sid)
    q0, q1 = pair["queries"]
    keys(q0, QUERY | {"grounded"}, "a query with grounded")
    keys(q1, QUERY | {"underspecified"}, "a query with underspecified")
    assert q0 == {"id": "q-0", "prompt": "P0: A1", "system": None, "max_tokens": 1024,
                  "grounded": True}
    assert q1 == {"id": "q-1", "prompt": "P1", "system": "sys", "max_tokens": 1024,
                  "underspecified": True}

    partial = await host.cont(sid, responses=[
        {"query_id": "q-1", "response": "B1",
         "usage": {"prompt_tokens": 3, "completion_tokens": 2}}])
    keys(partial, ACCEPTED, "accepted")
    assert partial == {"status": "accepted", "remaining": 1}

    done = await host.cont(sid, responses=[
        {"query_id": "q-0", "response": "B0",
         "usage": {"prompt_tokens": 5, "completion_tokens": 4}}])
    keys(done, COMPLETED, "completed (after a continue)")
    assert done["status"] == "completed"
    assert done["result"] == {"first": "A1", "pair": ["B0", "B1"]}
    check_stats(done["stats"], calls=3, pauses=2, rounds=2,
                prompt_chars=len("Q1: T" "be brief" "P0: A1" "P1" "sys"),
                response_chars=len("A1" "B1" "B0"), prompt=(11 + 3 + 5, "provided"),
                response=(7 + 2 + 4, "provided"), budget=limits, custom={})
    return sid


async def listing_and_filters(host: Host) -> None:
    """``alc_status``'s list and its ``pending_filter`` presets."""
    first = await host.run("compat-steps", {"task": "L"})
    sid = first["session_id"]
    await host.cont(sid, response="A")  # now paused on the batch of two

    listing = await host.status(pending_filter="meta")
    keys(listing, LISTING | OURS_LISTING, "alc_status list")
    mine = [s for s in listing["sessions"] if s["session_id"] == sid]
    assert len(mine) == 1, listing
    keys(mine[0], SNAPSHOT | OURS_SNAPSHOT | {"pending_queries", "pending"},
         "a listed snapshot")
    assert mine[0]["strategy"] == "compat-steps" and mine[0]["pending_queries"] == 2
    assert listing["active_sessions"] >= 1
    natural(listing["active_sessions"], "active_sessions")

    for preset, fields in (("meta", PENDING_META), ("preview", PENDING_PREVIEW),
                           ("full", PENDING_FULL)):
        snap = await host.status(sid, pending_filter=preset)
        for item in snap["pending"]:
            keys(item, fields, f"a pending query ({preset})")
    full = (await host.status(sid, pending_filter="full"))["pending"]
    assert sorted(full, key=lambda q: q["query_id"]) == [
        {"query_id": "q-0", "max_tokens": 1024, "system": None, "grounded": True,
         "underspecified": False, "prompt": "P0: A"},
        {"query_id": "q-1", "max_tokens": 1024, "system": "sys", "grounded": False,
         "underspecified": True, "prompt": "P1"}]
    preview = (await host.status(sid, pending_filter="preview"))["pending"]
    assert sorted(q["prompt_preview"] for q in preview) == ["P0: A", "P1"]

    await host.cancel(sid)


async def ends(host: Host) -> None:
    """The error and cancelled shapes, budgets with nulls, our ``budget`` alias, a budget
    failure, estimated tokens, and idempotent starts."""
    first = await host.run("compat-steps", {"task": "E", "fail": True})
    sid = first["session_id"]
    await host.cont(sid, response="A", usage={"completion_tokens": 1})
    failed = await host.cont(sid, responses=[{"query_id": "q-0", "response": "x"},
                                             {"query_id": "q-1", "response": "y"}])
    keys(failed, ERROR | OURS_ERROR, "error")
    assert failed["status"] == "error" and failed["type"] == "strategy_error"
    assert "the strategy gave up" in failed["error"]

    tight = await host.run("compat-steps", {"task": "B", "budget": {"max_llm_calls": 2}})
    over = await host.cont(tight["session_id"], response="A")
    keys(over, ERROR | OURS_ERROR, "error (budget)")
    assert over["type"] == "budget_exceeded"
    assert over["error"].startswith("budget_exceeded: max_llm_calls (2)")

    alias = await host.run("compat-steps", {"task": "C"}, budget={"llm_calls": 3})
    snap = await host.status(alias["session_id"])
    assert snap["metrics"]["budget_remaining"] == {"llm_calls": 2, "elapsed_ms": None,
                                                   "tokens": None}
    await host.cont(alias["session_id"], response="A")  # answered: response estimated
    cancelled = await host.cancel(alias["session_id"])
    keys(cancelled, CANCELLED | OURS_START, "cancelled")
    assert cancelled["status"] == "cancelled"
    check_stats(cancelled["stats"], calls=3, pauses=2, rounds=1,
                prompt_chars=len("Q1: C" "be brief" "P0: A" "P1" "sys"),
                response_chars=1,
                prompt=(estimate("Q1: C", "be brief", "P0: A", "P1", "sys"), "estimated"),
                response=(estimate("A"), "estimated"), budget={"max_llm_calls": 3},
                custom={})

    again = {"task": "I"}
    one = await host.run("compat-steps", again, idempotency_key="compat-key", ttl=600)
    two = await host.run("compat-steps", again, idempotency_key="compat-key", ttl=600)
    assert two == one  # the same session, at the same pause
    clash = await host.refused("idempotency_conflict", "run", strategy="compat-steps",
                               ctx={"task": "other"}, idempotency_key="compat-key")
    assert clash.get("session_id", one["session_id"]) == one["session_id"]
    await host.refused("invalid_input", "run", strategy="compat-steps", ctx={}, ttl=0)


# -- the tests --------------------------------------------------------------------------------

async def test_conversations_over_coordinator_mcp(workers: WorkerPool) -> None:
    async with mcp_host(workers) as host:
        await budget_and_usage(host)
        await listing_and_filters(host)
        await ends(host)


async def test_conversations_over_http(workers: WorkerPool) -> None:
    async with http_host(workers) as host:
        await budget_and_usage(host)
        await listing_and_filters(host)
        await ends(host)


async def test_mcp_only_advice_object_filters_metrics_and_progress(workers: WorkerPool
                                                                   ) -> None:
    """``alc_advice``'s completed result is the whole ctx; the object ``pending_filter``;
    ``stats.custom``; only completion tokens given: those ``provided``, the rest estimated;
    progress notifications over stdio."""
    async with mcp_host(workers) as host:
        first = await host.advice("compat-steps", "T", {"tag": "x", "metric": True})
        keys(first, NEEDS_ONE | OURS_START, "needs_response (advice)")
        sid = first["session_id"]
        await host.cont(sid, response="A1", usage={"completion_tokens": 5})

        shaped = await host.status(sid, pending_filter={
            "query_id": True, "grounded": True, "prompt": {"mode": "preview", "chars": 3}})
        assert sorted(shaped["pending"], key=lambda q: q["query_id"]) == [
            {"query_id": "q-0", "grounded": True, "prompt_preview": "P0:"},
            {"query_id": "q-1", "grounded": False, "prompt_preview": "P1"}]
        system_only = await host.status(sid, pending_filter={"system": True})
        assert sorted(system_only["pending"], key=lambda q: str(q["system"])) == [
            {"system": None}, {"system": "sys"}]
        whole = await host.status(sid, pending_filter={"prompt": {"mode": "full"}})
        assert sorted(q["prompt"] for q in whole["pending"]) == ["P0: A1", "P1"]

        heard: list[str] = []

        async def hear(progress: float, total: float | None, message: str | None) -> None:
            heard.append(message or "")

        res = await host.client.call_tool("alc_continue", {"session_id": sid, "responses": [
            {"query_id": "q-0", "response": "B0", "usage": {"completion_tokens": 2}},
            {"query_id": "q-1", "response": "B1", "usage": {"completion_tokens": 3}}]},
            progress_callback=hear)
        done = json.loads(res.content[0].text)  # type: ignore[union-attr]
        keys(done, COMPLETED, "completed (advice)")
        assert done["result"] == {"task": "T", "tag": "x", "metric": True,
                                  "result": {"first": "A1", "pair": ["B0", "B1"]}}
        check_stats(done["stats"], calls=3, pauses=2, rounds=2,
                    prompt_chars=len("Q1: T" "be brief" "P0: A1" "P1" "sys"),
                    response_chars=len("A1" "B0" "B1"),
                    prompt=(estimate("Q1: T", "be brief", "P0: A1", "P1", "sys"),
                            "estimated"),
                    response=(5 + 2 + 3, "provided"), budget=None, custom={"votes": 3})
        # the last step logged nothing and left the progress as it was: only the end is news
        await assert_eventually(lambda: heard == ["completed"], message="progress over stdio")


async def test_snapshot_current_query_and_history_are_upstreams(workers: WorkerPool) -> None:
    """``metrics.tokens.current_query`` is the query waited on (``{query_id, prompt_tokens,
    started_waiting_at}``, null when none) and ``metrics.conversation_history`` the last
    exchanges with their tokens and times, as ``ExecutionMetrics::snapshot`` has them."""
    async with mcp_host(workers) as host:
        first = await host.run("compat-steps", {"task": "H"})
        sid = first["session_id"]
        asked = estimate("Q1: H", "be brief")
        current = (await host.status(sid))["metrics"]["tokens"]["current_query"]
        keys(current, CURRENT_QUERY, "metrics.tokens.current_query")
        assert (current["query_id"], current["prompt_tokens"]) == ("q-0", asked)
        natural(current["started_waiting_at"], "current_query.started_waiting_at")

        await host.cont(sid, response="A", usage={"prompt_tokens": 9, "completion_tokens": 2})
        snap = await host.status(sid, include_history=True)
        assert "conversation_history" not in snap  # it is part of the metrics
        history = snap["metrics"]["conversation_history"]
        answered = [h for h in history if h["response"] is not None]
        [entry] = answered
        keys(entry, HISTORY | OURS_HISTORY, "a conversation_history entry")
        assert (entry["query_id"], entry["prompt"], entry["response"],
                entry["prompt_tokens"], entry["response_tokens"]) == ("q-0", "Q1: H", "A", 9, 2)
        assert entry["round"] == 1
        natural(entry["started_at"], "history started_at")
        assert entry["completed_at"] >= entry["started_at"]
        for waiting in history:
            keys(waiting, HISTORY | OURS_HISTORY, "a conversation_history entry")

        await host.cont(sid, responses=[{"query_id": "q-0", "response": "x"},
                                        {"query_id": "q-1", "response": "y"}])
        done = await host.status(sid)
        assert done["metrics"]["tokens"]["current_query"] is None
