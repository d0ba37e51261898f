"""Bad input, table-driven (issue 3, "Bad input"): every way a caller, a strategy or a
corrupted store can feed the coordinator garbage, in one table, with the typed error and the
message fragment a user sees.

Each case runs next to a *healthy* session that was started before it and is finished after
it, with the exact result; after each case the worker's loops are all still running, no
step raised unexpectedly, and the registry still answers. Cases are one of:

- ``raises``: the call raises this ``SessionError`` subclass, whose message holds the
  fragment (and which names the session / query where that applies);
- ``fails``: the session ends ``failed`` and its error (what ``to_json`` shows as
  ``{"status": "error", "error": ...}``) holds the fragment;
- ``dead letter``: the job is moved to the dead-letter stream with that reason.

The same hostile input is then tried on every other front, each with its own table and
fixture: settings (every knob, set directly and as ``ALC_<FIELD>``), the CLI (in process, and
a few cases as real processes: exit code 2 with the JSON error, never a traceback), the HTTP
API (``http``: the error JSON with a 4xx status) and the MCP server (``mcp_client``, and raw
lines over its stdio: the error JSON with ``isError``, for arguments the SDK's schema refuses
too). The cases of those tables that need a cluster run next to the healthy session as well.

Individual behaviours are also tested in ``test_registry.py`` / ``test_worker.py``; this file
is the one place that lists them all. Runs on fakeredis with an in-process worker (the
fixtures of ``conftest.py``); ``test_worker_process_survives_bad_input`` repeats the
worker-side cases against a real worker process.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import pytest

from coordinator import (
    AlreadyResponded,
    CorruptState,
    Finished,
    InvalidInput,
    InvalidTransition,
    NotFound,
    Paused,
    PayloadTooLarge,
    Phase,
    SessionError,
    SessionRegistry,
    Settings,
    UnknownQuery,
    UnknownStrategy,
    cli,
)
from coordinator.settings import MIB
from tests.conftest import FakeCluster
from tests.helpers import assert_eventually
from workers import strategy
from workers.context import Context

# -- strategies (names unique to this module) -------------------------------------------------

#: ``tbad-nondet`` asks "two v<N>" with N read from here: changing it between workers makes
#: a replay ask something else, as a strategy reading a clock would.
VERSION = {"v": 0}
#: Events that ``tbad-gated`` waits on (opened at teardown).
HOLDS: dict[str, asyncio.Event] = {}


@pytest.fixture(autouse=True)
def _reset() -> Iterator[None]:
    VERSION["v"] = 0
    try:
        yield
    finally:
        for event in HOLDS.values():
            event.set()
        HOLDS.clear()


@strategy("tbad-healthy")
async def healthy(ctx: Context, tag: str = "", **_: Any) -> list[list[str]]:
    first = await ctx.llm_batch([f"{tag} a", f"{tag} b"])
    second = await ctx.llm_batch([f"{tag} c", f"{tag} d"])
    return [first, second]


@strategy("tbad-ask")
async def ask(ctx: Context, n: int = 1, **_: Any) -> list[str]:
    return await ctx.llm_batch([f"question {i}" for i in range(n)])


@strategy("tbad-chain")
async def chain(ctx: Context, k: int = 3, prompt: str = "next?", **_: Any) -> list[str]:
    return [await ctx.llm(f"{prompt} {i}") for i in range(k)]


@strategy("tbad-raise")
async def raises(ctx: Context, **_: Any) -> None:
    answer = await ctx.llm("go?")
    raise ValueError(f"boom on {answer}")


@strategy("tbad-bad-result")
async def bad_result(ctx: Context, **_: Any) -> Any:
    return {"answer": await ctx.llm("go?"), "when": object()}


@strategy("tbad-hang")
async def hang(ctx: Context, **_: Any) -> None:
    await asyncio.Event().wait()  # never asks, never ends


@strategy("tbad-gated")
async def gated(ctx: Context, tag: str = "", **_: Any) -> str:
    await HOLDS[tag].wait()
    return await ctx.llm("after the hold")


@strategy("tbad-nondet")
async def nondet(ctx: Context, **_: Any) -> list[str]:
    one = await ctx.llm("one")
    two = await ctx.llm(f"two v{VERSION['v']}")
    return [one, two]


#: What ``tbad-result`` returns, by ``kind``: each is a result no host could read back.
BAD_RESULTS: dict[str, Callable[[str], Any]] = {
    "lone-surrogate": lambda answer: {"answer": answer + " \ud800"},
    "surrogate-key": lambda answer: {"\udcff": answer},
    "int-65-bits": lambda answer: {"n": 2**65},
    "int-400-digits": lambda answer: {"n": 10**400},
    "nested-300": lambda answer: _nested(300),
    "over-1MiB": lambda answer: "x" * (MIB + 1),
    "set": lambda answer: {"answers": {answer}},
}


def _nested(depth: int) -> Any:
    value: Any = []
    for _ in range(depth):
        value = [value]
    return value


@strategy("tbad-result")
async def bad_results(ctx: Context, kind: str = "", **_: Any) -> Any:
    return BAD_RESULTS[kind](await ctx.llm("go?"))


@strategy("tbad-misuse")
async def misuse(ctx: Context, kind: str = "", **_: Any) -> Any:
    """A strategy handing the context what it cannot store or answer."""
    if kind == "log-surrogate":
        ctx.log("info", "half a pair \ud800")
    elif kind == "log-level-object":
        ctx.log(object(), "msg")  # type: ignore[arg-type]
    elif kind == "progress-object":
        ctx.progress(1, object())  # type: ignore[arg-type]
    elif kind == "progress-nan":
        ctx.progress(float("nan"), 2)  # type: ignore[arg-type]
    elif kind == "progress-message-surrogate":
        ctx.progress(1, 2, "\ud800")
    elif kind == "max-tokens-huge":
        return await ctx.llm("q", max_tokens=2**70)
    elif kind == "prompt-surrogate":
        return await ctx.llm("\ud800?")
    elif kind == "batch-of-a-dict":
        return await ctx.llm_batch({"prompt": "a"})  # type: ignore[arg-type]
    elif kind == "concurrent-asks":
        return await asyncio.gather(ctx.llm("a"), ctx.llm("b"))
    return await ctx.llm("go?")


#: What ``tbad-ask-after-cancel`` met when it asked again after its cancel.
AFTER_CANCEL: dict[str, BaseException] = {}


@strategy("tbad-ask-after-cancel")
async def ask_after_cancel(ctx: Context, **_: Any) -> str:
    try:
        return await ctx.llm("first")
    except asyncio.CancelledError:
        try:
            await ctx.llm("one more, after the cancel")
        except BaseException as exc:  # what a strategy author would see
            AFTER_CANCEL["error"] = exc
        raise


# -- the environment every case runs in --------------------------------------------------------

STEP_TIMEOUT_S = 1.0


@dataclass
class Env:
    cluster: FakeCluster
    reg: SessionRegistry
    workers: list[Any]
    healthy_sid: str = ""
    notes: dict[str, Any] = field(default_factory=dict)

    async def paused(self, name: str, inp: dict[str, Any] | None = None,
                     **kw: Any) -> tuple[str, Paused]:
        sid, event = await self.reg.start_execution(name, inp, **kw)
        assert isinstance(event, Paused), event
        return sid, event

    async def finished(self, sid: str) -> Finished:
        event = await self.reg.wait_event(sid, timeout=10)
        assert isinstance(event, Finished), event
        return event


@pytest.fixture
async def env(fake_cluster: FakeCluster) -> Env:
    worker = await fake_cluster.worker(step_timeout_s=STEP_TIMEOUT_S)
    reg = fake_cluster.registry()
    e = Env(fake_cluster, reg, [worker])
    sid, first = await e.paused("tbad-healthy", {"tag": "healthy"})
    assert [q.id for q in first.queries] == ["q-0", "q-1"]
    assert await reg.feed_response(sid, "q-1", "B") is not None
    e.healthy_sid = sid
    return e


# -- the cases ---------------------------------------------------------------------------------

Run = Callable[[Env], Awaitable[Any]]


#: The failure type a failed session of each kind of mistake carries (by case id prefix).
FAILURE_OF = (
    ("result-", "invalid_result"), ("strategy-returns-non-json", "invalid_result"),
    ("log-", "invalid_input"), ("progress-", "invalid_input"), ("max-tokens-", "invalid_input"),
    ("prompt-", "invalid_input"), ("llm-batch-", "invalid_input"),
    ("concurrent-asks", "strategy_error"), ("strategy-raises", "strategy_error"),
    ("strategy-never-asks", "step_timeout"), ("non-determinism", "non_determinism"),
    ("budget-", "budget_exceeded"), ("strategy-unknown", "unknown_strategy"),
    ("corrupt-", "corrupt_state"),
)


def failure_type(case_id: str) -> str:
    return next(kind for prefix, kind in FAILURE_OF if case_id.startswith(prefix))


@dataclass(frozen=True)
class Case:
    id: str
    expect: type[SessionError] | str  # an error class, "fails" or "dead letter"
    fragment: str
    run: Run
    #: For ``raises``: the session / query id the error must name ("sid" = the case's own).
    names_session: bool = True
    names_query: bool = False


# Host-side errors: the call raises --------------------------------------------------------


async def unknown_session(e: Env) -> Any:
    e.notes["sid"] = "s-0-doesnotexist"
    return await e.reg.feed_response("s-0-doesnotexist", "q-0", "x")


async def unknown_query(e: Env) -> Any:
    e.notes["sid"], _ = await e.paused("tbad-ask", {"n": 2})
    return await e.reg.feed_response(e.notes["sid"], "q-7", "x")


async def duplicate_answer(e: Env) -> Any:
    e.notes["sid"], _ = await e.paused("tbad-ask", {"n": 2})
    await e.reg.feed_response(e.notes["sid"], "q-0", "first")
    return await e.reg.feed_response(e.notes["sid"], "q-0", "second")


async def feed_finished(e: Env) -> Any:
    e.notes["sid"], _ = await e.paused("tbad-ask")
    done = await e.reg.feed_response(e.notes["sid"], "q-0", "x")
    assert isinstance(done, Finished) and done.state is Phase.COMPLETED
    return await e.reg.feed_response(e.notes["sid"], "q-0", "again")


async def feed_failed(e: Env) -> Any:
    e.notes["sid"], _ = await e.paused("tbad-raise")
    done = await e.reg.feed_response(e.notes["sid"], "q-0", "x")
    assert isinstance(done, Finished) and done.state is Phase.FAILED
    return await e.reg.feed_response(e.notes["sid"], "q-0", "again")


async def feed_cancelled(e: Env) -> Any:
    e.notes["sid"], _ = await e.paused("tbad-ask")
    await e.reg.cancel(e.notes["sid"])
    return await e.reg.feed_response(e.notes["sid"], "q-0", "late")


async def feed_running(e: Env) -> Any:
    HOLDS["running"] = asyncio.Event()
    e.notes["sid"] = sid = await e.reg.submit("tbad-gated", {"tag": "running"})
    try:
        return await e.reg.feed_response(sid, "q-0", "too early")
    finally:
        HOLDS["running"].set()
        await e.reg.wait_event(sid, timeout=10)


async def response_over_configured_limit(e: Env) -> Any:
    small = e.cluster.registry(max_response_bytes=64)
    e.notes["sid"], _ = await e.paused("tbad-ask")
    return await small.feed_response(e.notes["sid"], "q-0", "é" * 33)  # 66 bytes


async def response_over_default_limit(e: Env) -> Any:
    e.notes["sid"], _ = await e.paused("tbad-ask")
    return await e.reg.feed_response(e.notes["sid"], "q-0", "x" * (MIB + 1))


async def input_over_configured_limit(e: Env) -> Any:
    small = e.cluster.registry(max_input_bytes=128)
    return await small.submit("tbad-ask", {"text": "x" * 200})


async def input_over_default_limit(e: Env) -> Any:
    return await e.reg.submit("tbad-ask", {"text": "x" * MIB})


async def non_utf8_bytes(e: Env) -> Any:
    e.notes["sid"], _ = await e.paused("tbad-ask")
    return await e.reg.feed_response(e.notes["sid"], "q-0", b"\xff\xfe not utf-8")


async def lone_surrogate(e: Env) -> Any:
    e.notes["sid"], _ = await e.paused("tbad-ask")
    return await e.reg.feed_response(e.notes["sid"], "q-0", "half a pair \ud800")


async def response_not_a_string(e: Env) -> Any:
    e.notes["sid"], _ = await e.paused("tbad-ask")
    return await e.reg.feed_response(e.notes["sid"], "q-0", {"text": "hi"})  # type: ignore[arg-type]


async def input_object(e: Env) -> Any:
    return await e.reg.submit("tbad-ask", {"when": object()})


async def input_nan(e: Env) -> Any:
    return await e.reg.submit("tbad-ask", {"x": float("nan")})


async def input_int_key(e: Env) -> Any:
    return await e.reg.submit("tbad-ask", {1: "one"})  # type: ignore[dict-item]


async def input_not_object(e: Env) -> Any:
    return await e.reg.submit("tbad-ask", ["a", "list"])  # type: ignore[arg-type]


async def usage_not_json_able(e: Env) -> Any:
    e.notes["sid"], _ = await e.paused("tbad-ask")
    return await e.reg.feed_response(e.notes["sid"], "q-0", "x",
                                     usage={"completion_tokens": 3, "raw": object()})


async def strategy_not_registered(e: Env) -> Any:
    return await e.reg.start_execution("tbad-no-such-strategy", {})


async def strategy_name_empty(e: Env) -> Any:
    return await e.reg.submit("", {})


async def budget_unknown_key(e: Env) -> Any:
    return await e.reg.submit("tbad-ask", {}, budget={"dollars": 5})


async def pending_filter_unknown(e: Env) -> Any:
    return await e.reg.list_snapshots(pending_filter="everything")


def submit_with(**kw: Any) -> Run:
    """A case that submits ``tbad-ask`` with ``kw`` (input, budget, ttl) as given."""
    async def run(e: Env) -> Any:
        rest = dict(kw)
        return await e.reg.submit(rest.pop("strategy", "tbad-ask"), rest.pop("input", {}),
                                  **rest)
    return run


async def sessions_now(e: Env) -> int:
    return int(await e.reg.client.zcard(e.reg.keys.deadlines))


async def start_timeout_nan(e: Env) -> Any:
    """Refused before the session exists: no session is left behind, running unwatched."""
    before = await sessions_now(e)
    try:
        return await e.reg.start_execution("tbad-ask", {}, timeout=float("nan"))
    finally:
        assert await sessions_now(e) == before


async def feed_timeout(e: Env, timeout: Any) -> Any:
    """Refused before the answer is recorded: the query is still open afterwards."""
    e.notes["sid"] = sid = (await e.paused("tbad-ask"))[0]
    try:
        return await e.reg.feed_response(sid, "q-0", "x", timeout=timeout)
    finally:
        assert (await e.reg.status(sid))["pending_queries"] == 1


async def feed_timeout_nan(e: Env) -> Any:
    return await feed_timeout(e, float("nan"))


async def feed_timeout_inf(e: Env) -> Any:
    return await feed_timeout(e, float("inf"))


async def wait_timeout(e: Env, timeout: Any) -> Any:
    e.notes["sid"] = sid = (await e.paused("tbad-ask"))[0]
    return await asyncio.wait_for(e.reg.wait_event(sid, timeout=timeout), 5)


async def wait_timeout_nan(e: Env) -> Any:
    return await wait_timeout(e, float("nan"))


async def wait_timeout_negative(e: Env) -> Any:
    return await wait_timeout(e, -1)


async def wait_timeout_text(e: Env) -> Any:
    return await wait_timeout(e, "5")


async def sid_call(e: Env, call: str, sid: Any) -> Any:
    reg = e.reg
    calls: dict[str, Callable[[], Awaitable[Any]]] = {
        "feed": lambda: reg.feed_response(sid, "q-0", "x"),
        "wait": lambda: reg.wait_event(sid, timeout=1),
        "status": lambda: reg.status(sid),
        "cancel": lambda: reg.cancel(sid),
        "resolve": lambda: reg.resolve_sole_pending_id(sid),
    }
    return await calls[call]()


def with_session_id(call: str, sid: Any) -> Run:
    async def run(e: Env) -> Any:
        return await sid_call(e, call, sid)
    return run


async def query_id_surrogate(e: Env) -> Any:
    sid, _ = await e.paused("tbad-ask")
    return await e.reg.feed_response(sid, "q-\ud800", "x")


async def usage_surrogate_key(e: Env) -> Any:
    sid, _ = await e.paused("tbad-ask")
    return await e.reg.feed_response(sid, "q-0", "x", usage={"\ud800": 1})


async def usage_huge_tokens(e: Env) -> Any:
    sid, _ = await e.paused("tbad-ask")
    return await e.reg.feed_response(sid, "q-0", "x", usage={"completion_tokens": 2**70})


async def dead_letters_negative(e: Env) -> Any:
    return await e.reg.dead_letters(-1)


async def gc_sweep_nan(e: Env) -> Any:
    return await e.reg.gc_sweep(now_ms=float("nan"))  # type: ignore[arg-type]


def result_of(kind: str) -> Run:
    async def run(e: Env) -> Any:
        sid, _ = await e.paused("tbad-result", {"kind": kind})
        return await e.reg.feed_response(sid, "q-0", "answer")
    return run


def misused(kind: str) -> Run:
    """Start ``tbad-misuse``; answer while it pauses (a misuse may show a round late)."""
    async def run(e: Env) -> Any:
        sid, event = await e.reg.start_execution("tbad-misuse", {"kind": kind})
        while isinstance(event, Paused):
            for q in event.queries:
                event = await e.reg.feed_response(sid, q.id, "x")
        return event
    return run


async def orphan(e: Env, sid: str) -> None:
    """Make ``sid``'s next step a replay, which reads its whole state from Redis: the live
    holder resumes from memory with the handed answers and reads nothing it does not need,
    so corruption is met (and must be handled) when a worker rebuilds the session."""
    await e.reg.client.hdel(e.reg.keys.session(sid).session, "holder", "holder_ch")


async def corrupt_session_hash(e: Env) -> Any:
    """A paused session whose stored input is not msgpack; its next step cannot load it."""
    e.notes["sid"] = sid = (await e.paused("tbad-ask"))[0]
    await e.reg.client.hset(e.reg.keys.session(sid).session, "input", b"\xc1\xc1 garbage")
    await orphan(e, sid)
    return await e.reg.feed_response(sid, "q-0", "x")


async def corrupt_session_field(e: Env) -> Any:
    """A plain field Lua and Python read (``started_at``) that is not an integer."""
    e.notes["sid"] = sid = (await e.paused("tbad-ask"))[0]
    await e.reg.client.hset(e.reg.keys.session(sid).session, "started_at", "yesterday")
    await orphan(e, sid)
    return await e.reg.feed_response(sid, "q-0", "x")


# Session failures: the session ends failed ------------------------------------------------


async def strategy_raises(e: Env) -> Any:
    sid, _ = await e.paused("tbad-raise")
    return await e.reg.feed_response(sid, "q-0", "now")


async def strategy_returns_non_json(e: Env) -> Any:
    sid, _ = await e.paused("tbad-bad-result")
    return await e.reg.feed_response(sid, "q-0", "x")


async def strategy_hangs(e: Env) -> Any:
    _, event = await e.reg.start_execution("tbad-hang", {}, timeout=10)
    return event


async def non_determinism(e: Env) -> Any:
    sid, _ = await e.paused("tbad-nondet")
    assert isinstance(await e.reg.feed_response(sid, "q-0", "1"), Paused)
    # a new worker replays; the strategy now asks "two v1" where "two v0" was asked
    await e.cluster.stop_worker(e.workers.pop())
    VERSION["v"] = 1
    e.workers.append(await e.cluster.worker(step_timeout_s=STEP_TIMEOUT_S))
    return await e.reg.feed_response(sid, "q-0", "2")


async def budget_calls(e: Env) -> Any:
    sid, _ = await e.paused("tbad-chain", {"k": 3}, budget={"llm_calls": 2})
    assert isinstance(await e.reg.feed_response(sid, "q-0", "a"), Paused)
    return await e.reg.feed_response(sid, "q-0", "b")


async def budget_tokens(e: Env) -> Any:
    # a 40-character prompt is 10 tokens: the second question finds the 5-token budget spent
    sid, _ = await e.paused("tbad-chain", {"k": 2, "prompt": "p" * 38}, budget={"tokens": 5})
    return await e.reg.feed_response(sid, "q-0", "a")


async def budget_time(e: Env) -> Any:
    """1 ms of wall time: spent within a few rounds, whatever the machine."""
    sid, event = await e.reg.start_execution("tbad-chain", {"k": 1000},
                                             budget={"elapsed_ms": 1})
    while isinstance(event, Paused):
        event = await e.reg.feed_response(sid, "q-0", "a")
    return event


async def strategy_unknown_to_workers(e: Env) -> Any:
    """No worker registered the name (the registry cannot refuse it then): the worker that
    picks the job up fails the session by name."""
    await e.reg.client.delete(e.reg.keys.strategies)
    sid = await e.reg.submit("tbad-never-registered", {})
    return await e.reg.wait_event(sid, timeout=10)


async def corrupt_pending_query(e: Env) -> Any:
    sid, _ = await e.paused("tbad-ask", {"n": 2})
    await e.reg.client.hset(e.reg.keys.session(sid).pending, "q-1", b"\xc1")
    await orphan(e, sid)
    await e.reg.feed_response(sid, "q-0", "x")
    return await e.reg.feed_response(sid, "q-1", "y")


# Dead letters -----------------------------------------------------------------------------


async def unknown_job_kind(e: Env) -> Any:
    await e.reg.client.xadd(e.reg.keys.jobs, {"k": "exec-python", "sid": "s-0-x"})

    async def gone() -> bool:
        return await e.reg.client.xlen(e.reg.keys.jobs) == 0

    from tests.helpers import assert_eventually

    await assert_eventually(gone, timeout=5, message="the bogus job never left the stream")
    _, letters = await e.reg.dead_letters()
    return letters


CASES = [
    # -- the caller's mistakes: typed errors, nothing recorded --------------------------------
    Case("unknown-session", NotFound, "not found: it never existed, or it finished and its "
         "retention period ran out", unknown_session),
    Case("unknown-query-id", UnknownQuery, "is not pending in session", unknown_query,
         names_query=True),
    Case("duplicate-answer", AlreadyResponded, "has an answer already", duplicate_answer,
         names_query=True),
    Case("feed-completed-session", InvalidTransition, "is completed: it has finished",
         feed_finished),
    Case("feed-failed-session", InvalidTransition, "is failed: it has finished", feed_failed),
    Case("feed-cancelled-session", InvalidTransition, "is cancelled: it has finished",
         feed_cancelled),
    Case("feed-running-session", InvalidTransition, "not waiting for answers; wait for its "
         "next event", feed_running),
    Case("response-over-configured-limit", PayloadTooLarge,
         "response is 66 bytes, over the limit of 64 bytes", response_over_configured_limit,
         names_session=False),
    Case("response-over-default-1MiB", PayloadTooLarge,
         f"over the limit of {MIB} bytes", response_over_default_limit, names_session=False),
    Case("input-over-configured-limit", PayloadTooLarge, "over the limit of 128 bytes",
         input_over_configured_limit, names_session=False),
    Case("input-over-default-1MiB", PayloadTooLarge, f"over the limit of {MIB} bytes",
         input_over_default_limit, names_session=False),
    Case("response-non-utf8-bytes", InvalidInput, "response is not valid UTF-8",
         non_utf8_bytes, names_session=False),
    Case("response-lone-surrogate", InvalidInput, "not valid Unicode", lone_surrogate,
         names_session=False),
    Case("response-not-a-string", InvalidInput, "response must be a string, not dict",
         response_not_a_string, names_session=False),
    Case("input-not-json-able", InvalidInput, "input must be JSON-able", input_object,
         names_session=False),
    Case("input-nan", InvalidInput, "input must be JSON-able", input_nan,
         names_session=False),
    Case("input-non-string-key", InvalidInput, "non-string key 1", input_int_key,
         names_session=False),
    Case("input-not-an-object", InvalidInput, "input must be a JSON object (dict), not list",
         input_not_object, names_session=False),
    Case("usage-not-json-able", InvalidInput, "usage must be JSON-able", usage_not_json_able,
         names_session=False),
    Case("strategy-not-registered", UnknownStrategy,
         "'tbad-no-such-strategy' is not registered by any worker; known: ",
         strategy_not_registered, names_session=False),
    Case("strategy-name-empty", InvalidInput, "strategy must be a non-empty string",
         strategy_name_empty, names_session=False),
    Case("budget-unknown-key", InvalidInput, "unknown budget key 'dollars'",
         budget_unknown_key, names_session=False),
    Case("pending-filter-unknown", InvalidInput, "is not one of: meta, preview, full",
         pending_filter_unknown, names_session=False),
    # -- hostile numbers, strings and shapes (issue: "hostile input gets raw errors") ----------
    Case("budget-2**70", InvalidInput, "budget llm_calls must be a positive integer up to "
         "10**15, got 1180591620717411303424", submit_with(budget={"llm_calls": 2**70}),
         names_session=False),
    Case("budget-over-max", InvalidInput, "up to 10**15, got 1000000000000001",
         submit_with(budget={"tokens": 10**15 + 1}), names_session=False),
    Case("budget-float", InvalidInput, "budget elapsed_ms must be a positive integer",
         submit_with(budget={"elapsed_ms": 1.5}), names_session=False),
    Case("budget-bool", InvalidInput, "budget llm_calls must be a positive integer",
         submit_with(budget={"llm_calls": True}), names_session=False),
    Case("ttl-inf", InvalidInput, "ttl must be a number of seconds > 0 and <= 315360000 "
         "(ten years), got inf", submit_with(ttl=float("inf")), names_session=False),
    Case("ttl-nan", InvalidInput, "ttl must be a number of seconds > 0", submit_with(
        ttl=float("nan")), names_session=False),
    Case("ttl-1e20", InvalidInput, "got 1e+20", submit_with(ttl=1e20), names_session=False),
    Case("ttl-negative", InvalidInput, "ttl must be a number of seconds > 0",
         submit_with(ttl=-5), names_session=False),
    Case("ttl-text", InvalidInput, "got '60'", submit_with(ttl="60"), names_session=False),
    Case("ttl-below-1ms", InvalidInput, "ttl must be at least 1 ms", submit_with(ttl=1e-6),
         names_session=False),
    Case("input-lone-surrogate", InvalidInput, "input['task'] holds a lone surrogate "
         "('\\ud800') and is not valid Unicode", submit_with(input={"task": "a \ud800"}),
         names_session=False),
    Case("input-surrogate-key", InvalidInput, "a key of input holds a lone surrogate",
         submit_with(input={"\udcff": 1}), names_session=False),
    Case("input-surrogate-deep", InvalidInput, "input['a'][0]['b'] holds a lone surrogate",
         submit_with(input={"a": [{"b": "\udfff"}]}), names_session=False),
    Case("input-int-400-digits", InvalidInput, "input['n'] holds an integer outside the "
         "64-bit range (401 digits)", submit_with(input={"n": 10**400}), names_session=False),
    Case("input-int-65-bits", InvalidInput, "holds an integer outside the 64-bit range",
         submit_with(input={"n": -(2**64)}), names_session=False),
    Case("input-nested-300", InvalidInput, "input is nested deeper than 256 levels",
         submit_with(input={"a": _nested(300)}), names_session=False),
    Case("input-nested-100000", InvalidInput, "input is nested too deeply to encode as JSON",
         submit_with(input={"a": _nested(100_000)}), names_session=False),
    Case("input-infinity", InvalidInput, "input must be JSON-able",
         submit_with(input={"x": float("inf")}), names_session=False),
    Case("strategy-lone-surrogate", InvalidInput, "strategy holds a lone surrogate",
         submit_with(strategy="tbad-\ud800"), names_session=False),
    Case("strategy-too-long", InvalidInput, "strategy must be a non-empty string of at most "
         "256 characters", submit_with(strategy="s" * 300), names_session=False),
    Case("start-timeout-nan", InvalidInput, "timeout must be a number of seconds >= 0 and "
         "< 1e9, got nan", start_timeout_nan, names_session=False),
    Case("feed-timeout-nan", InvalidInput, "timeout must be a number of seconds >= 0 and "
         "< 1e9, got nan", feed_timeout_nan),
    Case("feed-timeout-inf", InvalidInput, "got inf", feed_timeout_inf),
    Case("wait-timeout-nan", InvalidInput, "got nan", wait_timeout_nan),
    Case("wait-timeout-negative", InvalidInput, "got -1", wait_timeout_negative),
    Case("wait-timeout-text", InvalidInput, "got '5'", wait_timeout_text),
    *(Case(f"session-id-surrogate-{call}", InvalidInput, "session_id holds a lone "
           "surrogate and is not valid Unicode", with_session_id(call, "s-\udcff"),
           names_session=False) for call in ("feed", "wait", "status", "cancel", "resolve")),
    *(Case(f"session-id-{what}-{call}", InvalidInput, "session_id must be a non-empty string "
           "of at most 256 characters", with_session_id(call, sid), names_session=False)
      for what, sid in (("none", None), ("empty", ""), ("too-long", "s" * 300))
      for call in ("wait", "status", "cancel")),
    Case("query-id-surrogate", InvalidInput, "query_id holds a lone surrogate",
         query_id_surrogate, names_session=False),
    Case("usage-surrogate-key", InvalidInput, "a key of usage holds a lone surrogate",
         usage_surrogate_key, names_session=False),
    Case("usage-huge-tokens", InvalidInput,
         "usage['completion_tokens'] holds an integer outside the 64-bit range",
         usage_huge_tokens, names_session=False),
    Case("dead-letters-count-negative", InvalidInput, "count must be an integer from 1 to "
         "10000", dead_letters_negative, names_session=False),
    Case("gc-sweep-now-nan", InvalidInput, "now_ms must be a Unix time in ms",
         gc_sweep_nan, names_session=False),
    # -- a strategy's results and calls that cannot be stored: the session fails at once ------
    Case("result-lone-surrogate", "fails", "the strategy's result['answer'] holds a lone "
         "surrogate ('\\ud800') and is not valid Unicode", result_of("lone-surrogate")),
    Case("result-surrogate-key", "fails", "a key of the strategy's result holds a lone "
         "surrogate", result_of("surrogate-key")),
    Case("result-int-65-bits", "fails", "the strategy's result['n'] holds an integer outside "
         "the 64-bit range", result_of("int-65-bits")),
    Case("result-int-400-digits", "fails", "the strategy's result['n'] holds an integer "
         "outside the 64-bit range (401 digits)", result_of("int-400-digits")),
    Case("result-nested-300", "fails", "the strategy's result is nested deeper than 256",
         result_of("nested-300")),
    Case("result-over-1MiB", "fails", "the strategy's result is 1048579 bytes, over the "
         "limit of 1048576 bytes", result_of("over-1MiB")),
    Case("result-a-set", "fails", "the strategy's result must be JSON-able",
         result_of("set")),
    Case("log-lone-surrogate", "fails", "log message holds a lone surrogate",
         misused("log-surrogate")),
    Case("log-level-not-a-string", "fails", "log level must be one of",
         misused("log-level-object")),
    Case("progress-not-a-number", "fails", "progress total must be an integer from 0 to "
         "2**31-1, got <object", misused("progress-object")),
    Case("progress-nan", "fails", "progress step must be an integer from 0 to 2**31-1, "
         "got nan", misused("progress-nan")),
    Case("progress-message-surrogate", "fails", "progress message holds a lone surrogate",
         misused("progress-message-surrogate")),
    Case("max-tokens-2**70", "fails", "max_tokens must be a positive integer up to 2**31-1, "
         "got 1180591620717411303424", misused("max-tokens-huge")),
    Case("prompt-lone-surrogate", "fails", "prompt 0 holds a lone surrogate",
         misused("prompt-surrogate")),
    Case("llm-batch-of-a-dict", "fails", "llm_batch takes a non-empty list of prompts",
         misused("batch-of-a-dict")),
    Case("concurrent-asks", "fails", "ctx.llm was called while another ask of this strategy "
         "is still pending", misused("concurrent-asks")),
    # -- stored state that does not decode: that session fails, loudly ------------------------
    Case("corrupt-bytes-in-session-hash", CorruptState,
         "cannot decode the stored input", corrupt_session_hash),
    Case("corrupt-plain-field-in-session-hash", CorruptState,
         "has a corrupt or incomplete hash", corrupt_session_field),
    # -- the strategy's mistakes: the session fails with a clear error ------------------------
    Case("strategy-raises", "fails", "ValueError: boom on now", strategy_raises),
    Case("strategy-returns-non-json", "fails", "the strategy's result must be JSON-able",
         strategy_returns_non_json),
    Case("strategy-never-asks-never-ends", "fails",
         f"step timeout: the strategy neither asked nor returned within {STEP_TIMEOUT_S:g} s",
         strategy_hangs),
    Case("non-determinism-on-replay", "fails", "non-determinism: on replay, round 2 did not "
         "ask the questions that were answered", non_determinism),
    Case("budget-calls", "fails", "budget_exceeded: max_llm_calls (2) reached (2 used)",
         budget_calls),
    Case("budget-tokens", "fails", "budget_exceeded: max_tokens (5) reached (", budget_tokens),
    Case("budget-time", "fails", "budget_exceeded: max_elapsed_ms (1ms) reached (",
         budget_time),
    Case("strategy-unknown-to-workers", "fails",
         "and no live worker offers it: start a worker with --import MODULE",
         strategy_unknown_to_workers),
    Case("corrupt-pending-query", "fails", "cannot decode the stored query",
         corrupt_pending_query),
    # -- a queue entry no worker understands ---------------------------------------------------
    Case("unknown-job-kind", "dead letter", "unknown job kind 'exec-python'",
         unknown_job_kind),
]


def test_the_table_covers_every_error_a_caller_can_catch() -> None:
    """Every leaf of the error tree a bad input can cause has a row (lock errors are the
    coordinator's own trouble; WaitTimeout and NoPendingQuery are not bad input)."""
    expected = {NotFound, UnknownQuery, AlreadyResponded, InvalidTransition, InvalidInput,
                PayloadTooLarge, UnknownStrategy, CorruptState}
    assert {c.expect for c in CASES if isinstance(c.expect, type)} == expected
    assert len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
async def test_bad_input(env: Env, case: Case) -> None:
    outcome: Any
    try:
        outcome = await asyncio.wait_for(case.run(env), 30)
    except SessionError as exc:
        outcome = exc

    if isinstance(case.expect, type):
        assert isinstance(outcome, case.expect), f"expected {case.expect.__name__}, got " \
                                                 f"{outcome!r}"
        assert type(outcome) is case.expect, outcome  # the exact leaf, not a parent
        assert case.fragment in outcome.message, outcome.message
        assert outcome.to_json()["type"] == case.expect.code
        if case.names_session:
            assert outcome.session_id == env.notes["sid"], outcome.to_json()
        if case.names_query:
            assert outcome.query_id is not None and outcome.query_id in outcome.message
    elif case.expect == "fails":
        assert isinstance(outcome, Finished), outcome
        assert outcome.state is Phase.FAILED, outcome
        assert outcome.error is not None and case.fragment in outcome.error, outcome.error
        assert outcome.to_json("sid") == {"status": "error", "error": outcome.error,
                                          "type": failure_type(case.id)}
    else:
        assert [e["reason"] for e in outcome] == [case.fragment], outcome

    if case.id.startswith("corrupt-") and case.expect is CorruptState:
        # the worker failed that session (and dead-lettered its job); observers see it as
        # corrupt, or get a CorruptState naming it, rather than crash on it
        sid = env.notes["sid"]
        phase = await env.reg.client.hget(env.reg.keys.session(sid).session, "phase")
        assert phase == b"failed"
        _, letters = await env.reg.dead_letters()
        assert [(e["sid"], e["reason"]) for e in letters] == [(sid, "corrupt state")]
        try:  # status shows it as corrupt / failed, or refuses it by name
            assert (await env.reg.status(sid))["phase"] in ("corrupt", "failed")
        except CorruptState as exc:
            assert exc.session_id == sid and "cannot decode" in exc.message

    await check_unharmed(env)


async def check_unharmed(env: Env) -> None:
    """The worker(s) kept every loop running and no step blew up; the registry answers; the
    healthy session finishes with its exact result."""
    for worker in env.workers:
        dead = [t.get_name() for t in worker._loops if t.done()]
        assert not dead, f"worker loops ended: {dead}"
        assert worker.stats.step_errors == 0, worker.stats
    sid = env.healthy_sid
    snaps = await env.reg.list_snapshots()
    assert sid in snaps and snaps[sid]["pending_queries"] == 1
    nxt = await env.reg.feed_response(sid, "q-0", "A")
    assert isinstance(nxt, Paused) and [q.prompt for q in nxt.queries] == ["healthy c",
                                                                         "healthy d"]
    await env.reg.feed_response(sid, "q-1", "D")
    done = await env.reg.feed_response(sid, "q-0", "C")
    assert isinstance(done, Finished) and done.state is Phase.COMPLETED, done
    assert done.result == [["A", "B"], ["C", "D"]]


# -- a strategy that asks after its cancel ------------------------------------------------------


async def test_ctx_llm_after_a_cancel_is_a_typed_error_in_the_strategy(env: Env) -> None:
    """The cancel cuts the strategy off with CancelledError; one that catches it and asks
    again gets ``InvalidTransition`` saying why, not a bare AssertionError."""
    AFTER_CANCEL.clear()
    sid, _ = await env.paused("tbad-ask-after-cancel")
    assert (await env.reg.cancel(sid)).state is Phase.CANCELLED
    await assert_eventually(lambda: "error" in AFTER_CANCEL, timeout=5,
                            message="the worker never cut the cancelled strategy off")
    exc = AFTER_CANCEL["error"]
    assert type(exc) is InvalidTransition, repr(exc)
    assert "ctx.llm cannot ask any more" in exc.message
    await check_unharmed(env)


# -- settings: every knob checked where it is made, naming the variable that sets it -------------

NUMERIC_SETTINGS = [f.name for f in fields(Settings)
                    if f.name not in ("url", "namespace", "allow_eviction")]


@pytest.mark.parametrize("bad", [1, "yes", None, 0.0])
def test_a_bad_flag_setting_is_invalid_input(bad: Any) -> None:
    with pytest.raises(InvalidInput, match="allow_eviction"):
        Settings(allow_eviction=bad)


@pytest.mark.parametrize(("raw", "value"), [("1", True), ("yes", True), ("0", False),
                                            ("off", False)])
def test_a_flag_setting_reads_from_the_environment(monkeypatch: pytest.MonkeyPatch, raw: str,
                                                   value: bool) -> None:
    monkeypatch.setenv("ALC_ALLOW_EVICTION", raw)
    assert Settings.from_url(None).allow_eviction is value
    monkeypatch.setenv("ALC_ALLOW_EVICTION", "maybe")
    with pytest.raises(InvalidInput, match=r"ALC_ALLOW_EVICTION.*got 'maybe'"):
        Settings.from_url(None)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -1, 10**20, "abc", True, None],
                         ids=["nan", "inf", "-1", "1e20", "text", "bool", "none"])
