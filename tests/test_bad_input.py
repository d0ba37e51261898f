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

Individual behaviours are also tested in ``test_registry.py`` / ``test_worker.py``; this table
is the one place that lists them all. Runs on fakeredis with an in-process worker (the
fixtures of ``conftest.py``); ``test_worker_process_survives_bad_input`` repeats the
worker-side cases against a real worker process.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
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
    UnknownQuery,
    UnknownStrategy,
)
from coordinator.settings import MIB
from tests.conftest import FakeCluster
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
    Case("budget-calls", "fails", "budget exceeded: 1 more llm call(s) would pass the limit "
         "of 2", budget_calls),
    Case("budget-tokens", "fails", "budget exceeded: token limit 5", budget_tokens),
    Case("budget-time", "fails", "budget exceeded: time limit 1 ms", budget_time),
    Case("strategy-unknown-to-workers", "fails",
         "strategy 'tbad-never-registered' is not registered in this worker",
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
        assert outcome.to_json("sid") == {"status": "error", "error": outcome.error}
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
