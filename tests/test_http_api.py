"""The HTTP API: shapes, status codes, auth and server-sent events in process (httpx against
the ASGI app, a real redis-server and real worker processes), the CLI's refusal to serve a
public address without a token, and the issue's test: two ``coordinator serve`` processes
and two workers on one Redis, driven by alternating requests between the two APIs.

Every subprocess is killed at teardown, whatever the test's outcome.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio
import redis
import redis.asyncio

from coordinator.codec import pack
from coordinator.http_api import create_app, is_loopback
from coordinator.keys import Keys
from coordinator.registry import SessionRegistry
from tests.asgi_stream import AsgiStream
from tests.helpers import assert_eventually, free_port
from tests.redis_proc import RedisProcess

pytestmark = [pytest.mark.redis]

ROOT = Path(__file__).resolve().parents[1]
WAIT_S = 30.0
#: Quick wake-ups for registries in these tests (a lost pub/sub message costs 0.2 s).
FAST = {"wait_slice_s": 0.2}


# -- subprocesses --------------------------------------------------------------------------

def clean_env(**extra: str) -> dict[str, str]:
    """This environment minus whatever would pick a Redis, settings or a token behind the
    test's back, with the repo root importable."""
    env = {k: v for k, v in os.environ.items()
           if k != "REDIS_URL" and not k.startswith(("ALC_", "PYTEST_"))}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    env.update(extra)
    return env


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "coordinator", *args]


