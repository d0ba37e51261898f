"""``GET /sessions/{id}/events`` through a real uvicorn server, with a real worker process
driving the session: every kind of event (log, progress, needs_response, accepted, the end)
arrives as it happens, and a client that drops the connection and comes back with
``Last-Event-ID`` misses nothing still retained and gets nothing twice.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from coordinator.http_api import create_app
from coordinator.registry import SessionRegistry
from tests.procs import FAST_SETTINGS, WorkerPool
from tests.test_http_api import served

pytestmark = [pytest.mark.redis, pytest.mark.slow]

WAIT_S = 30.0


@dataclass(frozen=True)
class Ev:
    id: str
    event: str
    data: Any

    @property
    def key(self) -> tuple[int, ...]:
        return tuple(int(n) for n in self.id.split("."))


class Sse:
    """One event-stream connection, read an event at a time."""

    def __init__(self, res: httpx.Response) -> None:
        self.res = res
        self._lines = res.aiter_lines()
        self.seen: list[Ev] = []

    async def next(self) -> Ev | None:
        """The next event (keep-alive comments passed over), or None at the stream's end."""
        return await asyncio.wait_for(self._next(), WAIT_S)

    async def _next(self) -> Ev | None:
        import json

        fields: dict[str, str] = {}
        async for line in self._lines:
            if line == "":
                if fields:
                    ev = Ev(fields["id"], fields["event"], json.loads(fields["data"]))
                    self.seen.append(ev)
                    return ev
                continue
            if line.startswith(":"):
                continue
            name, _, value = line.partition(": ")
            fields[name] = value
        return None

    async def until(self, *names: str) -> list[Ev]:
        """Events up to and including the next one named in ``names``."""
        out: list[Ev] = []
        while True:
            ev = await self.next()
            assert ev is not None, f"the stream ended before {names}: {out}"
            out.append(ev)
            if ev.event in names:
                return out


@asynccontextmanager
async def events(c: httpx.AsyncClient, sid: str, last_id: str | None = None
                 ) -> AsyncIterator[Sse]:
    headers = {"Last-Event-ID": last_id} if last_id else {}
    async with c.stream("GET", f"/sessions/{sid}/events", headers=headers) as res:
        assert res.status_code == 200
        assert res.headers["content-type"].startswith("text/event-stream")
        yield Sse(res)


@asynccontextmanager
async def api(redis_url: str, pool: WorkerPool) -> AsyncIterator[httpx.AsyncClient]:
    """One real worker, and the API under uvicorn in front of it."""
    await pool.start()
    app = create_app(lambda: SessionRegistry.from_url(redis_url, namespace=pool.namespace,
                                                      **FAST_SETTINGS), keepalive_s=0.5)
    async with served(app) as base, httpx.AsyncClient(base_url=base, timeout=WAIT_S) as c:
        yield c


async def feed(c: httpx.AsyncClient, sid: str, qid: str, text: str) -> dict[str, Any]:
    res = await c.post(f"/sessions/{sid}/responses", json={"query_id": qid, "response": text})
    assert res.status_code == 200, res.text
    body: dict[str, Any] = res.json()
    return body


async def start(c: httpx.AsyncClient, strategy: str, **input: Any) -> dict[str, Any]:
    res = await c.post("/sessions", json={"strategy": strategy, "input": input})
    assert res.status_code == 201, res.text
    body: dict[str, Any] = res.json()
    return body


def ordered(evs: list[Ev]) -> bool:
    keys = [e.key for e in evs]
    return keys == sorted(set(keys))


async def test_stream_shows_progress_pause_accepted_log_and_end(
    redis_url: str, worker_pool: WorkerPool
) -> None:
    async with api(redis_url, worker_pool) as c:
        first = await start(c, "sc", task="2+2", n=3)
        sid = first["session_id"]
        async with events(c, sid) as s:
            head = await s.until("needs_response")
            assert [e.event for e in head] == ["progress", "needs_response"]
            assert head[0].data == {"step": 1, "total": 3, "message": "sampling 3 paths"}
            assert head[1].data == first

            assert await feed(c, sid, "q-0", "4") == {"status": "accepted", "remaining": 2}
            ev = await s.next()
            assert ev is not None and ev.event == "accepted"
            assert ev.data == {"status": "accepted", "remaining": 2, "session_id": sid}
            await feed(c, sid, "q-2", "4")
            ev = await s.next()
            assert ev is not None and ev.event == "accepted" and ev.data["remaining"] == 1

            extract = await feed(c, sid, "q-1", "5")  # sc: then one extraction per path
            assert extract["status"] == "needs_response" and len(extract["queries"]) == 3
            await s.until("needs_response")
            for qid, text, left in (("q-0", "4", 2), ("q-2", "4", 1)):
                await feed(c, sid, qid, text)
                ev = await s.next()
                assert ev is not None and ev.event == "accepted" and ev.data["remaining"] == left
            consensus = await feed(c, sid, "q-1", "5")
            mid = await s.until("needs_response")
            assert [e.event for e in mid] == ["log", "progress", "needs_response"]
            log = mid[0].data
            assert set(log) == {"ts", "level", "source", "message", "seq"}
            assert log["level"] == "info" and log["seq"] == 1 and log["source"] == "ctx.log"
            assert "vote: 2 of 3" in log["message"]
            assert mid[-1].data == {"session_id": sid, **consensus}
            final = await feed(c, sid, "q-0", "4")
            assert final["status"] == "completed"
            tail = await s.until("completed")
            assert [e.event for e in tail] == ["progress", "completed"]
            assert tail[-1].data == {"session_id": sid, **final}
            assert await s.next() is None  # the stream closes after the end
            assert ordered(s.seen)