@pytest.mark.parametrize("name", NUMERIC_SETTINGS)
def test_a_bad_setting_is_invalid_input_naming_its_variable(name: str, bad: Any) -> None:
    with pytest.raises(InvalidInput) as info:
        Settings(**{name: bad})
    message = info.value.message
    assert f"setting {name} (ALC_{name.upper()}) must be " in message, message
    assert f"got {bad!r}" in message, message
    assert info.value.to_json()["type"] == "invalid_input"


@pytest.mark.parametrize("name", NUMERIC_SETTINGS)
def test_a_bad_environment_variable_names_itself(monkeypatch: pytest.MonkeyPatch,
                                                 name: str) -> None:
    monkeypatch.setenv(f"ALC_{name.upper()}", "abc")
    with pytest.raises(InvalidInput, match=f"ALC_{name.upper()}.*got 'abc'"):
        Settings.from_url(None)


@pytest.mark.parametrize(("var", "value", "fragment"), [
    ("ALC_LEASE_MS", "abc", "setting lease_ms (ALC_LEASE_MS) must be an integer number of "
                            "milliseconds >= 1 and <= 86400000, got 'abc'"),
    ("ALC_LEASE_MS", "1.5", "got '1.5'"),
    ("ALC_WAIT_TIMEOUT_S", "-1", "setting wait_timeout_s (ALC_WAIT_TIMEOUT_S) must be a "
                                 "number of seconds > 0 and <= 31536000, got -1.0"),
    ("ALC_WAIT_TIMEOUT_S", "nan", "got nan"),
    ("ALC_STEP_TIMEOUT_S", "0", "got 0.0"),
    ("ALC_SESSION_TTL_S", "1e20", "<= 315360000, got 1e+20"),
    ("ALC_MAX_INPUT_BYTES", "0", "an integer number of bytes >= 1"),
    ("ALC_MAX_ATTEMPTS", "0", "an integer number of attempts >= 1 and <= 1000, got 0"),
    ("ALC_NAMESPACE", "a:b", "setting namespace (ALC_NAMESPACE) must be 1 to 128 printable "
                             "characters without '{', '}', ':' or whitespace, got 'a:b'"),
    ("ALC_NAMESPACE", "a b", "got 'a b'"),
])
def test_bad_settings_from_the_environment(monkeypatch: pytest.MonkeyPatch, var: str,
                                           value: str, fragment: str) -> None:
    monkeypatch.setenv(var, value)
    with pytest.raises(InvalidInput) as info:
        Settings.from_url("redis://127.0.0.1:1/0")
    assert fragment in info.value.message, info.value.message
    if var != "ALC_NAMESPACE":  # (SessionRegistry.from_url takes its namespace argument)
        with pytest.raises(InvalidInput):  # the same through the registry's constructor
            SessionRegistry.from_url("redis://127.0.0.1:1/0")