@dataclass
class Procs:
    """Processes a test starts; ``close`` terminates (then kills) them all, and each one's
    output goes to a log file whose tail a failing test can print."""

    log_dir: Path
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def spawn(self, name: str, argv: list[str], **env: str) -> subprocess.Popen[bytes]:
        with (self.log_dir / f"{name}.log").open("wb") as log:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log,
                                    stderr=subprocess.STDOUT, env=clean_env(**env), cwd=ROOT)
        self.procs[name] = proc
        return proc

    def workers(self, url: str, ns: str, n: int = 2) -> None:
        for i in range(n):
            self.spawn(f"worker-{i}", cli("worker", "--redis", url, "--namespace", ns,
                                          "--concurrency", "4"))

    def log(self, name: str) -> str:
        return (self.log_dir / f"{name}.log").read_text(errors="replace")[-3000:]

    def close(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


async def live_workers(url: str, ns: str, n: int) -> None:
    """Return once ``n`` workers of ``ns`` have a live heartbeat key."""
    client = redis.asyncio.Redis.from_url(url)
    keys = Keys(ns)

    async def ready() -> bool:
        ids = await client.zrange(keys.workers, 0, -1)
        alive = [await client.exists(keys.worker(i.decode())) for i in ids]
        return sum(alive) >= n

    try:
        await assert_eventually(ready, timeout=WAIT_S, message=f"{n} workers in {ns}")
    finally:
        await client.aclose()


@dataclass(frozen=True)
class Stack:
    url: str
    ns: str

    def registry(self, **overrides: Any) -> SessionRegistry:
        return SessionRegistry.from_url(self.url, namespace=self.ns, **{**FAST, **overrides})


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stack(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    """A private redis-server and two worker processes shared by this module's in-process
    tests (sessions have unique ids, so tests cannot see each other's)."""
    procs = Procs(tmp_path_factory.mktemp("http-workers"))
    server = RedisProcess()
    try:
        server.start()
        ns = f"http{secrets.token_hex(4)}"
        procs.workers(server.url, ns)
        await live_workers(server.url, ns, 2)
        yield Stack(server.url, ns)
    finally:
        procs.close()
        server.close()


@asynccontextmanager
async def api(
    factory: Any, token: str | None = None, headers: dict[str, str] | None = None
) -> AsyncIterator[httpx.AsyncClient]:
    """An httpx client on the ASGI app, its lifespan run (so the registry is closed)."""
    app = create_app(factory, token, keepalive_s=0.3)
    async with (app.router.lifespan_context(app),
                httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                  base_url="http://api", headers=headers, timeout=WAIT_S) as c):
        c.app = app  # type: ignore[attr-defined]
        yield c


@asynccontextmanager
async def served(app: Any) -> AsyncIterator[str]:
    """``app`` under a real uvicorn server on a free loopback port, in this event loop (the
    HTTP test modules share it); yields its base URL, and stops it at the end."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port,
                                           log_level="warning", lifespan="on",
                                           timeout_graceful_shutdown=5))
    task = asyncio.create_task(server.serve())
    try:
        await assert_eventually(lambda: server.started or task.done(), timeout=WAIT_S,
                                message="uvicorn did not start")
        if task.done():
            raise AssertionError(f"uvicorn stopped at start-up: {task.exception()!r}")
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, WAIT_S)


@pytest_asyncio.fixture
async def client(stack: Stack) -> AsyncIterator[httpx.AsyncClient]:
    async with api(stack.registry) as c:
        yield c


def error(res: httpx.Response, status: int, kind: str) -> dict[str, Any]:
    assert res.status_code == status, res.text
    body: dict[str, Any] = res.json()
    assert body["status"] == "error" and body["type"] == kind, body
    assert isinstance(body["error"], str) and body["error"]
    return body


async def answer_all(c: httpx.AsyncClient, event: dict[str, Any], text: str) -> dict[str, Any]:
    """Answer every pause with ``text`` (a bare response, or a batch) until the end."""
    sid = event["session_id"]
    while event["status"] == "needs_response":
        if "queries" in event:
            body: dict[str, Any] = {"responses": [
                {"query_id": q["id"], "response": text} for q in event["queries"]]}
        else:
            body = {"response": text}
        res = await c.post(f"/sessions/{sid}/responses", json=body)
        assert res.status_code == 200, res.text
        event = res.json()
    return event


# -- shapes --------------------------------------------------------------------------------

async def test_start_and_answer_reflect_to_completion(client: httpx.AsyncClient) -> None:
    res = await client.post("/sessions", json={"strategy": "reflect", "input": {
        "task": "Design a cache", "max_rounds": 1}})
    assert res.status_code == 201, res.text
    first = res.json()
    sid = first["session_id"]
    assert res.headers["location"] == f"/sessions/{sid}"
    assert first["status"] == "needs_response"
    assert set(first) == {"session_id", "status", "query_id", "prompt", "system", "max_tokens"}
    assert first["query_id"] == "q-0" and "Design a cache" in first["prompt"]

    final = await answer_all(client, first, "fine")
    assert final == {"status": "completed", "result": final["result"], "stats": final["stats"]}
    assert final["result"]["output"] == "fine"
    assert final["stats"]["auto"]["llm_calls"] == 3

    snap = (await client.get(f"/sessions/{sid}")).json()
    assert snap["session_id"] == sid and snap["phase"] == "completed"
    assert snap["result"] == final["result"]  # retained after the end


async def test_start_takes_a_ttl_an_idempotency_key_and_algoclines_budget(
    client: httpx.AsyncClient, stack: Stack
) -> None:
    body = {"strategy": "cot", "input": {"task": "t", "budget": {"max_llm_calls": 7}},
            "ttl": 90, "idempotency_key": "http-k1"}
    first = await client.post("/sessions", json=body)
    assert first.status_code == 201, first.text
    again = await client.post("/sessions", json=body)
    assert again.status_code == 201 and again.json() == first.json()
    sid = first.json()["session_id"]
    clash = await client.post("/sessions", json={**body, "input": {"task": "other"}})
    assert error(clash, 409, "idempotency_conflict")
    snap = (await client.get(f"/sessions/{sid}")).json()
    assert snap["metrics"]["budget_remaining"] == {"llm_calls": 6, "tokens": None,
                                                   "elapsed_ms": None}
    async with stack.registry() as reg:
        assert int(await reg.redis.execute("HGET", reg.keys.session(sid).session,
                                           "ttl_ms")) == 90_000
    ours = await client.post("/sessions", json={"strategy": "cot", "input": {"task": "t"},
                                                "budget": {"max_tokens": 500}})
    snap = (await client.get(f"/sessions/{ours.json()['session_id']}")).json()
    assert snap["metrics"]["budget_remaining"]["llm_calls"] is None
    for bad in ({"ttl": 0}, {"ttl": -1}, {"idempotency_key": ""}, {"ttl": "soon"}):
        error(await client.post("/sessions", json={"strategy": "cot", **bad}), 422,
              "invalid_input")


async def test_batch_partial_and_sole_pending_rules(client: httpx.AsyncClient) -> None:
    first = (await client.post("/sessions", json={"strategy": "sc",
                                                  "input": {"task": "2+2", "n": 3}})).json()
    sid = first["session_id"]
    assert [q["id"] for q in first["queries"]] == ["q-0", "q-1", "q-2"]

    bare = await client.post(f"/sessions/{sid}/responses", json={"response": "4"})
    assert "3 queries are pending (q-0, q-1, q-2)" in error(bare, 422, "no_pending_query")["error"]

    one = await client.post(f"/sessions/{sid}/responses",
                            json={"query_id": "q-1", "response": "4",
                                  "usage": {"completion_tokens": 7}})
    assert one.json() == {"status": "accepted", "remaining": 2}
    again = await client.post(f"/sessions/{sid}/responses", json={"query_id": "q-1",
                                                                  "response": "5"})
    assert error(again, 409, "already_responded")["query_id"] == "q-1"
    unknown = await client.post(f"/sessions/{sid}/responses", json={"query_id": "q-9",
                                                                    "response": "5"})
    error(unknown, 422, "unknown_query")

    rest = await client.post(f"/sessions/{sid}/responses", json={"responses": [
        {"query_id": "q-0", "response": "4"}, {"query_id": "q-2", "response": "5"}]})
    extract = rest.json()  # sc: one answer extraction per path, then a consensus
    assert [q["id"] for q in extract["queries"]] == ["q-0", "q-1", "q-2"], extract
    consensus = (await client.post(f"/sessions/{sid}/responses", json={"responses": [
        {"query_id": q, "response": a} for q, a in (("q-0", "4"), ("q-1", "4"), ("q-2", "5"))]
    })).json()
    assert consensus["status"] == "needs_response" and consensus["query_id"] == "q-0"
    done = (await client.post(f"/sessions/{sid}/responses", json={"response": "4"})).json()
    assert done["status"] == "completed", done
    assert done["result"]["answer"] == "4" and done["result"]["vote_counts"] == {"4": 2, "5": 1}


async def test_an_answer_for_another_round_is_409_and_writes_nothing(
    client: httpx.AsyncClient
) -> None:
    """`round` pins answers to the round the caller saw (the console always sends it): a
    session at another round refuses them, single or batch, and records nothing."""
    first = (await client.post("/sessions", json={"strategy": "sc",
                                                  "input": {"task": "2+2", "n": 3}})).json()
    sid = first["session_id"]
    at = (await client.get(f"/sessions/{sid}")).json()["round"]
    assert at >= 1
    for body in ({"query_id": "q-0", "response": "4", "round": at + 1},
                 {"query_id": "q-0", "response": "4", "round": at - 1 or 99},
                 {"responses": [{"query_id": "q-0", "response": "4"},
                                {"query_id": "q-1", "response": "4"}], "round": at + 1}):
        stale = error(await client.post(f"/sessions/{sid}/responses", json=body), 409,
                      "stale_round")
        assert stale["query_id"] == "q-0" and stale["state"] == f"round {at}"
    snap = (await client.get(f"/sessions/{sid}", params={"pending": "meta"})).json()
    assert snap["pending_queries"] == 3 and len(snap["pending"]) == 3  # nothing written
    for bad in (0, -1, "1", 1.5, True, 2**48):
        error(await client.post(f"/sessions/{sid}/responses", json={
            "query_id": "q-0", "response": "4", "round": bad}), 422, "invalid_input")

    one = await client.post(f"/sessions/{sid}/responses",
                            json={"query_id": "q-1", "response": "4", "round": at})
    assert one.json() == {"status": "accepted", "remaining": 2}
    rest = (await client.post(f"/sessions/{sid}/responses", json={"responses": [
        {"query_id": "q-0", "response": "4"}, {"query_id": "q-2", "response": "5"}],
        "round": at})).json()
    assert rest["status"] == "needs_response" and len(rest["queries"]) == 3  # the next round
    late = await client.post(f"/sessions/{sid}/responses",
                             json={"query_id": "q-1", "response": "4", "round": at})
    assert error(late, 409, "stale_round")["state"] == f"round {at + 1}"


async def test_status_shows_the_input_and_every_query_id_of_the_round(
    client: httpx.AsyncClient
) -> None:
    """A single session's status carries its input and, while paused, all of the round's
    query ids (answered ones included); a listing stays as it was (neither field)."""
    first = (await client.post("/sessions", json={"strategy": "sc", "input": {
        "task": "2+2", "n": 3}})).json()
    sid = first["session_id"]
    snap = (await client.get(f"/sessions/{sid}")).json()
    assert snap["input"] == {"task": "2+2", "n": 3}
    assert snap["round_query_ids"] == ["q-0", "q-1", "q-2"]
    await client.post(f"/sessions/{sid}/responses", json={"query_id": "q-1", "response": "4"})
    snap = (await client.get(f"/sessions/{sid}", params={"pending": "meta"})).json()
    assert snap["round_query_ids"] == ["q-0", "q-1", "q-2"]
    assert [q["query_id"] for q in snap["pending"]] == ["q-0", "q-2"]
    page = (await client.get("/sessions", params={"phase": "paused", "limit": 1000})).json()
    [listed] = [s for s in page["sessions"] if s["session_id"] == sid]
    assert "input" not in listed and "round_query_ids" not in listed

    ended = (await client.delete(f"/sessions/{sid}")).json()
    assert ended["status"] == "cancelled"
    snap = (await client.get(f"/sessions/{sid}")).json()
    assert snap["input"] == {"task": "2+2", "n": 3} and "round_query_ids" not in snap


async def test_workers_route_shows_live_workers_and_dead_letters(
    client: httpx.AsyncClient, stack: Stack
) -> None:
    body = (await client.get("/workers")).json()
    assert set(body) == {"workers", "dead_letter_count", "dead_letters"}
    ids = [w["worker_id"] for w in body["workers"]]
    assert len(ids) == 2 and ids == sorted(ids)
    for w in body["workers"]:
        assert w["concurrency"] == 4 and {"cot", "sc"} <= set(w["strategies"])
        assert isinstance(w["at"], int) and isinstance(w["busy"], int)
        assert isinstance(w["steps"], int) and isinstance(w["replays"], int)
    before = body["dead_letter_count"]

    async with stack.registry() as reg:  # two dead letters, as a worker records them
        for n in range(2):
            await reg.redis.execute("XADD", reg.keys.dead_letters, "*", "sid", f"s-dead-{n}",
                                    "job", "0-1", "reason", "test", "error", f"e{n}",
                                    "at", "1")
    body = (await client.get("/workers", params={"dead": 1})).json()
    assert body["dead_letter_count"] == before + 2
    [newest] = body["dead_letters"]
    assert newest["sid"] == "s-dead-1" and newest["error"] == "e1" and newest["id"]
    two = (await client.get("/workers", params={"dead": 2})).json()["dead_letters"]
    assert [d["sid"] for d in two] == ["s-dead-1", "s-dead-0"]
    for bad in (0, 1001, "x"):
        error(await client.get("/workers", params={"dead": bad}), 422, "invalid_input")


async def test_list_and_status_options(client: httpx.AsyncClient) -> None:
    first = (await client.post("/sessions", json={"strategy": "cot",
                                                  "input": {"task": "x" * 300}})).json()
    sid = first["session_id"]
    page = (await client.get("/sessions", params={"pending": "preview",
                                                  "phase": "paused"})).json()
    listed = {s["session_id"]: s for s in page["sessions"]}
    assert listed[sid]["phase"] == "paused" and listed[sid]["pending_queries"] == 1
    [pending] = listed[sid]["pending"]
    assert pending["query_id"] == "q-0" and len(pending["prompt_preview"]) == 200
    assert "conversation_history" not in listed[sid]["metrics"]

    await client.post(f"/sessions/{sid}/responses", json={"response": "step 1"})
    snap = (await client.get(f"/sessions/{sid}",
                             params={"pending": "full", "history": "true"})).json()
    assert snap["pending"][0]["prompt"].endswith("Build on previous reasoning. 1-2 sentences.")
    assert snap["metrics"]["conversation_history"][0]["response"] == "step 1"
    error(await client.get("/sessions", params={"pending": "all"}), 422, "invalid_input")


async def test_cancel_then_errors_for_finished_and_unknown(client: httpx.AsyncClient) -> None:
    sid = (await client.post("/sessions", json={"strategy": "cot",
                                                "input": {"task": "t"}})).json()["session_id"]
    res = await client.delete(f"/sessions/{sid}")
    assert res.status_code == 200 and res.json()["status"] == "cancelled", res.text
    assert error(await client.delete(f"/sessions/{sid}"), 409,
                 "invalid_transition")["state"] == "cancelled"
    for body in ({"response": "x"}, {"query_id": "q-0", "response": "x"}):
        ended = error(await client.post(f"/sessions/{sid}/responses", json=body), 409,
                      "invalid_transition")
        assert ended["state"] == "cancelled"

    ghost = "s-0-" + "0" * 32
    error(await client.get(f"/sessions/{ghost}"), 404, "not_found")
    error(await client.delete(f"/sessions/{ghost}"), 404, "not_found")
    error(await client.get(f"/sessions/{ghost}/events"), 404, "not_found")
    error(await client.post(f"/sessions/{ghost}/responses",
                            json={"query_id": "q-0", "response": "x"}), 404, "not_found")
    error(await client.get("/sessions/bad%7Bid%7D"), 422, "invalid_input")
    error(await client.get("/nowhere"), 404, "not_found")


async def test_bad_bodies_are_422_never_500(client: httpx.AsyncClient) -> None:
    bad_json = await client.post("/sessions", content=b'{"strategy": ',
                                 headers={"content-type": "application/json"})
    assert "not valid JSON" in error(bad_json, 422, "invalid_input")["error"]
    not_object = await client.post("/sessions", content=b"[1, 2]",
                                   headers={"content-type": "application/json"})
    error(not_object, 422, "invalid_input")
    no_type = await client.post("/sessions", content=b'{"strategy": "cot"}')
    assert "JSON object" in error(no_type, 422, "invalid_input")["error"]
    error(await client.post("/sessions", json={"strategy": "nope"}), 422, "unknown_strategy")
    error(await client.post("/sessions", json={"strategy": "cot", "budget": {}}), 422,
          "invalid_input")
    error(await client.post("/sessions", json={"strategy": "cot", "budget": {"tokens": "9"}}),
          422, "invalid_input")
    error(await client.post("/sessions", json={"strategy": "cot", "extra": 1}), 422,
          "invalid_input")
    huge = await client.post("/sessions", json={"strategy": "cot", "input": {"n": 10**30}})
    assert "64-bit" in error(huge, 422, "invalid_input")["error"]
    surrogate = await client.post("/sessions", content=b'{"strategy": "cot", '
                                  b'"input": {"task": "\\ud800"}}',
                                  headers={"content-type": "application/json"})
    assert "surrogate" in error(surrogate, 422, "invalid_input")["error"]

    sid = (await client.post("/sessions", json={"strategy": "cot",
                                                "input": {"task": "t"}})).json()["session_id"]
    path = f"/sessions/{sid}/responses"
    error(await client.post(path, json={}), 422, "invalid_input")
    error(await client.post(path, json={"response": "a", "responses": [
        {"query_id": "q-0", "response": "a"}]}), 422, "invalid_input")
    error(await client.post(path, json={"responses": []}), 422, "invalid_input")
    error(await client.post(path, json={"responses": [{"query_id": "q-0", "response": "a"},
                                                      {"query_id": "q-0", "response": "b"}]}),
          422, "invalid_input")
    error(await client.post(path, json={"response": 5}), 422, "invalid_input")


async def test_payload_too_large_is_413(stack: Stack) -> None:
    async with api(lambda: stack.registry(max_response_bytes=64, max_input_bytes=64)) as c:
        big_input = await c.post("/sessions", json={"strategy": "cot",
                                                    "input": {"task": "x" * 100}})
        error(big_input, 413, "payload_too_large")
        sid = (await c.post("/sessions", json={"strategy": "cot",
                                               "input": {"task": "t"}})).json()["session_id"]
        big = await c.post(f"/sessions/{sid}/responses", json={"response": "y" * 100})
        error(big, 413, "payload_too_large")


async def test_no_worker_is_503_at_once(stack: Stack) -> None:
    """A namespace no worker serves: the start is refused at once, naming the cause."""
    idle = Stack(stack.url, f"idle{secrets.token_hex(4)}")
    async with api(idle.registry) as c:
        res = await c.post("/sessions", json={"strategy": "cot", "input": {"task": "t"}})
        assert "worker" in error(res, 503, "no_worker")["error"]


async def test_wait_timeout_is_504_and_the_session_carries_on(stack: Stack) -> None:
    """A live worker that offers the strategy but never takes the job (a heartbeat key
    written here, no process behind it): the start waits its bound, then 504, not a hang;
    the session stays queued."""
    idle = Stack(stack.url, f"idle{secrets.token_hex(4)}")
    keys = Keys(idle.ns)
    client = redis.asyncio.Redis.from_url(stack.url)
    try:
        await client.set(keys.worker("busy"), pack({"strategies": ["cot"]}), px=60_000)
        await client.zadd(keys.workers, {"busy": 1})
        async with api(idle.registry) as c:
            res = await c.post("/sessions", params={"timeout": 1},
                               json={"strategy": "cot", "input": {"task": "t"}})
            body = error(res, 504, "wait_timeout")
            snap = (await c.get(f"/sessions/{body['session_id']}")).json()
            assert snap["phase"] == "running"
            error(await c.post("/sessions", params={"timeout": 0}, json={"strategy": "cot"}),
                  422, "invalid_input")
    finally:
        await client.delete(keys.worker("busy"))
        await client.aclose()


async def test_sessions_page_filters_and_cursor(client: httpx.AsyncClient) -> None:
    """GET /sessions: every phase, filtered, paged by cursor (each session once), with the
    counts; bad filters are 422 in the usual error shape."""
    mine = [(await client.post("/sessions", json={"strategy": "cot", "input": {
        "task": f"page {i}"}})).json()["session_id"] for i in range(3)]
    cancelled = (await client.delete(f"/sessions/{mine[0]}")).json()
    assert cancelled["status"] == "cancelled"

    seen: list[str] = []
    params: dict[str, Any] = {"phase": "paused", "strategy": "cot", "limit": 2}
    for _ in range(100):
        page = (await client.get("/sessions", params=params)).json()
        assert set(page) == {"active_sessions", "counts", "sessions", "next_cursor"}
        assert len(page["sessions"]) <= 2
        for snap in page["sessions"]:
            assert next(iter(snap)) == "session_id"
            assert snap["phase"] == "paused" and snap["strategy"] == "cot"
        seen += [snap["session_id"] for snap in page["sessions"]]
        if page["next_cursor"] is None:
            break
        params["cursor"] = page["next_cursor"]
    assert len(seen) == len(set(seen)) and set(mine[1:]) <= set(seen)
    assert mine[0] not in seen

    ended = (await client.get("/sessions", params={"phase": "cancelled",
                                                   "limit": 1000})).json()
    assert mine[0] in {snap["session_id"] for snap in ended["sessions"]}
    counts = ended["counts"]
    assert set(counts) == {"running", "paused", "completed", "failed", "cancelled"}
    assert counts["cancelled"] >= 1 and counts["paused"] >= 2
    assert ended["active_sessions"] == counts["running"] + counts["paused"]

    for bad in ({"phase": "asleep"}, {"limit": 0}, {"limit": 1001}, {"limit": "x"},
                {"cursor": "not-a-cursor"}, {"pending": "all"}, {"strategy": ""}):
        error(await client.get("/sessions", params=bad), 422, "invalid_input")


async def test_strategies_lists_what_live_workers_offer(client: httpx.AsyncClient) -> None:
    body = (await client.get("/strategies")).json()
    by_name = {s["name"]: s for s in body["strategies"]}
    assert [s["name"] for s in body["strategies"]] == sorted(by_name)
    assert {"cot", "reflect", "sc"} <= set(by_name)
    sc = by_name["sc"]
    assert sc["workers"] == 2 and "majority vote" in sc["description"]
    params = {p["name"]: p for p in sc["params"]}
    assert params["n"]["default"] == 5 and params["n"]["required"] is False
    assert "task" in params


async def test_openapi_document(client: httpx.AsyncClient) -> None:
    doc = (await client.get("/openapi.json")).json()
    assert doc["openapi"].startswith("3.")
    assert {"/sessions", "/sessions/{session_id}", "/sessions/{session_id}/responses",
            "/sessions/{session_id}/events", "/healthz"} <= set(doc["paths"])
    assert {"/strategies", "/metrics", "/workers", "/events"} <= set(doc["paths"])
    assert set(doc["paths"]["/sessions/{session_id}"]) == {"get", "delete"}
    assert "securitySchemes" not in doc.get("components", {})  # no token, no auth
    listing = doc["paths"]["/sessions"]["get"]
    assert {p["name"] for p in listing["parameters"]} == {
        "phase", "strategy", "limit", "cursor", "pending", "history"}
    assert all(p.get("description") for p in listing["parameters"])
    assert listing["responses"]["200"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/SessionPage"}
    page = doc["components"]["schemas"]["SessionPage"]["properties"]
    assert {"active_sessions", "counts", "sessions", "next_cursor"} <= set(page)
    events = doc["paths"]["/sessions/{session_id}/events"]["get"]
    assert "Last-Event-ID" in {p["name"] for p in events["parameters"]}
    for path in ("/strategies", "/metrics", "/sessions/{session_id}/events", "/workers",
                 "/events"):
        assert doc["paths"][path]["get"]["description"], path
    feed = doc["components"]["schemas"]["FeedRequest"]["properties"]
    assert "stale_round" in feed["round"]["description"]
    assert {p["name"] for p in doc["paths"]["/workers"]["get"]["parameters"]} == {"dead"}
    assert "text/event-stream" in doc["paths"]["/events"]["get"]["responses"]["200"]["content"]


# -- auth ----------------------------------------------------------------------------------

async def test_bearer_token(stack: Stack) -> None:
    async with api(stack.registry, token="s3cret") as c:
        missing = await c.get("/sessions")
        error(missing, 401, "unauthorized")
        assert missing.headers["www-authenticate"] == "Bearer"
        error(await c.get("/sessions", headers={"Authorization": "Bearer wrong"}), 401,
              "unauthorized")
        error(await c.post("/sessions", json={"strategy": "cot"},
                           headers={"Authorization": "Basic s3cret"}), 401, "unauthorized")
        ok = await c.get("/sessions", headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200
        for path in ("/strategies", "/metrics"):
            error(await c.get(path), 401, "unauthorized")
            assert (await c.get(path, headers={"Authorization": "Bearer s3cret"})
                    ).status_code == 200
        assert (await c.get("/healthz")).status_code == 200  # probes need no token
        doc = (await c.get("/openapi.json")).json()
        assert "HTTPBearer" in doc["components"]["securitySchemes"]


def test_loopback_rule() -> None:
    assert all(map(is_loopback, ["127.0.0.1", "localhost", "::1", "[::1]", "127.1.2.3"]))
    assert not any(map(is_loopback, ["0.0.0.0", "::", "10.0.0.1", "example.org"]))


def test_serve_refuses_a_public_address_without_token() -> None:
    proc = subprocess.run(cli("serve", "--host", "0.0.0.0", "--port", str(free_port()),
                              "--redis", "redis://127.0.0.1:1/0"),
                          env=clean_env(), capture_output=True, timeout=WAIT_S, cwd=ROOT)
    assert proc.returncode == 2, proc.stderr
    out = json.loads((proc.stdout or proc.stderr).strip().splitlines()[-1])  # the JSON error
    assert out["type"] == "invalid_input" and "ALC_API_TOKEN" in out["error"]


# -- health --------------------------------------------------------------------------------

async def test_healthz_counts_only_live_heartbeats(client: httpx.AsyncClient,
                                                   stack: Stack) -> None:
    ghost = redis.Redis.from_url(stack.url)
    try:  # a worker in the index whose heartbeat key is gone: dead, not counted
        ghost.zadd(Keys(stack.ns).workers, {"ghost-worker": 1})
        body = (await client.get("/healthz")).json()
    finally:
        ghost.zrem(Keys(stack.ns).workers, "ghost-worker")
        ghost.close()
    assert body["status"] == "ok" and body["redis"] == "ok" and body["workers"] == 2
    assert "ghost-worker" not in body["worker_ids"]


async def test_healthz_503_when_redis_is_unreachable() -> None:
    dead = Stack(f"redis://127.0.0.1:{free_port()}/0", "dead")
    async with api(dead.registry) as c:
        res = await c.get("/healthz")
    assert res.status_code == 503 and res.json()["redis"] == "unreachable"


# -- server-sent events --------------------------------------------------------------------

class RawStream(AsgiStream):
    """A session's event stream, read as its events come (``tests.asgi_stream``)."""

    def __init__(self, app: Any, path: str) -> None:
        super().__init__(app, path, wait_s=WAIT_S)
        self.ids: list[tuple[int, ...]] = []

    async def next(self) -> dict[str, Any] | str | None:
        """The next event as {event, id, data}, "keep-alive", or None at the stream's end."""
        fields = await self.block()
        if not isinstance(fields, dict):
            return fields
        return {"event": fields["event"], "id": fields["id"], "data": json.loads(fields["data"])}

    async def next_event(self) -> dict[str, Any] | None:
        while (item := await self.next()) == "keep-alive":
            pass
        assert not isinstance(item, str)
        if item is not None:
            self.ids.append(key(item["id"]))
        return item

    async def next_settled(self) -> dict[str, Any] | None:
        """The next pause or end, past the logs and progress before it."""
        while (item := await self.next_event()) is not None and \
                item["event"] in ("log", "progress"):
            pass
        return item


def key(event_id: str) -> tuple[int, ...]:
    return tuple(int(n) for n in event_id.split("."))


async def test_events_stream_each_event_once_as_it_happens(client: httpx.AsyncClient) -> None:
    first = (await client.post("/sessions", json={"strategy": "reflect", "input": {
        "task": "t", "max_rounds": 2}})).json()
    sid = first["session_id"]
    stream = RawStream(client.app, f"/sessions/{sid}/events")  # type: ignore[attr-defined]
    try:
        assert await asyncio.wait_for(stream.status, WAIT_S) == 200
        ev = await stream.next_settled()
        assert ev is not None and ev["event"] == "needs_response"
        assert ev["data"] == first  # the current pause, in the to_json shape
        assert await stream.next() == "keep-alive"  # nothing new: only keep-alives
        prompts = [first["prompt"]]
        for n in range(2, 6):  # draft, 2 x (critique, revision)
            res = (await client.post(f"/sessions/{sid}/responses",
                                     json={"response": f"a{n}"})).json()
            ev = await stream.next_settled()
            assert ev is not None and ev["event"] == "needs_response" and ev["data"] == res
            prompts.append(res["prompt"])
        final = (await client.post(f"/sessions/{sid}/responses", json={"response": "a6"})).json()
        ev = await stream.next_settled()
        assert ev is not None and ev["event"] == "completed"
        assert ev["data"] == {"session_id": sid, **final}
        assert await stream.next() is None  # the stream ends after the end
        assert len(set(prompts)) == 5
        assert stream.ids == sorted(set(stream.ids))  # increasing, none twice
    finally:
        await stream.close()


async def test_events_stream_ends_on_cancel(client: httpx.AsyncClient) -> None:
    sid = (await client.post("/sessions", json={"strategy": "cot", "input": {
        "task": "t"}})).json()["session_id"]
    stream = RawStream(client.app, f"/sessions/{sid}/events")  # type: ignore[attr-defined]
    try:
        assert (await stream.next_settled() or {})["event"] == "needs_response"
        await client.delete(f"/sessions/{sid}")
        ev = await stream.next_settled()
        assert ev is not None and ev["event"] == "cancelled" and ev["data"]["session_id"] == sid
        assert await stream.next() is None
    finally:
        await stream.close()


async def test_events_stream_stops_when_the_client_goes(client: httpx.AsyncClient) -> None:
    sid = (await client.post("/sessions", json={"strategy": "cot", "input": {
        "task": "t"}})).json()["session_id"]
    stream = RawStream(client.app, f"/sessions/{sid}/events")  # type: ignore[attr-defined]
    assert await stream.next_event() is not None
    await stream.close()  # returns only once the app's handler has finished
    assert stream.task.done() and stream.task.exception() is None


# -- the test: two API processes, two workers, alternating requests ----------------

@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Procs]:
    p = Procs(tmp_path)
    try:
        yield p
    finally:
        p.close()


