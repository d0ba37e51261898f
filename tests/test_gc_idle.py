"""GC reaps only idle sessions: a session is idle when nobody owes it anything.

Time queued for a worker (a start or resume job nobody has read yet) or spent running a step
is owed by the workers, not the host, so it never counts against the session's TTL; only
time paused, waiting for the host's answers, does. The issue this pins: with a short TTL and
more sessions than worker slots, sessions whose host answered within milliseconds waited in
the queue past their TTL and were failed "idle for longer than its ttl".

The GC reads the clock it is given (``gc_sweep(now_ms=...)``): a sweep "far in the future"
reaps everything the index calls idle, so these tests need no real time to pass. Slow steps
are gates the test opens; nothing sleeps to synchronise. On fakeredis and a redis-server.
"""

from __future__ import annotations

import asyncio
from typing import Any

from coordinator.models import Finished, Paused
from coordinator.registry import SessionRegistry
from coordinator.states import Phase
from tests.helpers import GATES, Gate, assert_eventually
from tests.procs import answer_for
from workers import strategy
from workers.context import Context

EXPIRED = "session expired: it was idle for longer than its ttl"
TTL_S = 0.5
TTL_MS = int(TTL_S * 1000)
#: Far beyond every deadline: a sweep at this clock reaps whatever the index calls idle.
FAR_MS = 100 * 24 * 3600 * 1000


async def _gate(ctx: Context, key: str) -> None:
    if not ctx.replaying and key in GATES:
        GATES[key].entered.set()
        await GATES[key].open.wait()


def _prompt(tag: str, r: int, i: int) -> str:
    return f"idle {tag}: round {r}, item {i}"


@strategy("tidle-rounds")
async def tidle_rounds(ctx: Context, tag: str = "", rounds: int = 1, width: int = 1,
                       **_: Any) -> dict[str, Any]:
    """``rounds`` rounds of ``width`` queries; the step starting round ``r`` waits at the gate
    ``{tag}/{r}`` when the test made one (``{tag}/0`` is the start step)."""
    out = []
    for r in range(rounds):
        await _gate(ctx, f"{tag}/{r}")
        out.append(list(await ctx.llm_batch([_prompt(tag, r, i) for i in range(width)])))
    return {"tag": tag, "rounds": out}


def _result(tag: str, rounds: int, width: int) -> dict[str, Any]:
    return {"tag": tag, "rounds": [[answer_for(_prompt(tag, r, i)) for i in range(width)]
                                   for r in range(rounds)]}


async def _server_ms(reg: SessionRegistry) -> int:
    sec, usec = await reg.client.time()
    return int(sec) * 1000 + int(usec) // 1000


async def _answer_all(reg: SessionRegistry, sid: str, event: Any) -> Any:
    """Answer every round at once, as a fast host does; returns the final event."""
    while isinstance(event, Paused):
        for q in event.queries:
            event = await reg.feed_response(sid, q.id, answer_for(q.prompt))
    return event


async def _deadline(reg: SessionRegistry, sid: str) -> int | None:
    score = await reg.client.zscore(reg.keys.deadlines, sid)
    return None if score is None else int(score)


async def test_sessions_queued_for_a_worker_past_their_ttl_are_not_reaped(
    any_cluster: Any, gates: dict[str, Gate]
) -> None:
    """The issue's scenario: one worker slot, a short TTL, a host that answers at once. The
    start jobs queued behind a long step, and a resume queued behind it too, are owed a
    worker: sweeps past all their TTLs reap none of them, and every session completes. Once
    they sit paused with nobody answering, they are idle, and reaped exactly once."""
    cluster = any_cluster
    host = cluster.registry()
    sweeper = cluster.registry(lock_wait_s=0.2)
    await cluster.worker(concurrency=1)

    # A session whose next round will queue: paused now, answered once the slot is taken.
    resumer, first = await host.start_execution(
        "tidle-rounds", {"tag": "resumer", "rounds": 2, "width": 1}, ttl=TTL_S)
    assert isinstance(first, Paused), first
    GATES["busy/0"] = gate = Gate()
    busy = await host.submit("tidle-rounds", {"tag": "busy"}, ttl=TTL_S)
    await asyncio.wait_for(gate.entered.wait(), 10)  # the one slot is taken
    queued = [await host.submit("tidle-rounds", {"tag": f"q{i}", "rounds": 2, "width": 2},
                                ttl=TTL_S) for i in range(6)]
    resumed = asyncio.create_task(_answer_all(host, resumer, first))

    async def resume_queued() -> bool:
        return bool((await host.status(resumer))["phase"] == "running")

    await assert_eventually(resume_queued, timeout=10)
    far = await _server_ms(host) + FAR_MS
    for _ in range(3):
        reaped = await sweeper.gc_sweep(now_ms=far)
        assert reaped == [], f"GC reaped sessions that wait for a worker: {reaped}"
        assert await sweeper.gc_sweep() == []  # the server's clock agrees
    for sid in (busy, resumer, *queued):
        assert (await host.status(sid))["phase"] == "running"

    gate.open.set()

    async def drive(sid: str) -> Any:
        return await _answer_all(host, sid, await host.wait_event(sid))

    finals = await asyncio.gather(resumed, *(drive(sid) for sid in queued))
    expected = [_result("resumer", 2, 1), *(_result(f"q{i}", 2, 2) for i in range(6))]
    for event, result in zip(finals, expected, strict=True):
        assert isinstance(event, Finished), event
        assert (event.state, event.result) == (Phase.COMPLETED, result), event

    # Now idle: the busy session sits paused, and so do two more nobody answers.
    idle = [busy]
    for i in range(2):
        sid, event = await host.start_execution("tidle-rounds", {"tag": f"idle{i}"}, ttl=TTL_S)
        assert isinstance(event, Paused)
        idle.append(sid)
    far = await _server_ms(host) + FAR_MS
    assert sorted(await sweeper.gc_sweep(now_ms=far)) == sorted(idle)
    assert await sweeper.gc_sweep(now_ms=far) == []
    for sid in idle:
        event = await host.wait_event(sid)
        assert isinstance(event, Finished) and (event.state, event.error) == (
            Phase.FAILED, EXPIRED), event
    assert await host.client.zcard(host.keys.deadlines) == 0


