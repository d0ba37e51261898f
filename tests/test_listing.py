"""Every session visible: ``list_sessions`` pages and ``counts`` over the phase indexes.

Before: only paused sessions could be listed (``list_snapshots``); a running, queued, failed
or finished one could only be looked up by id, and a session waiting for a worker showed
nowhere. Each test drives sessions into known phases with in-process workers and checks the
listing against them exactly.
"""

from __future__ import annotations

import asyncio
import secrets
from typing import Any

import pytest

from coordinator import Finished, InvalidInput, Paused, Phase, SessionRegistry, listing
from coordinator.errors import NoWorker
from coordinator.keys import Keys
from coordinator.models import SessionPage
from coordinator.records import now_ms
from coordinator.transport import Transport
from tests.conftest import FakeCluster
from workers import strategy
from workers.context import Context

ON_BOTH_SERVERS = True
SHARDED_TOO = True
ON_CLUSTER_TOO = True

GATES: dict[str, asyncio.Event] = {}
ENTERED: dict[str, asyncio.Event] = {}


@strategy("tlist-ask")
async def ask(ctx: Context, n: int = 1, **_: Any) -> dict[str, Any]:
    """Ask ``n`` questions in one round, then return the answers."""
    return {"answers": await ctx.llm_batch([f"q{i}" for i in range(n)])}


@strategy("tlist-other")
async def other(ctx: Context, **_: Any) -> str:
    return await ctx.llm("other?")


@strategy("tlist-fail")
async def fail(ctx: Context, **_: Any) -> None:
    await ctx.llm("go?")
    raise RuntimeError("boom")


@strategy("tlist-gated")
async def gated(ctx: Context, tag: str = "", **_: Any) -> str:
    ENTERED[tag].set()
    await GATES[tag].wait()
    return await ctx.llm("after the gate")


def gate() -> tuple[str, asyncio.Event]:
    """A new gate: its tag, and the event set when the strategy reached it."""
    tag = secrets.token_hex(4)
    GATES[tag], ENTERED[tag] = asyncio.Event(), asyncio.Event()
    return tag, ENTERED[tag]


async def everything(reg: SessionRegistry, **filters: Any) -> list[dict[str, Any]]:
    """Every page of a listing, followed to its end."""
    out: list[dict[str, Any]] = []
    cursor = None
    for _ in range(1000):
        page = await reg.list_sessions(cursor=cursor, **filters)
        out += page.sessions
        if page.next_cursor is None:
            return out
        cursor = page.next_cursor
    raise AssertionError("the listing did not end")


async def one_of_each(reg: SessionRegistry) -> dict[str, str]:
    """A session in every phase (running held mid-step by a gate); phase -> session id."""
    tag, entered = gate()
    done = await reg.submit("tlist-ask")
    event = await reg.wait_event(done)
    assert isinstance(event, Paused)
    assert isinstance(await reg.feed_response(done, "q-0", "a"), Finished)
    failed, _ = await reg.start_execution("tlist-fail")
    assert isinstance(await reg.feed_response(failed, "q-0", "x"), Finished)
    cancelled, _ = await reg.start_execution("tlist-ask")
    await reg.cancel(cancelled)
    paused, _ = await reg.start_execution("tlist-ask", {"n": 2})
    running = await reg.submit("tlist-gated", {"tag": tag})
    await asyncio.wait_for(entered.wait(), 10)
    return {"completed": done, "failed": failed, "cancelled": cancelled, "paused": paused,
            "running": running}


async def test_every_phase_is_listed_and_counted(registry: SessionRegistry,
                                                 worker: Any) -> None:
    ids = await one_of_each(registry)
    try:
        listed = {s["session_id"]: s for s in await everything(registry)}
        assert {sid: s["phase"] for sid, s in listed.items()} == {
            sid: phase for phase, sid in ids.items()}
        assert await registry.counts() == {p: 1 for p in ids}
        for phase, sid in ids.items():
            page = await registry.list_sessions(phase=phase)
            assert [s["session_id"] for s in page.sessions] == [sid]
            assert page.next_cursor is None
        running = listed[ids["running"]]
        assert running["waiting_for_worker"] is False  # its step holds lock A
        assert listed[ids["failed"]]["error_type"] == "strategy_error"
        assert "waiting_for_worker" not in listed[ids["paused"]]
    finally:
        for event in GATES.values():
            event.set()


async def test_newest_activity_first_and_pages_cover_everything_once(
        registry: SessionRegistry, worker: Any) -> None:
    sids = [(await registry.start_execution("tlist-ask"))[0] for _ in range(23)]
    seen: list[str] = []
    cursor = None
    sizes = []
    while True:
        page = await registry.list_sessions(phase="paused", limit=5, cursor=cursor)
        sizes.append(len(page.sessions))
        seen += [s["session_id"] for s in page.sessions]
        activity = [s["last_activity_at"] for s in page.sessions]
        assert activity == sorted(activity, reverse=True)
        if page.next_cursor is None:
            break
        cursor = page.next_cursor
    assert sorted(seen) == sorted(sids) and len(seen) == len(set(seen))
    assert sizes == [5, 5, 5, 5, 3]
    # an answer moves a session to the top of the paused listing
    await registry.feed_response(sids[0], "q-0", "a")  # completes it
    top = (await registry.list_sessions(limit=1)).sessions[0]
    assert top["session_id"] == sids[0] and top["phase"] == "completed"