def test_settings_at_the_edges_of_their_ranges_are_taken() -> None:
    edge = Settings(lock_wait_s=0, shutdown_grace_s=0, max_live_executions=0, lease_ms=1,
                    redis_timeout_s=5, max_input_bytes=512 * MIB, session_ttl_s=315_360_000)
    assert edge.with_(max_attempts=1000).max_attempts == 1000
    with pytest.raises(InvalidInput, match="max_attempts"):
        edge.with_(max_attempts=1001)  # with_ checks too


# -- the CLI: every user mistake is the JSON error with exit code 2, never a traceback -----------

#: A port nothing listens on: a command that got past its checks would fail "unavailable".
DEAD = "redis://127.0.0.1:1/0"
DEEP_JSON = '{"a": ' + "[" * 5000 + "]" * 5000 + "}"


@pytest.fixture
def cli_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """The CLI in this process with no Redis URL and no ALC_* settings but a short Redis
    bound (a case that got past its checks fails fast instead of waiting 5 s)."""
    for var in list(os.environ):
        if var == "REDIS_URL" or var.startswith("ALC_"):
            monkeypatch.delenv(var)
    monkeypatch.setenv("ALC_REDIS_TIMEOUT_S", "0.5")
    return monkeypatch


def cli_error(capsys: pytest.CaptureFixture[str], argv: list[str]) -> dict[str, Any]:
    """Run ``coordinator ARGV`` in this process: it must exit 2 with the JSON error of an
    ``invalid_input`` on stdout (an uncaught exception, the traceback case, fails here)."""
    with pytest.raises(SystemExit) as exit_:
        cli.main(argv)
    out, err = capsys.readouterr()
    assert exit_.value.code == 2, (exit_.value.code, out, err)
    assert "Traceback" not in out + err
    body: dict[str, Any] = json.loads(out)
    assert body["status"] == "error" and body["type"] == "invalid_input", body
    return body


