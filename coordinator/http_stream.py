"""``GET /sessions/{id}/events``: a session's life as server-sent events, resumable.

Events, in the order a session makes them:

- ``log``: one per strategy log entry, data ``{"ts", "level", "source", "message", "seq"}``
  (algocline's entry, numbered);
- ``progress``: the strategy's progress object as of the pause or end that follows (sent
  with each one while the strategy has reported progress);
- ``needs_response``: a pause (its ``to_json`` shape: the queries still unanswered);
- ``accepted``: an answer of the round was recorded and others are still missing, data
  ``{"status": "accepted", "remaining": n, "session_id"}`` (the last answer of a round is
  followed by the next pause or the end instead);
- the end, ``completed`` / ``error`` / ``cancelled``, after which the stream closes.

**Ids are derived from the session's state**, not counted per connection, so they mean the
same on every connection and every API process: ``S.G.K.A`` where S is the number of log
entries the session had written (a log event's own ``seq``), G the settled point (pause G
is the session's round G; its end is G = rounds asked + 1), K 0 for progress and 1 for the
pause or end, and A the answers recorded after the pause. Log events are ``seq.0.0.0``.
Compared as four numbers they increase in the order the session makes the events: logs
are written only by the commit that also writes the next pause or the end, and answers
only arrive while a pause stands. A client that reconnects with ``Last-Event-ID`` gets
every event after that id that is still retained (the last 20 logs by seq, the current
round's pause and its accepted answers, the end), and nothing it already had.

Waiting is on the session's pub/sub channel (``feed.lua`` publishes each accepted answer,
a commit each pause and end), never a poll loop; the state is re-read after every wake-up
and after each keep-alive slice, since a channel may drop messages (the keys are the truth).
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from .errors import InvalidInput, SessionError, WaitTimeout
from .models import Finished, Paused
from .registry import SessionRegistry

KEEPALIVE = ": keep-alive\n\n"
#: An event id: four whole numbers (``S.G.K.A``), as this stream sends them.
EVENT_ID = r"^\d{1,15}\.\d{1,15}\.\d{1,15}\.\d{1,15}$"
#: Reads of a session before the stream waits for its next change instead (a commit that
#: lands between the reads of one view sends it round again).
_TRIES = 3

Key = tuple[int, int, int, int]


@dataclass(frozen=True, slots=True)
class Event:
    key: Key
    name: str
    data: dict[str, Any]

    @property
    def id(self) -> str:
        return ".".join(str(n) for n in self.key)

    def frame(self) -> str:
        body = json.dumps(self.data, ensure_ascii=False, separators=(",", ":"))  # one line
        return f"id: {self.id}\nevent: {self.name}\ndata: {body}\n\n"


def parse_event_id(value: str | None) -> Key | None:
    """A ``Last-Event-ID`` as the key to resume after (None: from the start)."""
    if value is None or not value.strip():
        return None
    if not re.fullmatch(EVENT_ID, value.strip()):
        raise InvalidInput(f"Last-Event-ID {value[:60]!r} is not an id this stream sent (four "
                           "numbers such as 12.3.1.0); reconnect without it to start over")
    a, b, c, d = (int(n) for n in value.strip().split("."))
    return a, b, c, d


@dataclass(frozen=True, slots=True)
class View:
    """One consistent read of a session: its snapshot, its settled event (None while it
    runs) and the answers recorded in the round of a pause."""

    sid: str
    snap: dict[str, Any]
    event: Paused | Finished | None
    answered: int = 0

    def events(self) -> list[Event]:
        """Every retained event this view shows, in id order."""
        logs = self._logs()
        top = max((e.key[0] for e in logs), default=0)
        return sorted([*logs, *self._settled(top)], key=lambda e: e.key)

    def _logs(self) -> list[Event]:
        out = []
        for entry in self.snap.get("metrics", {}).get("recent_logs", ()):
            seq = entry.get("seq") if isinstance(entry, dict) else None
            if isinstance(seq, int) and not isinstance(seq, bool) and seq >= 0:
                out.append(Event((seq, 0, 0, 0), "log", entry))
        return out

    def _settled(self, top: int) -> list[Event]:
        """The progress, pause and accepted answers, or progress and end, after log ``top``
        (the commit that wrote the logs wrote these too)."""
        if self.event is None:
            return []
        rounds = int(self.snap.get("round", 0))
        point = rounds if isinstance(self.event, Paused) else rounds + 1
        out = []
        progress = self.snap.get("metrics", {}).get("progress")
        if isinstance(progress, dict):  # {"step", "total", "message"}
            out.append(Event((top, point, 0, 0), "progress", progress))
        if isinstance(self.event, Paused):
            out.append(Event((top, point, 1, 0), "needs_response", self.event.to_json(self.sid)))
            expected = self.answered + len(self.event.queries)
            out.extend(Event((top, point, 1, k), "accepted", {
                "status": "accepted", "remaining": expected - k, "session_id": self.sid})
                for k in range(1, self.answered + 1))
        else:
            data = {"session_id": self.sid, **self.event.to_json(self.sid)}
            out.append(Event((top, point, 1, 0), str(data["status"]), data))
        return out


async def read_view(reg: SessionRegistry, sid: str) -> View | None:
    """The session now, or None when it kept moving under every read (the next wake-up
    reads again). Raises ``SessionError`` (e.g. ``NotFound`` once its retention ran out)."""
    for _ in range(_TRIES):
        snap = await reg.status(sid)
        if snap["phase"] == "running":
            return View(sid, snap, None)
        try:
            event = await reg.wait_event(sid, timeout=0)  # settled now: returns at once
        except WaitTimeout:
            continue  # it began running between the two reads
        if isinstance(event, Finished):
            if snap["state"] == "terminal":
                return View(sid, snap, event)
            continue
        if not isinstance(event, Paused) or snap["phase"] != "paused" \
                or event.round != snap.get("round"):
            continue  # a commit landed between the reads: the snapshot is of another round
        answered = await _answered(reg, sid, event)
        if answered is not None:
            return View(sid, snap, event, answered)
    return None


async def _answered(reg: SessionRegistry, sid: str, pause: Paused) -> int | None:
    """Answers recorded in ``pause``'s round: its query count (``expected``) less the
    queries still unanswered; None when the session has left that round meanwhile."""
    asked, expected = await reg.redis.execute(
        "HMGET", reg.keys.session(sid).session, "asked", "expected")
    if asked is None or expected is None or int(asked) != pause.round:
        return None
    return max(0, int(expected) - len(pause.queries))


async def event_stream(
    reg: SessionRegistry, sid: str, keepalive_s: float, after: Key | None = None
) -> AsyncIterator[str]:
    """The session's events after ``after`` (a ``Last-Event-ID``), each once, then each
    new one as it happens; ends after the session's end. A keep-alive comment every
    ``keepalive_s`` without news keeps proxies from closing the connection."""
    async with await reg.mux.subscribe(reg.keys.session(sid).channel) as sub:
        last = after
        while True:
            try:
                view = await read_view(reg, sid)
            except SessionError as exc:  # e.g. its retention ran out mid-stream
                yield _error_frame(exc)
                return
            if view is not None:
                for event in view.events():
                    if last is None or event.key > last:
                        last = event.key
                        yield event.frame()
                if isinstance(view.event, Finished):
                    return
            if await sub.get(keepalive_s) is None:
                yield KEEPALIVE


def _error_frame(exc: SessionError) -> str:
    """An error that ends the stream: no id, so a client's ``Last-Event-ID`` stays on the
    last event it had, and a reconnect resumes from there."""
    body = json.dumps(exc.to_json(), ensure_ascii=False, separators=(",", ":"))
    return f"event: error\ndata: {body}\n\n"