async def test_filter_by_strategy_pages_are_exact(registry: SessionRegistry, worker: Any,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    mine = {(await registry.start_execution("tlist-other"))[0] for _ in range(7)}
    for _ in range(12):
        await registry.start_execution("tlist-ask")
    monkeypatch.setattr(listing, "SCAN_CAP", 4)  # short scans: pages may come back short
    found = await everything(registry, strategy="tlist-other", limit=3)
    assert [s["session_id"] for s in found if s["session_id"] in mine] == \
        [s["session_id"] for s in found]
    assert {s["session_id"] for s in found} == mine and len(found) == len(mine)
    assert (await registry.list_sessions(strategy="no-such")).sessions == []


async def test_a_queued_session_says_it_waits_for_a_worker(fake_cluster: FakeCluster) -> None:
    reg = fake_cluster.registry()
    # no worker at all: a start fails at once, before writing anything
    with pytest.raises(NoWorker) as info:
        await reg.start_execution("tlist-ask")
    assert info.value.code == "no_worker" and info.value.http_status == 503
    assert await reg.counts() == {p.value: 0 for p in Phase}
    sid = await reg.submit("tlist-ask")
    assert sid.live_workers == 0
    [snap] = (await reg.list_sessions()).sessions
    assert snap["session_id"] == sid and snap["phase"] == "running"
    assert snap["waiting_for_worker"] is True
    await fake_cluster.worker()
    assert isinstance(await reg.wait_event(sid), Paused)
    assert (await reg.submit("tlist-ask")).live_workers == 1


async def test_finished_sessions_leave_the_listing_after_retention(
        fake_cluster: FakeCluster) -> None:
    reg = fake_cluster.registry()
    await fake_cluster.worker()
    sid, _ = await reg.start_execution("tlist-ask")
    await reg.cancel(sid)
    assert (await reg.counts())["cancelled"] == 1
    shards = await reg.services.ready()
    keys = shards.of(sid)
    later = now_ms() + reg.settings.retention_ms + 60_000
    await reg.gc_sweep(now_ms=later)
    assert not await reg.client.zscore(keys.done("cancelled"), sid)


async def test_bad_arguments_are_refused(registry: SessionRegistry) -> None:
    for kwargs in ({"phase": "sleeping"}, {"limit": 0}, {"limit": 1001}, {"limit": True},
                   {"cursor": "nonsense"}, {"cursor": "12-"}, {"strategy": ""}):
        with pytest.raises(InvalidInput):
            await registry.list_sessions(**kwargs)


async def test_an_accepted_answer_is_announced(registry: SessionRegistry,
                                               worker: Any) -> None:
    sid, _ = await registry.start_execution("tlist-ask", {"n": 3})
    channel = registry.keys.session(sid).channel
    async with await registry.mux.subscribe(channel) as sub:
        await registry.feed_response(sid, "q-1", "b")
        assert await sub.get(5) == b"a"
    snap = await registry.status(sid)
    assert snap["pending_queries"] == 2 and snap["round"] == 1


# -- the cursor among equal scores (one index, no workers) --------------------------------------


async def test_cursor_pages_through_equal_scores_exactly() -> None:
    import fakeredis

    transport = Transport.in_memory(fakeredis.FakeServer())
    keys = Keys("tcur")
    members = {f"s{n:03d}": 1000 for n in range(37)} | {f"t{n:03d}": 999 for n in range(5)}
    await transport.execute("ZADD", keys.registry, *[x for m, s in members.items()
                                                       for x in (s, m)])
    src = [listing.Source(keys.registry, "-inf")]
    seen: list[str] = []
    after = None
    while True:
        page, more = await listing.positions(transport.execute_many, src, after, 4)
        seen += [p.sid for p in page]
        if not more:
            break
        after = page[-1]
    assert seen == sorted(members, key=lambda m: (members[m], m), reverse=True)
    await transport.aclose()


def test_page_json_shape() -> None:
    page = SessionPage([{"session_id": "x"}], "5-x")
    assert page.to_json() == {"sessions": [{"session_id": "x"}], "next_cursor": "5-x"}


async def test_strategies_lists_what_live_workers_offer(fake_cluster: FakeCluster) -> None:
    reg = fake_cluster.registry()
    assert await reg.strategies() == {}  # no live worker: nothing is offered
    await fake_cluster.worker()
    await fake_cluster.worker()
    offered = await reg.strategies()
    about = offered["tlist-ask"]
    assert about["name"] == "tlist-ask" and about["workers"] == 2
    assert about["description"] == "Ask ``n`` questions in one round, then return the answers."
    assert [p["name"] for p in about["params"]] == ["n"]
    assert about["params"][0]["required"] is False and about["params"][0]["default"] == 1
    assert {"cot", "reflect", "sc"} <= set(offered)