class Alternating:
    """One session's requests, sent to the two APIs in turn (starting with ``first``), so
    every session is driven by both."""

    def __init__(self, clients: list[httpx.AsyncClient], first: int) -> None:
        self.clients = clients
        self.n = first
        self.used: list[int] = []

    async def post(self, path: str, **kw: Any) -> httpx.Response:
        i = self.n % len(self.clients)
        self.n += 1
        self.used.append(i)
        return await self.clients[i].post(path, **kw)


async def drive(apis: Alternating, strategy: str, input: dict[str, Any]) -> dict[str, Any]:
    res = await apis.post("/sessions", json={"strategy": strategy, "input": input})
    assert res.status_code == 201, res.text
    event = res.json()
    sid = event["session_id"]
    while event["status"] == "needs_response":
        queries = event.get("queries") or [{"id": event["query_id"], "prompt": event["prompt"]}]
        for q in queries:  # one answer per request, so a round spans both APIs
            res = await apis.post(f"/sessions/{sid}/responses", json={
                "query_id": q["id"], "response": f"re: {q['prompt'][-20:]}"})
            assert res.status_code == 200, res.text
            event = res.json()
        assert event["status"] != "accepted"
    assert set(apis.used) == {0, 1}
    return {"session_id": sid, **event}


@pytest.mark.slow
async def test_two_api_processes_two_workers_alternating(
    redis_url: str, procs: Procs
) -> None:
    ns = f"api{secrets.token_hex(4)}"
    ports = [free_port(), free_port()]
    for i, port in enumerate(ports):
        procs.spawn(f"api-{i}", cli("serve", "--redis", redis_url, "--namespace", ns,
                                    "--host", "127.0.0.1", "--port", str(port)),
                    ALC_WAIT_SLICE_S="0.2")
    procs.workers(redis_url, ns)
    clients = [httpx.AsyncClient(base_url=f"http://127.0.0.1:{p}", timeout=WAIT_S)
               for p in ports]
    try:
        async def healthy() -> bool:
            for c in clients:
                try:
                    body = (await c.get("/healthz")).json()
                except httpx.TransportError:
                    return False
                if body.get("workers") != 2:
                    return False
            return True

        await assert_eventually(healthy, timeout=WAIT_S, message="2 APIs see 2 workers: "
                                + procs.log("api-0") + procs.log("api-1"))
        jobs = [*(("cot", {"task": f"job {i}", "depth": 4}) for i in range(4)),
                *(("sc", {"task": f"vote {i}", "n": 3}) for i in range(3)),
                ("cot", {"task": "think"})]
        results = await asyncio.gather(*(drive(Alternating(clients, n), strategy, input)
                                         for n, (strategy, input) in enumerate(jobs)))
        assert all(r["status"] == "completed" for r in results), results
        for r in results[:4]:
            assert r["result"]["conclusion"].startswith("re: ")
            assert r["stats"]["auto"]["llm_calls"] == 5
        for r in results:  # each API reads every session's retained result
            for c in clients:
                snap = (await c.get(f"/sessions/{r['session_id']}")).json()
                assert snap["phase"] == "completed" and snap["result"] == r["result"]
        page = (await clients[1].get("/sessions", params={"phase": "paused"})).json()
        assert page["sessions"] == [] and page["counts"]["paused"] == 0  # none left paused
        assert page["counts"]["completed"] == len(jobs)
        await events_across_apis_and_graceful_shutdown(clients, procs)
    finally:
        for c in clients:
            await c.aclose()