CLI_CASES: list[tuple[str, dict[str, str], list[str], str]] = [
    # (id, environment, argv, fragment of the error)
    ("input-nested-deep", {}, ["start", "x", "--input", DEEP_JSON],
     "--input is nested too deeply to parse as JSON"),
    ("input-lone-surrogate-escape", {}, ["start", "x", "--input", '{"task": "\\ud800"}'],
     "input['task'] holds a lone surrogate ('\\ud800')"),
    ("task-lone-surrogate-argv", {}, ["start", "x", "--task", "bad \udcff"],
     "input['task'] holds a lone surrogate ('\\udcff')"),
    ("input-5000-digits", {}, ["start", "x", "--input", '{"n": ' + "9" * 5000 + "}"],
     "--input holds an integer of over 4300 digits"),
    ("input-nan", {}, ["start", "x", "--input", '{"x": NaN}'], "input must be JSON-able"),
    ("input-not-an-object", {}, ["start", "x", "--input", "[1]"],
     "--input must be a JSON object"),
    ("budget-2**70", {}, ["start", "x", "--budget", '{"llm_calls": 1180591620717411303424}'],
     "budget llm_calls must be a positive integer up to 10**15"),
    ("budget-float", {}, ["start", "x", "--budget", '{"tokens": 1.5}'],
     "budget tokens must be a positive integer"),
    ("budget-nested-deep", {}, ["start", "x", "--budget", DEEP_JSON],
     "--budget is nested too deeply"),
    ("timeout-nan", {}, ["start", "x", "--timeout", "nan"],
     "coordinator start: argument --timeout: must be a number of seconds >= 0 and < 1e9, "
     "got 'nan'"),
    ("timeout-inf", {}, ["start", "x", "--timeout", "inf"], "got 'inf'"),
    ("timeout-negative", {}, ["continue", "s-0-x", "y", "--timeout", "-1"], "got '-1'"),
    ("strategy-lone-surrogate", {}, ["start", "\udcff"], "strategy holds a lone surrogate"),
    ("response-lone-surrogate", {}, ["continue", "s-0-x", "bad \udcff", "--query-id", "q-0"],
     "response holds a lone surrogate"),
    ("query-id-lone-surrogate", {}, ["continue", "s-0-x", "y", "--query-id", "q-\udcff"],
     "query_id holds a lone surrogate"),
    ("session-id-lone-surrogate", {}, ["continue", "s-\udcff", "y"],
     "session_id holds a lone surrogate"),
    ("session-id-too-long", {}, ["status", "s" * 300], "session_id must be a non-empty string"),
    ("cancel-session-id-lone-surrogate", {}, ["cancel", "s-\udcff"],
     "session_id holds a lone surrogate"),
    ("env-lease-ms-text", {"ALC_LEASE_MS": "abc"}, ["status"],
     "setting lease_ms (ALC_LEASE_MS) must be an integer number of milliseconds"),
    ("env-wait-timeout-negative", {"ALC_WAIT_TIMEOUT_S": "-1"}, ["status"],
     "setting wait_timeout_s (ALC_WAIT_TIMEOUT_S) must be a number of seconds > 0"),
    ("env-wait-timeout-nan", {"ALC_WAIT_TIMEOUT_S": "nan"}, ["status"], "got nan"),
    ("env-redis-timeout-zero", {"ALC_REDIS_TIMEOUT_S": "0"}, ["status"],
     "ALC_REDIS_TIMEOUT_S"),
    ("env-max-attempts-zero", {"ALC_MAX_ATTEMPTS": "0"}, ["start", "x"], "ALC_MAX_ATTEMPTS"),
    ("env-namespace-colon", {"ALC_NAMESPACE": "a:b"}, ["status"], "namespace"),
    ("namespace-flag-brace", {}, ["status", "--namespace", "a{b}"], "got 'a{b}'"),
    ("import-no-such-module", {}, ["worker", "--import", "tbad_no_such_module"],
     "--import tbad_no_such_module: no module named 'tbad_no_such_module'"),
    ("import-empty-name", {}, ["worker", "--import", ""],
     "--import : importing it raised ValueError"),
    ("import-relative-name", {}, ["worker", "--import", ".tbad"], "--import .tbad: importing"),
    ("mcp-import-no-such-module", {}, ["mcp", "--import", "tbad_no_such_module"],
     "no module named 'tbad_no_such_module'"),
    ("log-level-bogus", {}, ["worker", "--log-level", "bogus"],
     "coordinator worker: argument --log-level: 'bogus' is not a log level"),
    ("serve-log-level-bogus", {}, ["serve", "--log-level", "loud"], "'loud' is not a log"),
    ("concurrency-zero", {}, ["worker", "--concurrency", "0"],
     "argument --concurrency: must be an integer from 1 to 10000, got '0'"),
    ("concurrency-negative", {}, ["worker", "--concurrency", "-3"], "got '-3'"),
    ("concurrency-text", {}, ["worker", "--concurrency", "many"], "got 'many'"),
    ("concurrency-huge", {}, ["worker", "--concurrency", "100000"], "got '100000'"),
    ("env-concurrency-text", {"ALC_CONCURRENCY": "abc"}, ["worker"],
     "ALC_CONCURRENCY must be an integer from 1 to 10000, got 'abc'"),
    ("env-concurrency-zero", {"ALC_CONCURRENCY": "0"}, ["worker"],
     "ALC_CONCURRENCY must be an integer from 1 to 10000, got '0'"),
    ("port-out-of-range", {}, ["serve", "--port", "70000"],
     "argument --port: must be a TCP port from 0 to 65535"),
    ("pending-filter-unknown", {}, ["status", "--pending", "all"],
     "argument --pending: invalid choice: 'all'"),
    ("unknown-command", {}, ["explode"], "argument command: invalid choice: 'explode'"),
    ("unknown-flag", {}, ["status", "--frobnicate"], "unrecognized arguments: --frobnicate"),
    ("no-command", {}, [], "the following arguments are required: command"),
]


