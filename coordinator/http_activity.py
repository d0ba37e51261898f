"""``GET /events``: the whole namespace's activity as server-sent events, for an operator's page.

Events:

- ``counts``: sessions per phase, data ``{"counts": {...}, "active_sessions": n}``; one on
  connect, then again after changes, at most one per ``COUNTS_EVERY_S`` (a burst of a
  thousand phase changes is a handful of counts, each read fresh);
- ``session``: a session changed phase, data ``{"session_id", "phase"}`` (running,
  paused, completed, failed or cancelled; an expiry is ``failed``), one per change.

Driven by the per-shard channel ``Keys.activity``: every script that moves a session between
phases publishes ``<sid> <phase>`` there in the same atomic step (``create.lua``,
``commit_step.lua``, ``feed.lua``'s last answer of a round, ``terminate.lua``). The stream
subscribes to every shard's channel *before* it reads the first counts, so no change made
after that read goes unheard. Pub/sub only wakes: the counts are read from the indexes each
time, and again after every keep-alive slice without news (a message lost to a reconnect
shows up there, and ``RESYNC`` reads them at once). Events carry no ids: a client that
reconnects gets fresh counts, which is all it needs to refetch what it shows.

One reader task per shard subscription feeds one bounded queue; the stream ends, and its
tasks and subscriptions with it, when the client goes (the response is cancelled: the
``finally`` below runs) or when Redis cannot be reached (an ``error`` event first).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from typing import Any, Final

from .errors import SessionError
from .http_stream import KEEPALIVE
from .registry import SessionRegistry
from .transport import Subscription

#: Most ``counts`` events per second, after the first: a page refetches on each.
COUNTS_EVERY_S = 0.25
#: Phase changes held for a slow client; past that they are dropped and a fresh ``counts``
#: tells the page to refetch (it would show the same state).
QUEUE_CAP = 1000
#: How long a shard's reader waits on its subscription per slice (it loops until cancelled).
_READ_SLICE_S = 60.0


class _Lost:
    """Marker: something may have been missed (a reconnect, or a full queue)."""


LOST: Final = _Lost()


def frame(name: str, data: dict[str, Any]) -> str:
    body = json.dumps(data, ensure_ascii=False, separators=(",", ":"))  # one line
    return f"event: {name}\ndata: {body}\n\n"


def parse(message: bytes) -> dict[str, str] | None:
    """A ``<sid> <phase>`` message as the ``session`` event's data (None: not one)."""
    sid, _, phase = message.decode("utf-8", "replace").partition(" ")
    if not sid or not phase or " " in phase:
        return None
    return {"session_id": sid, "phase": phase}


class _FanIn:
    """Every shard's activity subscription into one bounded queue."""

    def __init__(self, subs: Sequence[Subscription]) -> None:
        self._queue: asyncio.Queue[bytes | _Lost] = asyncio.Queue(QUEUE_CAP)
        self._tasks = [asyncio.create_task(self._read(sub), name=f"activity:{sub.channel}")
                       for sub in subs]

    async def _read(self, sub: Subscription) -> None:
        while True:
            msg = await sub.get(_READ_SLICE_S)
            if msg is None:
                continue
            item = msg if isinstance(msg, bytes) else LOST  # RESYNC: re-read the counts
            try:
                self._queue.put_nowait(item)
            except asyncio.QueueFull:
                self._overflowed()

    def _overflowed(self) -> None:
        """The client is behind by ``QUEUE_CAP`` changes: the oldest and this one make
        room for ``LOST`` (the counts that follow it tell the page to refetch)."""
        with contextlib.suppress(asyncio.QueueEmpty):
            self._queue.get_nowait()
        self._queue.put_nowait(LOST)

    async def get(self, timeout: float) -> bytes | _Lost | None:
        """The next message, ``LOST``, or None after ``timeout`` seconds without one."""
        try:
            return await asyncio.wait_for(self._queue.get(), max(timeout, 0.0))
        except TimeoutError:
            return None

    def close(self) -> None:
        """Cancel the readers. Not awaited: the stream is usually being cancelled itself
        (its client went), and an await would be cancelled before the subscriptions are
        released; a cancelled reader ends at its next turn of the loop."""
        for task in self._tasks:
            task.cancel()


async def _counts(reg: SessionRegistry) -> dict[str, Any]:
    counts = await reg.counts()
    return {"counts": counts, "active_sessions": counts["running"] + counts["paused"]}


async def activity_stream(reg: SessionRegistry, keepalive_s: float,
                          counts_every_s: float = COUNTS_EVERY_S) -> AsyncIterator[str]:
    """The namespace's ``counts`` and ``session`` events, until the client goes; counts at
    most once per ``counts_every_s`` after the first."""
    subs: list[Subscription] = []
    fan: _FanIn | None = None
    try:
        try:
            shards = await reg.services.ready()
            for shard in shards.keys:  # subscribed (confirmed) before the first read
                subs.append(await reg.mux.subscribe(shard.activity))
            fan = _FanIn(subs)
            last = await _counts(reg)
        except SessionError as exc:
            yield _error_frame(exc)
            return
        yield frame("counts", last)
        follow = _follow(reg, fan, last, keepalive_s, counts_every_s)
        async with contextlib.aclosing(follow) as events:
            async for out in events:
                yield out
    finally:  # synchronous: runs to the end even while the response is being cancelled
        if fan is not None:
            fan.close()
        for sub in subs:
            sub.close()


async def _follow(reg: SessionRegistry, fan: _FanIn, last: dict[str, Any],
                  keepalive_s: float, every_s: float) -> AsyncGenerator[str, None]:
    """After the first counts: each change as it comes, the counts after it (at once, or
    once ``every_s`` has passed since the last ones), a keep-alive per quiet slice."""
    due: float | None = None  # when the next counts go out (None: nothing changed)
    sent_at = time.monotonic()
    while True:
        wait = keepalive_s if due is None else min(keepalive_s, due - time.monotonic())
        item = await fan.get(wait)
        if isinstance(item, bytes) and (data := parse(item)) is not None:
            yield frame("session", data)
        now = time.monotonic()
        if item is not None and due is None:
            due = max(now, sent_at + every_s)
        if due is not None and now < due:
            if item is None:
                yield KEEPALIVE
            continue
        try:  # changes are due, or a quiet slice re-checks (a message may have been lost)
            fresh = await _counts(reg)
        except SessionError as exc:
            yield _error_frame(exc)
            return
        if due is not None or fresh != last:
            yield frame("counts", fresh)
            last, sent_at = fresh, time.monotonic()
        else:
            yield KEEPALIVE
        due = None


def _error_frame(exc: SessionError) -> str:
    """An error that ends the stream (Redis unreachable): the client reconnects later."""
    return frame("error", exc.to_json())