async def embedded_ready(c: httpx.AsyncClient, procs: Procs, name: str) -> None:
    """Until the embedded ``serve`` process ``name`` answers /healthz with its 2 workers."""
    async def healthy() -> bool:
        try:
            return (await c.get("/healthz")).json().get("workers") == 2
        except httpx.TransportError:
            return False

    await assert_eventually(healthy, timeout=WAIT_S, message=f"{name}: " + procs.log(name))


@pytest.mark.slow
async def test_serve_without_a_redis_url_runs_the_embedded_default(procs: Procs) -> None:
    """No ``--redis`` and no ``REDIS_URL``: ``serve`` runs the embedded in-process Redis with
    its own two workers, so the API and the console at /ui work on a machine with nothing
    else installed, and a session runs to its exact result."""
    from tests.strategies_console import QUIZ, expected_result

    port = free_port()
    procs.spawn("embedded", cli("serve", "--port", str(port),
                                "--import", "tests.strategies_console"))
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=WAIT_S) as c:
        await embedded_ready(c, procs, "embedded")
        assert "no Redis URL given" in procs.log("embedded")
        ui = await c.get("/ui/")
        assert ui.status_code == 200 and ui.headers["content-type"].startswith("text/html")
        assert [s["name"] for s in (await c.get("/strategies")).json()["strategies"]] \
            .count(QUIZ) == 1
        event = (await c.post("/sessions", json={"strategy": QUIZ,
                                                 "input": {"task": "t"}})).json()
        sid, answers = event["session_id"], ["a", "b", "c"]
        for q, answer in zip(event["queries"], answers, strict=True):
            event = (await c.post(f"/sessions/{sid}/responses", json={
                "query_id": q["id"], "response": answer, "round": 1})).json()
        assert event["status"] == "needs_response", event
        event = (await c.post(f"/sessions/{sid}/responses", json={"response": "b"})).json()
        assert event["status"] == "completed", event
        assert event["result"] == expected_result("t", answers, "b")