@pytest.mark.parametrize(("env", "argv", "fragment"), [c[1:] for c in CLI_CASES],
                         ids=[c[0] for c in CLI_CASES])
def test_cli_bad_input(cli_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
                       env: dict[str, str], argv: list[str], fragment: str) -> None:
    for var, value in env.items():
        cli_env.setenv(var, value)
    if argv and argv[0] in ("start", "continue", "status", "cancel"):
        argv = [*argv, "--redis", DEAD]
    body = cli_error(capsys, argv)
    assert fragment in body["error"], body


@pytest.mark.parametrize(("source", "fragment"), [
    ("raise RuntimeError('not today')\n", "importing it raised RuntimeError: not today"),
    ("def broken(:\n", "importing it raised SyntaxError"),
    ("import tbad_no_such_dependency\n", "no module named 'tbad_no_such_dependency'"),
    ("from workers import strategy\n\n@strategy('cot')\nasync def cot(ctx, **_):\n"
     "    return 1\n", "strategy 'cot' is already registered by workers.library.cot"),
])
def test_cli_import_of_a_module_that_fails(
    tmp_path: Path, cli_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
    source: str, fragment: str,
) -> None:
    name = f"tbad_mod_{abs(hash(source)) % 10**8}"
    (tmp_path / f"{name}.py").write_text(source)
    cli_env.syspath_prepend(str(tmp_path))
    body = cli_error(capsys, ["worker", "--import", name])
    assert body["error"].startswith(f"--import {name}: ") and fragment in body["error"], body