async def test_a_step_running_past_the_ttl_is_no_candidate_and_its_clock_starts_at_its_pause(
    any_cluster: Any, gates: dict[str, Gate]
) -> None:
    """The idle deadline follows the host's side only: set when the session pauses, moved by
    each answer, gone while the last answer's step runs (however long), set again from the
    next pause. A sweep past the TTL in the middle of a step neither reaps the session nor
    even waits for its lock."""
    cluster = any_cluster
    host = cluster.registry()
    sweeper = cluster.registry(lock_wait_s=5.0)
    await cluster.worker()
    sid, first = await host.start_execution(
        "tidle-rounds", {"tag": "long", "rounds": 2, "width": 2}, ttl=TTL_S)
    assert isinstance(first, Paused)
    last = (await host.status(sid))["last_activity_at"]
    assert await _deadline(host, sid) == last + TTL_MS  # paused: the host owes it answers

    await host.feed_response(sid, "q-0", answer_for(_prompt("long", 0, 0)))
    last = (await host.status(sid))["last_activity_at"]
    assert await _deadline(host, sid) == last + TTL_MS  # an answer moves the deadline

    GATES["long/1"] = gate = Gate()
    feeding = asyncio.create_task(
        host.feed_response(sid, "q-1", answer_for(_prompt("long", 0, 1))))
    await asyncio.wait_for(gate.entered.wait(), 10)
    assert await _deadline(host, sid) is None  # running: a worker owes it the step

    lock = host.keys.session(sid).lock
    assert await host.client.exists(lock) == 1  # the step holds lock A
    far = await _server_ms(host) + FAR_MS
    sweep = asyncio.create_task(sweeper.gc_sweep(now_ms=far))
    # With a 5 s lock wait, a sweep that tried this session would still be waiting for it.
    assert await asyncio.wait_for(sweep, 4) == []
    assert (await host.status(sid))["phase"] == "running"

    gate.open.set()
    second = await asyncio.wait_for(feeding, 10)
    assert isinstance(second, Paused) and [q.id for q in second.queries] == ["q-0", "q-1"]
    last = (await host.status(sid))["last_activity_at"]
    assert await _deadline(host, sid) == last + TTL_MS  # the clock restarts at the pause
    final = await _answer_all(host, sid, second)
    assert isinstance(final, Finished) and final.result == _result("long", 2, 2)
    assert await _deadline(host, sid) is None


async def test_expiry_refuses_a_running_session_even_when_asked_directly(
    any_cluster: Any,
) -> None:
    """``terminate.lua``'s expiry is the last word: a running session (here its start job
    waits for a worker that is not there) is refused whatever the clock, and drops out of the
    deadline index should it be found there; its job stays queued for a worker."""
    cluster = any_cluster
    host = cluster.registry()
    sid = await host.submit("tidle-rounds", {"tag": "nobody"}, ttl=TTL_S)
    assert await _deadline(host, sid) is None
    await host.client.zadd(host.keys.deadlines, {sid: 1})  # as a stale index entry would
    far = await _server_ms(host) + FAR_MS
    reply = await host.terminate.expire(sid, now_ms=far, error=EXPIRED)
    assert reply.code == "BUSY", reply
    assert await _deadline(host, sid) is None
    assert await host.gc_sweep(now_ms=far) == []
    assert (await host.status(sid))["phase"] == "running"
    assert await host.client.xlen(host.keys.jobs) == 1

    await cluster.worker()  # a worker at last: the session runs to its first pause
    event = await host.wait_event(sid)
    assert isinstance(event, Paused), event
    assert await host.gc_sweep(now_ms=await _server_ms(host) + FAR_MS) == [sid]