@pytest.mark.slow
async def test_sigterm_ends_open_event_streams_cleanly_within_the_grace(procs: Procs) -> None:
    """An event stream is open as long as its client wants (the console keeps one on the
    namespace, and one on a session that may wait hours for a person). On SIGTERM the
    namespace stream ends at once and a paused session's stream before the grace runs out,
    so the server exits by itself: no cancellation by uvicorn, no traceback."""
    from tests.strategies_console import QUIZ

    port = free_port()
    proc = procs.spawn("drain", cli("serve", "--port", str(port), "--grace", "2",
                                    "--import", "tests.strategies_console"))
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=WAIT_S) as c:
        await embedded_ready(c, procs, "drain")
        sid = (await c.post("/sessions", json={"strategy": QUIZ, "input": {"task": "t"}})
               ).json()["session_id"]

        async def read(path: str) -> list[str]:
            """The stream's lines until the server ends it (bounded by the client)."""
            async with c.stream("GET", path) as stream:
                assert stream.status_code == 200
                opened.set()
                return [line async for line in stream.aiter_lines()]

        streams = []
        for path in ("/events", f"/sessions/{sid}/events"):
            opened = asyncio.Event()
            streams.append(asyncio.create_task(read(path)))
            await asyncio.wait_for(opened.wait(), WAIT_S)
        proc.send_signal(signal.SIGTERM)
        namespace, session = await asyncio.wait_for(asyncio.gather(*streams), WAIT_S)
    assert "event: counts" in namespace
    assert "event: needs_response" in session  # what it had to say before the stop
    code = await asyncio.to_thread(proc.wait, WAIT_S)
    assert code in (0, -signal.SIGTERM), procs.log("drain")
    log = procs.log("drain")
    assert "Traceback" not in log and "graceful shutdown exceeded" not in log, log