def test_cli_help_is_not_spoilt_by_a_bad_alc_concurrency(
    cli_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    cli_env.setenv("ALC_CONCURRENCY", "abc")
    for argv in (["--help"], ["worker", "--help"]):
        with pytest.raises(SystemExit) as exit_:
            cli.main(argv)
        out, err = capsys.readouterr()
        assert exit_.value.code == 0 and "usage: coordinator" in out, (out, err)


async def test_cli_processes_exit_2_with_json_and_no_traceback() -> None:
    """The same through real processes (argv decoding, exit codes, the interpreter's own
    output), a few at once."""
    from tests.procs import clean_env, run_cli

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    busy_port = str(taken.getsockname()[1])
    serve = ("serve", "--redis", DEAD, "--token", "t")
    runs: list[tuple[dict[str, str], tuple[str, ...], int, str]] = [
        ({}, (*serve, "--host", "256.0.0.1", "--port", "0"), 2, "cannot serve on 256.0.0.1"),
        ({}, (*serve, "--host", "127.0.0.1", "--port", busy_port), 2, "cannot serve on"),
        ({"ALC_CONCURRENCY": "abc"}, ("--help",), 0, ""),
        ({}, ("worker", "--import", "tbad_no_such_module"), 2, "no module named"),
        ({}, ("worker", "--concurrency", "0"), 2, "--concurrency"),
        ({"ALC_CONCURRENCY": "abc"}, ("worker",), 2, "ALC_CONCURRENCY"),
        ({}, ("start", "x", "--redis", DEAD, "--input", DEEP_JSON), 2, "nested too deeply"),
        ({"ALC_LEASE_MS": "abc"}, ("status", "--redis", DEAD), 2, "ALC_LEASE_MS"),
        # invalid UTF-8 in argv reaches Python as lone surrogates (surrogateescape)
        ({}, ("continue", os.fsdecode(b"s-\xff"), "y", "--redis", DEAD), 2, "surrogate"),
        ({}, ("start", "x", "--redis", DEAD, "--task", os.fsdecode(b"\xfe")), 2, "surrogate"),
    ]
    try:
        results = await asyncio.gather(*(run_cli(*argv, env=clean_env(**env), timeout=60)
                                         for env, argv, _, _ in runs))
    finally:
        taken.close()
    for (_, argv, code, fragment), result in zip(runs, results, strict=True):
        assert result.code == code, (argv[:3], str(result))
        assert "Traceback" not in result.stdout + result.stderr, (argv[:3], str(result))
        if code == 2:
            body = result.json()
            assert body["type"] == "invalid_input" and fragment in body["error"], body


# -- the HTTP front: the same error JSON, with a 4xx status, never a 500 -----------------------


@pytest.fixture
async def http(env: Env) -> AsyncIterator[Any]:
    """An httpx client on the HTTP API over the case's cluster (in process, lifespan run)."""
    import httpx

    from coordinator.http_api import create_app

    app = create_app(lambda: env.cluster.registry(), keepalive_s=0.3)
    async with (app.router.lifespan_context(app),
                httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                  base_url="http://api", timeout=30) as client):
        yield client


