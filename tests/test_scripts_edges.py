"""All or nothing: a script that refuses a call leaves nothing behind.

Redis does not undo a script's writes when it fails half-way, so each session script checks
every argument (and the numbers it reads from the session) before its first write and
refuses with a typed code (``{'BAD_ARG', name}`` -> ``InvalidInput``, ``{'CORRUPT', field}``
-> ``CorruptState``). The issue this pins: ``submit(..., ttl=1e20)`` raised a raw
``ResponseError`` after ``create.lua`` had written the session hash (without a TTL) and
queued its job.

Each script is fed its edge cases (not numbers, inf, nan, huge, negative, fractions, empty,
missing or extra arguments) through its typed method on ``registry.scripts`` and, for a
malformed call, through the raw ``evalsha``; every namespace key is read (DUMP and PTTL)
before and after, and must be unchanged. Each test then makes the well-formed call and sees
it write, so the comparison is known to notice. On a real redis-server.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import pytest

from coordinator.codec import pack
from coordinator.errors import CorruptState, InvalidInput, SessionError, StaleRound
from coordinator.models import Paused
from coordinator.registry import SessionRegistry, new_session_id
from coordinator.scripts import Script
from coordinator.settings import MAX_TTL_S, Settings
from tests.procs import InProcessCluster, answer_for
from workers import strategy
from workers.context import Context

pytestmark = pytest.mark.redis

#: Not a whole number as the scripts read them (digits only): each must be refused.
NOT_WHOLE: list[Any] = ["", "abc", "inf", "-inf", "nan", "1e20", "1e400", "-1", "1.5",
                        " 5", "5 ", "+5", "0x10", "99999999999999999999", 10**20, -1,
                        float("nan"), float("inf"), float("-inf"), 1.5]
#: Also refused where the number must be positive (a TTL, an expiry, a lease).
NOT_POSITIVE: list[Any] = [*NOT_WHOLE, 0, "0", 2**48 + 1]
TEN_YEARS_MS = int(MAX_TTL_S * 1000)
STRATEGY = "tedge-rounds"


@strategy(STRATEGY)
async def tedge_rounds(ctx: Context, **_: Any) -> list[Any]:
    return [list(await ctx.llm_batch(["edge a?", "edge b?"])) for _ in range(2)]


@dataclass
class Rig:
    reg: SessionRegistry
    #: In its second round, one of two answers in (both feed-token keys exist).
    paused: str
    #: Queued for a worker that is not there: running, fence 0, round 0.
    running: str


@pytest.fixture
async def rig(redis_url: str) -> AsyncIterator[Rig]:
    settings = Settings(url=redis_url, namespace=f"t{secrets.token_hex(4)}",
                        wait_slice_s=0.05, lock_wait_s=1.0, wait_timeout_s=10.0)
    cluster = InProcessCluster.real(redis_url, settings)
    try:
        reg = cluster.registry()
        worker = await cluster.worker()
        sid, first = await reg.start_execution(STRATEGY, {})
        assert isinstance(first, Paused), first
        for q in first.queries:
            event = await reg.feed_response(sid, q.id, answer_for(q.prompt))
        assert isinstance(event, Paused), event
        await reg.feed_response(sid, "q-0", "a")
        await cluster.stop_worker(worker)  # from here on, only the test writes
        running = await reg.submit(STRATEGY, {})
        yield Rig(reg, sid, running)
    finally:
        await cluster.aclose()


Snapshot = dict[str, tuple[bytes, int]]


async def snapshot(reg: SessionRegistry) -> Snapshot:
    """Every key of the namespace -> (DUMP, PTTL); the stopped worker's heartbeat (it expires
    on its own) and lock C (taken and let go by sweeps) are left out."""
    ns = reg.keys.namespace
    out: Snapshot = {}
    async for raw in reg.client.scan_iter(match=f"{ns}:*", count=1000):
        key = raw.decode()
        if key.startswith(f"{ns}:worker") or key.startswith(reg.keys.registry_lock):
            continue
        out[key] = (await reg.client.dump(key), int(await reg.client.pttl(key)))
    return out


def changes(before: Snapshot, after: Snapshot) -> list[str]:
    """What was written between two snapshots (a TTL that only ran down is no write)."""
    out = []
    for key in sorted(before.keys() | after.keys()):
        if key not in after:
            out.append(f"{key} deleted")
        elif key not in before:
            out.append(f"{key} created")
        elif before[key][0] != after[key][0]:
            out.append(f"{key} changed")
        elif (before[key][1] < 0) != (after[key][1] < 0) or after[key][1] > before[key][1]:
            out.append(f"{key} expiry set: pttl {before[key][1]} -> {after[key][1]}")
    return out


async def refused_without_a_write(
    reg: SessionRegistry, what: str, call: Callable[[], Awaitable[Any]],
    expect: type[SessionError] = InvalidInput, named: str | None = None,
) -> list[str]:
    """Problems with one refused call: it was not refused as ``expect`` (naming ``named``),
    or it wrote something."""
    before = await snapshot(reg)
    problems = []
    try:
        result = await call()
    except expect as exc:
        if named is not None and named not in exc.message:
            problems.append(f"{what}: refused, but the message does not name {named!r}: "
                            f"{exc.message}")
    except Exception as exc:
        problems.append(f"{what}: raised {type(exc).__name__}: {exc}")
    else:
        problems.append(f"{what}: not refused, returned {result!r}")
    written = changes(before, await snapshot(reg))
    if written:
        problems.append(f"{what}: left writes behind: {written}")
    return problems


async def accepted_with_a_write(reg: SessionRegistry, call: Callable[[], Awaitable[Any]]) -> Any:
    before = await snapshot(reg)
    result = await call()
    assert changes(before, await snapshot(reg)), "the well-formed call wrote nothing?"
    return result


async def raw_refused_without_a_write(reg: SessionRegistry, name: str, keys: list[str],
                                      args: list[Any]) -> list[str]:
    script = Script.load(name)
    before = await snapshot(reg)
    problems = []
    try:
        reply = await reg.redis.evalsha(script.sha, script.source, keys, args)
    except SessionError as exc:
        reply = exc
    if not (isinstance(reply, list) and reply and reply[0] == b"BAD_ARG"):
        problems.append(f"{name} with {len(keys)} keys, {len(args)} args: replied {reply!r}")
    written = changes(before, await snapshot(reg))
    if written:
        problems.append(f"{name} with {len(keys)} keys, {len(args)} args: wrote {written}")
    return problems


def bound(script: str, keys: dict[str, str], argv: dict[str, Any]) -> tuple[list[str],
                                                                           list[Any]]:
    return Script.load(script).bind(keys, argv)


def arity_cases(keys: list[str], args: list[Any]) -> list[tuple[list[str], list[Any]]]:
    return [(keys, args[:-1]), (keys, [*args, "extra"]), (keys[:-1], args), ([], []),
            ([*keys, keys[0]], args)]


# -- create.lua ---------------------------------------------------------------------------------


async def test_create_refuses_bad_arguments_before_writing(rig: Rig) -> None:
    reg = rig.reg

    def create(**change: Any) -> Callable[[], Awaitable[Any]]:
        kw: dict[str, Any] = {"strategy": STRATEGY, "input": pack({}), "budget": b"",
                              "ttl_ms": 60_000, "backstop_ms": 120_000}
        sid = change.pop("sid", None)
        kw.update(change)
        return lambda: reg.scripts.create(new_session_id() if sid is None else sid, **kw)

    problems: list[str] = []
    cases: list[tuple[str, Any]] = [("ttl_ms", v) for v in [*NOT_POSITIVE,
                                                             TEN_YEARS_MS + 1]]
    cases += [("backstop_ms", v) for v in NOT_POSITIVE]
    cases += [("strategy", ""), ("input", b""), ("sid", "")]
    for arg, value in cases:
        problems += await refused_without_a_write(reg, f"create {arg}={value!r}",
                                                  create(**{arg: value}), named=arg)
    # submit checks the ttl before Redis sees it (the call was ttl=1e20)
    for ttl in (1e20, float("inf"), float("nan"), -1.0, 0.0, 0.0001, "60", True,
                TEN_YEARS_MS / 1000 + 1):
        problems += await refused_without_a_write(
            reg, f"submit ttl={ttl!r}", lambda t=ttl: reg.submit(STRATEGY, {}, ttl=t),
            named="ttl")

    sid = new_session_id()
    keys, args = bound("create", reg.scripts._session(sid, "create"), {
        "sid": sid, "strategy": STRATEGY, "input": pack({}), "budget": b"", "ttl_ms": 1000,
        "backstop_ms": 2000, "wake_channel": reg.keys.jobs_wake,
        "activity": reg.keys.activity})
    for k, a in arity_cases(keys, args):
        problems += await raw_refused_without_a_write(reg, "create", k, a)
    assert problems == [], "\n".join(problems)

    reply = await accepted_with_a_write(reg, create(sid=sid, ttl_ms=TEN_YEARS_MS))
    assert reply.code == "OK"
    assert await reg.client.pttl(reg.keys.session(sid).session) > 0


# -- feed.lua -----------------------------------------------------------------------------------


async def test_feed_refuses_bad_arguments_before_writing(rig: Rig) -> None:
    reg, sid = rig.reg, rig.paused

    def feed(**change: Any) -> Callable[[], Awaitable[Any]]:
        kw: dict[str, Any] = {"answer": pack({"r": "b"}), "response_chars": 1,
                              "response_tokens": 1, "backstop_ms": 120_000,
                              "token": secrets.token_hex(16), "lease_ms": 1000}
        query_id = change.pop("query_id", "q-1")
        kw.update(change)
        return lambda: reg.scripts.feed(sid, query_id, **kw)

    problems: list[str] = []
    cases: list[tuple[str, Any]] = [(a, v) for a in ("response_chars", "response_tokens",
                                                     "round")
                                    for v in NOT_WHOLE]
    cases += [(a, v) for a in ("backstop_ms", "lease_ms") for v in NOT_POSITIVE]
    cases += [("query_id", ""), ("token", "")]
    for arg, value in cases:
        problems += await refused_without_a_write(reg, f"feed {arg}={value!r}",
                                                  feed(**{arg: value}), named=arg)
    keys, args = bound("feed", reg.scripts._session(sid, "feed"), {
        "sid": sid, "query_id": "q-1", "answer": b"x", "response_chars": 1,
        "response_tokens": 1, "backstop_ms": 2000, "wake_channel": reg.keys.jobs_wake,
        "token": "t", "lease_ms": 1000, "round": 0, "exact": "1", "channel": "c",
        "prompt_delta": 0, "provided": "", "activity": reg.keys.activity})
    for k, a in arity_cases(keys, args):
        problems += await raw_refused_without_a_write(reg, "feed", k, a)
    assert problems == [], "\n".join(problems)

    reply = await accepted_with_a_write(reg, feed())
    assert reply.ready and reply.asked == 2  # the second round is complete


async def test_feed_for_another_round_is_stale_and_writes_nothing(rig: Rig) -> None:
    reg, sid = rig.reg, rig.paused
    asked = int(await reg.client.hget(reg.keys.session(sid).session, "asked"))

    def feed(round: int) -> Callable[[], Awaitable[Any]]:
        return lambda: reg.scripts.feed(
            sid, "q-1", answer=pack({"r": "b"}), response_chars=1, response_tokens=1,
            backstop_ms=120_000, token=secrets.token_hex(16), lease_ms=1000, round=round,
            exact=True)

    problems: list[str] = []
    for wrong in (1, asked - 1, asked + 1, 2**40):
        if wrong != asked and wrong > 0:
            problems += await refused_without_a_write(reg, f"feed round={wrong}", feed(wrong),
                                                      expect=StaleRound,
                                                      named=f"at round {asked}")
    assert problems == [], "\n".join(problems)
    reply = await accepted_with_a_write(reg, feed(asked))
    assert reply.ready and reply.asked == asked


async def test_phase_changes_are_published_on_the_activity_channel(rig: Rig) -> None:
    """create.lua, feed.lua's last answer and terminate.lua each publish ``<sid> <phase>`` on
    the shard's activity channel (commit_step.lua's pause and end: tests/test_http_activity);
    a refused call publishes nothing (the first message heard is the call after it)."""
    reg, sid = rig.reg, rig.paused
    asked = int(await reg.client.hget(reg.keys.session(sid).session, "asked"))

    def feed(round: int) -> Awaitable[Any]:
        return reg.scripts.feed(
            sid, "q-1", answer=pack({"r": "b"}), response_chars=1, response_tokens=1,
            backstop_ms=120_000, token=secrets.token_hex(16), lease_ms=1000, round=round)

    async with await reg.mux.subscribe(reg.keys.activity) as sub:
        with pytest.raises(StaleRound):
            await feed(asked + 1)
        assert (await feed(asked)).ready  # the round's last answer: it runs again
        await reg.cancel(rig.running)
        created = await reg.submit(STRATEGY, {})
        heard = [await sub.get(10.0) for _ in range(3)]
    assert heard == [f"{sid} running".encode(), f"{rig.running} cancelled".encode(),
                     f"{created} running".encode()]


# -- commit_step.lua ----------------------------------------------------------------------------


async def test_commit_step_refuses_bad_arguments_before_writing(rig: Rig) -> None:
    reg, sid = rig.reg, rig.running
    record = {"id": "q-0", "prompt": "p", "max_tokens": 10}
    pause_rest: list[Any] = [0, pack(["q-0"]), 1, "q-0", pack(record)]

    def commit(**change: Any) -> Callable[[], Awaitable[Any]]:
        kw: dict[str, Any] = {
            "fence": 0, "asked": 0, "token": "tok", "holder": "w", "holder_channel": "ch",
            "backstop_ms": 120_000, "retention_ms": 60_000, "journal_entry": b"",
            "progress": b"", "custom": b"", "query_deadline": "", "llm_calls": 1,
            "prompt_chars": 1, "prompt_tokens": 1,
            "outcome": "pause", "event": b"e", "rest": pause_rest}
        kw.update(change)
        return lambda: reg.scripts.commit_step(sid, **kw)

    problems: list[str] = []
    cases: list[tuple[str, Any]] = [
        (a, v) for a in ("fence", "asked", "llm_calls", "prompt_chars", "prompt_tokens")
        for v in NOT_WHOLE]
    cases += [("backstop_ms", v) for v in NOT_POSITIVE]
    cases += [("retention_ms", v) for v in [*NOT_WHOLE, 2**48 + 1]]  # 0: gone at once
    cases += [("outcome", v) for v in ("", "bogus", "PAUSE")]
    for arg, value in cases:
        problems += await refused_without_a_write(reg, f"commit_step {arg}={value!r}",
                                                  commit(**{arg: value}), named=arg)
    q, rec = "q-0", pack(record)
    bad_rest: list[tuple[str, list[Any]]] = [
        ("pause", []), ("pause", [0]), ("pause", [0, pack(["q-0"])]),
        ("pause", [1, pack(["q-0"]), 1, q, rec]),  # a log entry claimed, none given
        ("pause", [5, b"log", pack(["q-0"]), 1, q, rec]),
        ("pause", [0, pack(["q-0"]), 0]),  # a pause asks something
        ("pause", [0, pack(["q-0"]), 2, q, rec]),
        ("pause", [0, pack(["q-0"]), 1, q]),
        ("pause", [0, pack(["q-0"]), 1, q, rec, "extra"]),
        ("pause", [0, pack(["q-0"]), "x", q, rec]),
        ("pause", ["nan", pack(["q-0"]), 1, q, rec]),
        ("pause", [-1, pack(["q-0"]), 1, q, rec]),
        ("complete", [0]), ("complete", [0, pack(1), "extra"]),
        ("fail", [0]), ("fail", [1, "error"]),
    ]
    for outcome, rest in bad_rest:
        problems += await refused_without_a_write(
            reg, f"commit_step {outcome} rest={rest!r}", commit(outcome=outcome, rest=rest))
    keys, args = bound("commit_step", reg.scripts._session(sid, "commit_step"), {
        "sid": sid, "fence": 0, "asked": 0, "token": "t", "group": "workers", "channel": "c",
        "released_channel": "r", "holder": "w", "holder_channel": "h", "backstop_ms": 2000,
        "retention_ms": 1000, "journal_entry": b"", "progress": b"", "custom": b"",
        "query_deadline": "", "llm_calls": 0,
        "prompt_chars": 0, "prompt_tokens": 0, "outcome": "complete", "event": b"e",
        "activity": reg.keys.activity, "*rest": [0, pack(1)]})
    for k, a in arity_cases(keys, args)[2:]:  # fewer or more ARGV: the rest cases above
        problems += await raw_refused_without_a_write(reg, "commit_step", k, a)
    assert problems == [], "\n".join(problems)

    reply = await accepted_with_a_write(reg, commit())
    assert reply.code == "OK"
    assert (await reg.status(sid))["phase"] == "paused"


# -- terminate.lua ------------------------------------------------------------------------------


async def test_terminate_refuses_bad_arguments_before_writing(rig: Rig) -> None:
    reg, sid = rig.reg, rig.paused

    def terminate(**change: Any) -> Callable[[], Awaitable[Any]]:
        kw: dict[str, Any] = {"mode": "expire", "retention_ms": 60_000, "now_ms": None,
                              "error": "expired"}
        target = change.pop("sid", sid)
        kw.update(change)
        mode = kw.pop("mode")
        return lambda: reg.scripts.terminate(target, mode, **kw)

    problems: list[str] = []
    cases: list[tuple[str, Any]] = [("mode", v) for v in ("", "bogus", "CANCEL")]
    cases += [("retention_ms", v) for v in [*NOT_WHOLE, 2**48 + 1]]  # 0: gone at once
    cases += [("now_ms", v) for v in NOT_WHOLE if v != ""]  # '' is "the server's clock"
    cases += [("sid", "")]
    for arg, value in cases:
        problems += await refused_without_a_write(reg, f"terminate {arg}={value!r}",
                                                  terminate(**{arg: value}), named=arg)
    # refused whatever the session's state: a missing one's index entries stay too
    await reg.client.zadd(reg.keys.deadlines, {"s-gone": 1})
    problems += await refused_without_a_write(
        reg, "terminate of a missing session, retention_ms='x'",
        terminate(sid="s-gone", retention_ms="x"), named="retention_ms")
    keys, args = bound("terminate", reg.scripts._session(sid, "terminate"), {
        "sid": sid, "mode": "cancel", "group": "workers", "channel": "c",
        "retention_ms": 1000, "now_ms": "", "error": "", "dead_letter": "",
        "error_type": "", "traceback": "", "activity": reg.keys.activity})
    for k, a in arity_cases(keys, args):
        problems += await raw_refused_without_a_write(reg, "terminate", k, a)
    assert problems == [], "\n".join(problems)

    far = (await reg.client.time())[0] * 1000 + 100 * 24 * 3600 * 1000
    reply = await accepted_with_a_write(reg, terminate(now_ms=far))
    assert reply.code == "OK"
    assert (await reg.status(sid))["phase"] == "failed"


# -- numbers read from a session ----------------------------------------------------------------


@pytest.mark.parametrize("field", ["remaining", "ttl_ms", "asked", "bx_at", "m:rounds"])
async def test_feed_refuses_a_session_whose_numbers_are_corrupt(rig: Rig, field: str) -> None:
    reg, sid = rig.reg, rig.paused
    await reg.client.hset(reg.keys.session(sid).session, field, "not-a-number")
    problems = await refused_without_a_write(
        reg, f"feed with {field} corrupt",
        lambda: reg.scripts.feed(sid, "q-1", answer=b"x", response_chars=1, response_tokens=1,
                                 backstop_ms=120_000, token="t", lease_ms=1000),
        expect=CorruptState, named=field)
    assert problems == [], "\n".join(problems)


@pytest.mark.parametrize("field", ["ttl_ms", "m:llm_calls", "bx_at", "job"])
async def test_commit_step_refuses_a_session_whose_fields_are_corrupt(
    rig: Rig, field: str
) -> None:
    reg, sid = rig.reg, rig.running
    await reg.client.hset(reg.keys.session(sid).session, field, "not-a-number")
    problems = await refused_without_a_write(
        reg, f"commit_step with {field} corrupt",
        lambda: reg.scripts.commit_step(
            sid, fence=0, asked=0, token="t", holder="w", holder_channel="h",
            backstop_ms=120_000, retention_ms=1000, journal_entry=b"", progress=b"",
            llm_calls=1, prompt_chars=1, prompt_tokens=1, outcome="pause", event=b"e",
            rest=[0, pack(["q-0"]), 1, "q-0", pack({"id": "q-0", "prompt": "p"})]),
        expect=CorruptState, named=field)
    assert problems == [], "\n".join(problems)


@pytest.mark.parametrize("field", ["last_activity_at", "ttl_ms"])
async def test_expiry_of_a_session_whose_clock_is_corrupt_fails_it_clearly(
    rig: Rig, field: str
) -> None:
    """The expiry refuses before writing; the sweep then fails the session as corrupt
    (recorded as a dead letter) instead of tripping over it on every pass."""
    reg, sid = rig.reg, rig.paused
    await reg.client.hset(reg.keys.session(sid).session, field, "not-a-number")
    far = (await reg.client.time())[0] * 1000 + 100 * 24 * 3600 * 1000
    problems = await refused_without_a_write(
        reg, f"expire with {field} corrupt",
        lambda: reg.scripts.terminate(sid, "expire", retention_ms=1000, now_ms=far,
                                      error="expired"),
        expect=CorruptState, named=field)
    assert problems == [], "\n".join(problems)
    assert await reg.gc_sweep(now_ms=far) == []
    phase, error = await reg.client.hmget(reg.keys.session(sid).session, "phase", "error")
    assert phase == b"failed" and field in error.decode(), (phase, error)
    assert (await reg.dead_letters())[0] == 1
    assert await reg.client.zscore(reg.keys.deadlines, sid) is None


# -- the lock scripts: one write each, the lease, which Redis itself refuses first ---------------


async def test_lock_scripts_write_nothing_when_their_lease_is_refused(rig: Rig) -> None:
    reg, sid = rig.reg, rig.running
    sk = reg.keys.session(sid)
    problems: list[str] = []
    for lease in ("", "abc", "inf", "nan", "-1", "1e400", 0, 2**63):
        problems += await refused_without_a_write(
            reg, f"lock_acquire lease_ms={lease!r}",
            lambda v=lease: reg.scripts.lock_acquire(sk.lock, sk.session, token="t",
                                                     lease_ms=v, fence_field="fence"),
            expect=SessionError)
        problems += await refused_without_a_write(
            reg, f"step_begin lease_ms={lease!r}",
            lambda v=lease: reg.scripts.step_begin(sid, token="t", lease_ms=v,
                                                   with_journal=True),
            expect=SessionError)
    assert problems == [], "\n".join(problems)
