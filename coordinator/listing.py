"""Every session, by phase: the pages of ``SessionRegistry.list_sessions`` and ``counts``.

Each shard keeps one index per phase (``coordinator.keys``): paused sessions in the registry
zset (score: last activity), running ones in ``running`` (score: when they began running),
finished ones in ``done:<phase>`` (score: when they finished), each written by the script that
moves the session between phases, in the same atomic step. So a page is a merge of a few
sorted ranges, newest first, and a count is a ``ZCARD`` per index: no scan of the keyspace,
whatever the number of sessions. Finished sessions stay listed while retained: their index
drops entries older than the retention as new ones arrive, and readers ignore older ones
until then.

A cursor is the position of the last session shown: its score and id. The next page starts
strictly after it in (score, id) order, so a page boundary never repeats or skips a session
that stayed where it was, even among sessions with equal scores (many start in one ms).
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from .codec import text
from .errors import InvalidInput
from .keys import Keys
from .states import Phase

#: Runs a batch of commands, replies in order.
Batcher = Callable[[list[tuple[Any, ...]]], Awaitable[list[Any]]]

MAX_LIMIT = 1000
#: Most sessions one page of a strategy-filtered listing looks at before it returns what it
#: found (maybe fewer than ``limit``) with a cursor to go on from: a rare strategy among a
#: million sessions must not make one call read them all.
SCAN_CAP = 5000
_CURSOR = re.compile(r"^(\d{1,16})-([A-Za-z0-9._-]{1,256})$")


@dataclass(frozen=True, slots=True)
class Position:
    """Where a session sits in the listing order: newest score first, then id descending
    (Redis orders equal scores by member; a reverse range reverses that too)."""

    score: int
    sid: str

    def encode(self) -> str:
        return f"{self.score}-{self.sid}"

    @classmethod
    def decode(cls, cursor: str) -> Position:
        match = _CURSOR.match(cursor) if isinstance(cursor, str) else None
        if match is None:
            raise InvalidInput(f"cursor {cursor!r:.80} is not a cursor from a previous page "
                               "(next_cursor)")
        return cls(int(match.group(1)), match.group(2))

    def before(self, score: int, sid: str) -> bool:
        """Whether (score, sid) comes after this position in the listing order."""
        return score < self.score or (score == self.score and sid < self.sid)


def check_phase(phase: str | None) -> list[Phase]:
    """The phases a listing covers: one, or all of them."""
    if phase is None:
        return list(Phase)
    try:
        return [Phase(phase)]
    except ValueError:
        raise InvalidInput(f"phase {phase!r:.80} is not one of: "
                           f"{', '.join(p.value for p in Phase)}") from None


def check_limit(limit: int) -> int:
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_LIMIT:
        raise InvalidInput(f"limit must be an integer from 1 to {MAX_LIMIT}, got {limit!r:.40}")
    return limit


def index_of(shard: Keys, phase: Phase) -> str:
    """The key of ``phase``'s index in ``shard``."""
    if phase is Phase.PAUSED:
        return shard.registry
    if phase is Phase.RUNNING:
        return shard.running
    return shard.done(phase.value)


@dataclass(frozen=True, slots=True)
class Source:
    """One index to read: its key and the lowest score still listed (finished sessions
    past the retention are not)."""

    key: str
    floor: str


def sources(shards: Sequence[Keys], phases: Sequence[Phase], now_ms: int,
            retention_ms: int) -> list[Source]:
    cutoff = str(now_ms - retention_ms)
    return [Source(index_of(shard, phase), cutoff if phase.terminal else "-inf")
            for shard in shards for phase in phases]


async def counts(run: Batcher, shards: Sequence[Keys], now_ms: int,
                 retention_ms: int) -> dict[str, int]:
    """Sessions per phase over every shard: one command per index, in one batch."""
    phases = list(Phase)
    cutoff = now_ms - retention_ms
    commands: list[tuple[Any, ...]] = [
        ("ZCOUNT", index_of(shard, phase), cutoff, "+inf") if phase.terminal
        else ("ZCARD", index_of(shard, phase))
        for shard in shards for phase in phases]
    replies = await run(commands)
    out = {phase.value: 0 for phase in phases}
    for n, reply in enumerate(replies):
        if isinstance(reply, Exception):
            raise reply
        out[phases[n % len(phases)].value] += int(reply)
    return out


async def positions(run: Batcher, srcs: Sequence[Source], after: Position | None,
                    want: int) -> tuple[list[Position], bool]:
    """Up to ``want`` positions after ``after`` over every source, newest first, and whether
    more may follow."""
    fetch = want + 1
    offsets = [0] * len(srcs)
    found: list[list[Position]] = [[] for _ in srcs]
    more = [False] * len(srcs)
    todo = list(range(len(srcs)))
    top = "+inf" if after is None else str(after.score)
    while todo:
        replies = await run([("ZREVRANGEBYSCORE", srcs[i].key, top, srcs[i].floor,
                              "WITHSCORES", "LIMIT", offsets[i], fetch) for i in todo])
        again = []
        for i, reply in zip(todo, replies, strict=True):
            if isinstance(reply, Exception):
                raise reply
            rows = _pairs(reply)
            for sid, score in rows:
                if after is None or after.before(score, sid):
                    found[i].append(Position(score, sid))
            more[i] = len(rows) == fetch
            # Sessions tied with the cursor, at or before it, took part of the fetch: read on.
            if len(found[i]) < want and more[i]:
                offsets[i] += len(rows)
                again.append(i)
        todo = again
    merged = sorted((p for f in found for p in f), key=lambda p: (p.score, p.sid),
                    reverse=True)
    return merged[:want], len(merged) > want or any(more)


def _pairs(reply: Any) -> list[tuple[str, int]]:
    """A WITHSCORES reply (flat from a server, pairs from fakeredis) as (id, score)."""
    if reply and isinstance(reply[0], list | tuple):
        return [(text(m), int(float(s))) for m, s in reply]
    return [(text(reply[n]), int(float(reply[n + 1]))) for n in range(0, len(reply), 2)]