def _raw(text: str) -> bytes:
    return text.encode()


HTTP_CASES: list[tuple[str, str, str, Any, dict[str, str], int, str, str]] = [
    # (id, method, path ("{sid}": a paused session), body (bytes: raw), query, status, type,
    #  fragment)
    ("start-input-lone-surrogate", "POST", "/sessions",
     _raw('{"strategy": "tbad-ask", "input": {"t": "\\ud800"}}'), {}, 422, "invalid_input",
     "holds a lone surrogate"),
    ("start-input-surrogate-key", "POST", "/sessions",
     _raw('{"strategy": "tbad-ask", "input": {"\\udc00": 1}}'), {}, 422, "invalid_input",
     "lone surrogate"),
    ("start-input-int-65-bits", "POST", "/sessions",
     {"strategy": "tbad-ask", "input": {"n": 2**65}}, {}, 422, "invalid_input", "64-bit"),
    ("start-input-5000-digits", "POST", "/sessions",
     _raw('{"strategy": "tbad-ask", "input": {"n": ' + "9" * 5000 + "}}"), {}, 422,
     "invalid_input", "request body is not valid JSON"),
    ("start-input-nan-literal", "POST", "/sessions",
     _raw('{"strategy": "tbad-ask", "input": {"x": NaN}}'), {}, 422, "invalid_input",
     "input must be JSON-able"),
    ("start-input-nested-300", "POST", "/sessions",
     {"strategy": "tbad-ask", "input": {"a": _nested(300)}}, {}, 422, "invalid_input",
     "input is nested deeper than 256 levels"),
    ("start-input-nested-100000", "POST", "/sessions",
     _raw('{"strategy": "tbad-ask", "input": {"a": ' + "[" * 100_000 + "]" * 100_000 + "}}"),
     {}, 422, "invalid_input", "request body is not valid JSON"),
    ("start-input-over-1MiB", "POST", "/sessions",
     {"strategy": "tbad-ask", "input": {"t": "x" * MIB}}, {}, 413, "payload_too_large",
     f"over the limit of {MIB} bytes"),
    ("start-budget-2**70", "POST", "/sessions",
     {"strategy": "tbad-ask", "budget": {"llm_calls": 2**70}}, {}, 422, "invalid_input",
     "body.budget.llm_calls: Input should be less than or equal to 1000000000000000"),
    ("start-budget-float", "POST", "/sessions",
     {"strategy": "tbad-ask", "budget": {"tokens": 1.5}}, {}, 422, "invalid_input",
     "body.budget.tokens"),
    ("start-budget-zero", "POST", "/sessions",
     {"strategy": "tbad-ask", "budget": {"elapsed_ms": 0}}, {}, 422, "invalid_input",
     "greater than 0"),
    ("start-strategy-lone-surrogate", "POST", "/sessions", _raw('{"strategy": "\\ud800"}'),
     {}, 422, "invalid_input", "strategy"),
    ("start-strategy-too-long", "POST", "/sessions", {"strategy": "s" * 300}, {}, 422,
     "invalid_input", "body.strategy"),
    ("start-timeout-nan", "POST", "/sessions", {"strategy": "tbad-ask"}, {"timeout": "nan"},
     422, "invalid_input", "query.timeout"),
    ("start-timeout-inf", "POST", "/sessions", {"strategy": "tbad-ask"}, {"timeout": "inf"},
     422, "invalid_input", "query.timeout"),
    ("start-timeout-negative", "POST", "/sessions", {"strategy": "tbad-ask"},
     {"timeout": "-1"}, 422, "invalid_input", "query.timeout"),
    ("start-body-not-an-object", "POST", "/sessions", _raw("[1, 2]"), {}, 422,
     "invalid_input", "JSON object"),
    ("feed-response-lone-surrogate", "POST", "/sessions/{sid}/responses",
     _raw('{"response": "half \\ud800"}'), {}, 422, "invalid_input",
     "response holds a lone surrogate"),
    ("feed-query-id-lone-surrogate", "POST", "/sessions/{sid}/responses",
     _raw('{"query_id": "q-\\ud800", "response": "x"}'), {}, 422, "invalid_input",
     "query_id"),
    ("feed-batch-lone-surrogate", "POST", "/sessions/{sid}/responses",
     _raw('{"responses": [{"query_id": "q-0", "response": "\\udfff"}]}'), {}, 422,
     "invalid_input", "responses[0].response holds a lone surrogate"),
    ("feed-usage-1e400", "POST", "/sessions/{sid}/responses",
     _raw('{"response": "x", "usage": {"completion_tokens": 1e400}}'), {}, 422,
     "invalid_input", "body.usage.completion_tokens"),
    ("feed-usage-negative", "POST", "/sessions/{sid}/responses",
     {"response": "x", "usage": {"completion_tokens": -1}}, {}, 422, "invalid_input",
     "body.usage.completion_tokens"),
    ("feed-usage-2**70", "POST", "/sessions/{sid}/responses",
     {"response": "x", "usage": {"completion_tokens": 2**70}}, {}, 422, "invalid_input",
     "body.usage.completion_tokens"),
    ("feed-response-over-1MiB", "POST", "/sessions/{sid}/responses",
     {"response": "x" * (MIB + 1)}, {}, 413, "payload_too_large", "response is"),
    ("feed-timeout-nan", "POST", "/sessions/{sid}/responses", {"response": "x"},
     {"timeout": "nan"}, 422, "invalid_input", "query.timeout"),
    ("status-id-with-braces", "GET", "/sessions/bad%7Bid%7D", None, {}, 422,
     "invalid_input", "session_id"),
    ("status-id-too-long", "GET", "/sessions/" + "s" * 300, None, {}, 422, "invalid_input",
     "session_id"),
    ("list-pending-unknown", "GET", "/sessions", None, {"pending": "everything"}, 422,
     "invalid_input", "pending filter 'everything' is not one of"),
    ("cancel-id-lone-surrogate-escape", "DELETE", "/sessions/s-%ED%A0%80", None, {}, 422,
     "invalid_input", "session_id"),
]


@pytest.mark.parametrize(("method", "path", "body", "query", "status", "kind", "fragment"),
                         [c[1:] for c in HTTP_CASES], ids=[c[0] for c in HTTP_CASES])
async def test_http_bad_input(env: Env, http: Any, method: str, path: str, body: Any,
                              query: dict[str, str], status: int, kind: str,
                              fragment: str) -> None:
    if "{sid}" in path:
        path = path.format(sid=(await env.paused("tbad-ask"))[0])
    kw: dict[str, Any] = {"params": query}
    if isinstance(body, bytes):
        kw.update(content=body, headers={"content-type": "application/json"})
    elif body is not None:
        kw["json"] = body
    res = await http.request(method, path, **kw)
    assert res.status_code == status, res.text
    out = res.json()
    assert out["status"] == "error" and out["type"] == kind, out
    assert fragment in out["error"], out
    await check_unharmed(env)


# -- the MCP front: argument errors are the same error JSON as every other tool error -----------


@asynccontextmanager
async def mcp_client(env: Env) -> AsyncIterator[Any]:
    """The SDK's client on our MCP server over the case's registry, in process (a context
    manager, not a fixture: the client's task group must open and close in one task)."""
    from mcp import Client

    from coordinator.mcp_server import build_server

    async with Client(build_server(env.reg)) as client:
        yield client