async def events_across_apis_and_graceful_shutdown(
    clients: list[httpx.AsyncClient], procs: Procs
) -> None:
    """A stream on API 0 shows what is fed through API 1, as it happens; SIGTERM to API 0
    refuses new connections but lets the open stream run to the session's end."""
    a, b = clients
    first = (await b.post("/sessions", json={"strategy": "cot", "input": {"task": "t",
                                                                        "depth": 1}})).json()
    sid = first["session_id"]
    async with a.stream("GET", f"/sessions/{sid}/events") as stream:
        assert stream.status_code == 200
        assert stream.headers["content-type"].startswith("text/event-stream")
        lines = stream.aiter_lines()

        async def next_data() -> dict[str, Any]:
            """The data of the next pause or end (logs and progress passed over)."""
            name = ""
            async for line in lines:
                if line.startswith("event: "):
                    name = line[7:]
                elif line.startswith("data: ") and name not in ("log", "progress"):
                    parsed: dict[str, Any] = json.loads(line[6:])
                    return parsed
            raise AssertionError("the stream ended early")

        assert await asyncio.wait_for(next_data(), WAIT_S) == first
        second = (await b.post(f"/sessions/{sid}/responses", json={"response": "r1"})).json()
        assert await asyncio.wait_for(next_data(), WAIT_S) == second

        procs.procs["api-0"].send_signal(signal.SIGTERM)

        async def refused() -> bool:
            try:
                async with httpx.AsyncClient(base_url=str(a.base_url)) as fresh:
                    await fresh.get("/healthz")
            except httpx.TransportError:
                return True
            return False

        await assert_eventually(refused, timeout=WAIT_S, message="API 0 stops accepting")
        final = (await b.post(f"/sessions/{sid}/responses", json={"response": "r2"})).json()
        assert final["status"] == "completed"
        assert await asyncio.wait_for(next_data(), WAIT_S) == {"session_id": sid, **final}
    code = await asyncio.to_thread(procs.procs["api-0"].wait, WAIT_S)
    assert code in (0, -signal.SIGTERM), procs.log("api-0")
    assert "Traceback" not in procs.log("api-0")