async def test_reconnect_with_last_event_id_misses_nothing_and_repeats_nothing(
    redis_url: str, worker_pool: WorkerPool
) -> None:
    """Stream A drops after the first accepted answer and comes back with Last-Event-ID
    while the round is still open; stream B stays connected throughout. A's two
    connections together see exactly what B sees: same ids, same events, none twice."""
    async with api(redis_url, worker_pool) as c:
        # one round of 4 queries, then the end (sc's later rounds would move on meanwhile)
        first = await start(c, "mp-rounds", tag="r", rounds=1, width=4)
        sid = first["session_id"]
        async with events(c, sid) as b:
            async with events(c, sid) as a1:
                await a1.until("needs_response")
                await feed(c, sid, "q-0", "4")
                await a1.until("accepted")
            last = a1.seen[-1].id
            await feed(c, sid, "q-1", "4")
            await feed(c, sid, "q-2", "5")
            async with events(c, sid, last) as a2:
                resumed = await a2.until("accepted")
                resumed += await a2.until("accepted")
                assert [e.data["remaining"] for e in resumed] == [2, 1]
                final = await feed(c, sid, "q-3", "4")
                resumed += await a2.until("completed")
                assert await a2.next() is None
            await b.until("completed")
            assert await b.next() is None

            assert a1.seen + a2.seen == b.seen
            assert min(e.key for e in a2.seen) > a1.seen[-1].key  # never back to the start
            assert ordered(b.seen)
            assert b.seen[-1].data == {"session_id": sid, **final}
            assert [e.event for e in b.seen].count("accepted") == 3

        async with events(c, sid, b.seen[-1].id) as after_end:
            assert await after_end.next() is None  # seen it all: nothing again


async def test_reconnect_after_rounds_moved_on_gets_what_is_retained(
    redis_url: str, worker_pool: WorkerPool
) -> None:
    """A client gone for two rounds gets the logs written meanwhile, the progress and the
    current pause (an earlier round's pause is no longer retained), with the ids a fresh
    connection gives the same events: ids come from the session, not the connection."""
    async with api(redis_url, worker_pool) as c:
        first = await start(c, "reflect", task="t", max_rounds=1)
        sid = first["session_id"]
        async with events(c, sid) as a1:
            await a1.until("needs_response")
        critique = await feed(c, sid, "q-0", "draft")
        revision = await feed(c, sid, "q-0", "critique")
        assert critique["status"] == revision["status"] == "needs_response"

        async with events(c, sid, a1.seen[-1].id) as a2, events(c, sid) as fresh:
            resumed = await a2.until("needs_response")
            shown = await fresh.until("needs_response")
            assert resumed == shown
            assert [e.event for e in resumed] == ["log", "progress", "needs_response"]
            assert resumed[0].data["message"] == "critique 1 received"
            assert resumed[0].data["seq"] == 1
            assert resumed[1].data["message"] == "revision 1"
            assert resumed[2].data == revision
            assert resumed[0].key > a1.seen[-1].key
            assert resumed[2].id != "1"

            final = await feed(c, sid, "q-0", "revised")
            end_a = await a2.until("completed")
            end_f = await fresh.until("completed")
            assert end_a == end_f and end_a[-1].data == {"session_id": sid, **final}


async def test_a_bad_last_event_id_is_422(redis_url: str, worker_pool: WorkerPool) -> None:
    async with api(redis_url, worker_pool) as c:
        sid = (await start(c, "cot", task="t"))["session_id"]
        for bad in ("7", "1.2.3", "a.b.c.d", "1.2.3.4.5"):
            res = await c.get(f"/sessions/{sid}/events", headers={"Last-Event-ID": bad})
            assert res.status_code == 422, (bad, res.text)
            body = res.json()
            assert body["status"] == "error" and body["type"] == "invalid_input"