MCP_CASES: list[tuple[str, str, dict[str, Any], str]] = [
    # (id, tool, arguments, fragment of the error)
    ("run-no-strategy", "alc_run", {}, "alc_run: strategy: Field required"),
    ("run-strategy-not-a-string", "alc_run", {"strategy": 5},
     "alc_run: strategy: Input should be a valid string"),
    ("run-strategy-lone-surrogate", "alc_run", {"strategy": "\ud800"},
     "strategy holds a lone surrogate"),
    ("run-budget-float", "alc_run", {"strategy": "tbad-ask", "budget": {"llm_calls": 1.5}},
     "alc_run: budget.llm_calls: Input should be a valid integer"),
    ("run-budget-2**70", "alc_run", {"strategy": "tbad-ask", "budget": {"llm_calls": 2**70}},
     "holds an integer outside the 64-bit range"),
    ("run-budget-over-max", "alc_run", {"strategy": "tbad-ask", "budget": {"tokens": 10**16}},
     "budget tokens must be a positive integer up to 10**15"),
    ("run-budget-unknown-key", "alc_run", {"strategy": "tbad-ask", "budget": {"usd": 5}},
     "unknown budget key 'usd'"),
    ("run-ctx-not-an-object", "alc_run", {"strategy": "tbad-ask", "ctx": [1]},
     "alc_run: ctx: Input should be a valid dictionary"),
    ("run-ctx-lone-surrogate", "alc_run", {"strategy": "tbad-ask", "ctx": {"t": "\ud800"}},
     "holds a lone surrogate"),
    ("run-ctx-int-400-digits", "alc_run", {"strategy": "tbad-ask", "ctx": {"n": 10**400}},
     "64-bit range"),
    ("run-ctx-over-1MiB", "alc_run", {"strategy": "tbad-ask", "ctx": {"t": "x" * MIB}},
     f"over the limit of {MIB} bytes"),
    ("run-unknown-argument", "alc_run", {"strategy": "tbad-ask", "input": {"n": 2}},
     "alc_run takes no argument 'input'; its arguments are budget, ctx, idempotency_key, "
     "strategy, ttl"),
    ("advice-opts-not-an-object", "alc_advice", {"strategy": "tbad-ask", "opts": "x"},
     "alc_advice: opts: Input should be a valid dictionary"),
    ("advice-task-not-a-string", "alc_advice", {"strategy": "tbad-ask", "task": 5},
     "alc_advice: task"),
    ("continue-no-session", "alc_continue", {}, "alc_continue: session_id: Field required"),
    ("continue-session-lone-surrogate", "alc_continue",
     {"session_id": "s-\ud800", "response": "x"}, "session_id holds a lone surrogate"),
    ("continue-batch-without-response", "alc_continue",
     {"session_id": "s-0-x", "responses": [{"query_id": "q-0"}]},
     "alc_continue: responses.0.response: Field required"),
    ("continue-batch-unknown-field", "alc_continue",
     {"session_id": "s-0-x", "responses": [{"query_id": "q-0", "response": "x",
                                            "usaage": {}}]},
     "alc_continue: responses.0.usaage: Extra inputs are not permitted"),
    ("continue-usage-not-a-number", "alc_continue",
     {"session_id": "s-0-x", "response": "x", "usage": {"completion_tokens": "many"}},
     "alc_continue: usage.completion_tokens"),
    ("continue-query-id-too-long", "alc_continue",
     {"session_id": "s-0-x", "query_id": "q" * 300, "response": "x"},
     "query_id must be a non-empty string of at most 256 characters"),
    ("continue-response-over-1MiB", "alc_continue",
     {"session_id": "s-0-x", "query_id": "q-0", "response": "x" * (MIB + 1)},
     f"over the limit of {MIB} bytes"),
    ("status-pending-unknown", "alc_status", {"pending_filter": "everything"},
     "Input should be 'meta', 'preview' or 'full'"),
    ("status-history-not-a-bool", "alc_status", {"include_history": "maybe"},
     "alc_status: include_history"),
    ("cancel-session-not-a-string", "alc_cancel", {"session_id": 5},
     "alc_cancel: session_id: Input should be a valid string"),
    ("unknown-tool", "alc_explode", {}, "unknown tool 'alc_explode'; the tools are "
                                        "alc_advice, alc_cancel, alc_continue, alc_run"),
]


@pytest.mark.parametrize(("tool", "args", "fragment"), [c[1:] for c in MCP_CASES],
                         ids=[c[0] for c in MCP_CASES])
async def test_mcp_bad_input(env: Env, tool: str, args: dict[str, Any], fragment: str) -> None:
    async with mcp_client(env) as client:
        res = await client.call_tool(tool, args)
    assert res.is_error, res.content
    [content] = res.content
    out = json.loads(content.text)  # the error JSON, not the SDK's plain text
    assert out["status"] == "error" and out["type"] in ("invalid_input", "payload_too_large"), out
    assert fragment in out["error"], out
    await check_unharmed(env)


async def test_mcp_over_stdio_answers_a_refused_argument_with_the_error_json() -> None:
    """A raw MCP host over the real stdio transport: an argument the schema refuses gets
    the error JSON like any bad argument. (A line the SDK's own JSON parser refuses, nested
    deeper than ~200 levels or holding an escaped lone surrogate, is dropped by the SDK's
    stdio transport before our server sees it; it has no public hook to answer it.)"""
    from tests.procs import ROOT, clean_env

    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "coordinator", "mcp", cwd=ROOT, env=clean_env(),
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL)
    assert proc.stdin is not None and proc.stdout is not None

    async def send(line: str) -> None:
        assert proc.stdin is not None
        proc.stdin.write(line.encode() + b"\n")
        await proc.stdin.drain()

    def call(rid: int, args: str) -> str:
        return (f'{{"jsonrpc": "2.0", "id": {rid}, "method": "tools/call", "params": '
                f'{{"name": "alc_run", "arguments": {args}}}}}')

    try:
        await send(json.dumps({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {
            "protocolVersion": "2025-06-18", "capabilities": {},
            "clientInfo": {"name": "tbad", "version": "0"}}}))
        await send(json.dumps({"jsonrpc": "2.0", "method": "notifications/initialized"}))
        await send(call(3, '{"strategy": "cot", "budget": {"llm_calls": 1.5}}'))
        replies: dict[int, Any] = {}
        while len(replies) < 2:
            line = await asyncio.wait_for(proc.stdout.readline(), 30)
            assert line, "the MCP server closed its stdout"
            msg = json.loads(line)
            replies[msg["id"]] = msg
    finally:
        proc.kill()
        await proc.wait()
    for rid, fragment in ((3, "alc_run: budget.llm_calls: Input should be a valid integer"),):
        result = replies[rid]["result"]
        assert result["isError"] is True, result
        out = json.loads(result["content"][0]["text"])
        assert out["status"] == "error" and out["type"] == "invalid_input", out
        assert fragment in out["error"], out


# -- the worker-side cases against a real worker process ---------------------------------------


@pytest.mark.redis
@pytest.mark.slow
async def test_worker_process_survives_bad_input(redis_url: str, tmp_path: Path) -> None:
    """A real ``coordinator worker`` process meets a corrupt session hash, a queue entry of an
    unknown kind and a strategy it does not know; it fails / dead-letters each one clearly
    and keeps serving a healthy session started before them."""
    from tests.procs import FAST_SETTINGS, WorkerPool, answer_for, new_namespace

    ns = new_namespace()
    pool = WorkerPool(redis_url, ns, tmp_path)
    try:
        worker = await pool.start(concurrency=2)
        async with SessionRegistry.from_url(redis_url, namespace=ns, **FAST_SETTINGS) as reg:
            healthy_sid, ev = await reg.start_execution(
                "mp-rounds", {"tag": "ok", "rounds": 2, "width": 1}, timeout=30)
            assert isinstance(ev, Paused)

            corrupt_sid, ev = await reg.start_execution(
                "mp-rounds", {"tag": "bad", "rounds": 1, "width": 1}, timeout=30)
            assert isinstance(ev, Paused)
            # as an orphan (no live holder), so its next step is a replay that reads it all
            await reg.client.hset(reg.keys.session(corrupt_sid).session, "input", b"\xc1")
            await reg.client.hdel(reg.keys.session(corrupt_sid).session, "holder", "holder_ch")
            with pytest.raises(CorruptState, match="cannot decode the stored input"):
                await reg.feed_response(corrupt_sid, "q-0", "x", timeout=30)
            await reg.client.xadd(reg.keys.jobs, {"k": "exec-python", "sid": "s-0-x"})
            await reg.client.delete(reg.keys.strategies)
            unknown_sid = await reg.submit("no-such-strategy", {})
            failed = await reg.wait_event(unknown_sid, timeout=30)
            assert isinstance(failed, Finished) and failed.state is Phase.FAILED
            assert failed.error is not None and "not registered" in failed.error

            # the healthy session goes on
            ev = await reg.feed_response(healthy_sid, "q-0", answer_for("session ok: round 0, "
                                                                         "item 0"), timeout=30)
            assert isinstance(ev, Paused)
            ev = await reg.feed_response(healthy_sid, "q-0", "last", timeout=30)
            assert isinstance(ev, Finished) and ev.state is Phase.COMPLETED, ev
            total, letters = await reg.dead_letters()
            reasons = sorted(e["reason"] for e in letters)
            assert reasons == ["corrupt state", "unknown job kind 'exec-python'"], letters
            assert total == 2
            assert worker.proc.poll() is None, pool.logs()
    finally:
        pool.close()


@pytest.mark.parametrize("bad", [0, -3, 1.5, True, 10**6])
def test_a_worker_with_a_bad_concurrency_is_refused(bad: Any) -> None:
    from coordinator.transport import Transport
    from workers.worker import Worker

    with pytest.raises(InvalidInput, match="concurrency"):
        Worker(Transport.from_url("redis://127.0.0.1:1/0"), concurrency=bad)