# -- fuzzing from the OpenAPI document -----------------------------------------------------

def test_fuzz_from_openapi_no_5xx_no_hang(stack: Stack) -> None:
    """Schemathesis cases from /openapi.json, valid and invalid, against the in-process app
    with real workers behind it: every response is documented, matches its schema, is
    not a 5xx, and comes back within 10 s. Some cases are pinned to a real paused and a
    real finished session, so the fuzzer reaches past "404 unknown session"."""
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
    from schemathesis.python import asgi
    from schemathesis.specs.openapi.checks import (
        content_type_conformance,
        response_schema_conformance,
        status_code_conformance,
    )

    app = create_app(stack.registry, keepalive_s=0.3)
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    try:
        paused, finished = _fuzz_sessions(schema)
        modes = [schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE]
        start = schema["/sessions"]["POST"]
        starts = st.fixed_dictionaries(
            {"strategy": st.sampled_from(["cot", "reflect", "sc"]),
             "input": st.fixed_dictionaries({"task": st.text(max_size=40)}, optional={
                 "rounds": st.integers(-2, 12), "n": st.integers(-2, 70)})},
            optional={"budget": st.fixed_dictionaries({}, optional={
                "llm_calls": st.integers(-1, 5), "tokens": st.integers(-1, 10**6)})},
        ).flatmap(lambda body: start.as_strategy(body=body))
        feed_op = schema["/sessions/{session_id}/responses"]["POST"]
        answer = st.fixed_dictionaries({
            "query_id": st.sampled_from([f"q-{i}" for i in range(70)]),
            "response": st.text(max_size=30)})
        feeds = st.one_of(answer, st.fixed_dictionaries(
            {"responses": st.lists(answer, min_size=1, max_size=4)})).flatmap(
            lambda body: feed_op.as_strategy(path_parameters={"session_id": paused},
                                             body=body))
        # GET /events streams for as long as its client stays, as it should: not fuzzed
        endless = schema.exclude(path="/events")
        cases = st.one_of(
            starts,
            feeds,
            *(endless.as_strategy(mode) for mode in modes),
            *(endless.as_strategy(mode, path_parameters={"session_id": finished})
              for mode in modes),
            # the paused one: no event stream (it would stay open, as it should), and no
            # cancel, so answers to it keep reaching the registry
            schema.exclude(path_regex="/events$").exclude(method="DELETE").as_strategy(
                path_parameters={"session_id": paused}),
        )
        checks = [schemathesis.checks.not_a_server_error, status_code_conformance,
                  content_type_conformance, response_schema_conformance]

        @settings(max_examples=400, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(case=cases)
        def run(case: schemathesis.Case) -> None:
            res = case.call_and_validate(checks=checks, timeout=10)
            seen.add(f"{case.method} {res.status_code}")

        seen: set[str] = set()
        run()
        assert {"POST 201", "POST 200", "GET 200"} <= seen, seen  # it got past the 4xx
    finally:
        asgi.shutdown_lifespans()


def _fuzz_sessions(schema: Any) -> tuple[str, str]:
    """A paused session (64 queries to answer) and a finished one, made through the app
    under test."""
    op = schema["/sessions"]["POST"]
    paused = op.Case(body={"strategy": "sc", "input": {"task": "fuzz", "n": 64}}).call().json()
    done = op.Case(body={"strategy": "cot", "input": {"task": "fuzz", "depth": 1}}).call().json()
    sid = done["session_id"]
    feed = schema["/sessions/{session_id}/responses"]["POST"]
    for _ in range(2):
        feed.Case(path_parameters={"session_id": sid}, body={"response": "ok"}).call()
    return str(paused["session_id"]), str(sid)
