"""What travels on a session's event channel.

A pause carries its round number and its queries, so a waiter that sees it can answer its
caller without reading them back; every other message ("complete", "fail", a phase name) is a
plain wake-up after which the waiter reads the state. Either way the keys are the truth: a
waiter that misses a message re-reads them after its wait slice.

It also parses the handoff that ``feed.lua`` sends a session's live holder on its nudge
channel: the lock A it took in the holder's name and the round's answers, so the holder's
step needs no read at all.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgpack

from .codec import pack
from .models import LlmQuery, Paused

_PAUSE = "p"
#: What ``feed.lua`` publishes for an answer that leaves others of the round missing: news for
#: observers (an event stream shows it), nothing settled for a waiter.
ACCEPTED = b"a"


def pause_event(asked: int, records: list[dict[str, Any]]) -> bytes:
    return pack([_PAUSE, asked, records])


def parse_pause(message: bytes, after_asked: int) -> Paused | None:
    """The Paused a message announces, if it is a pause newer than round ``after_asked``."""
    if not message.startswith(b"\x93"):  # a msgpack 3-array; anything else is a wake-up
        return None
    try:
        kind, asked, records = msgpack.unpackb(message, raw=False)
        if kind != _PAUSE or int(asked) <= after_asked:
            return None
        return Paused(tuple(LlmQuery.from_record(r) for r in records), round=int(asked))
    except (ValueError, TypeError, KeyError, msgpack.ExtraData):
        return None


@dataclass(frozen=True, slots=True)
class Handoff:
    """Lock A taken for a live holder (``token``, ``fence``) to resume round ``asked``."""

    sid: str
    fence: int
    token: str
    asked: int
    tries: int
    answers: dict[str, bytes]


def parse_handoff(message: bytes) -> Handoff | None:
    """The handoff a nudge carries, or None for a plain nudge (a bare session id).
    Raises ValueError when it looks like a handoff but does not parse."""
    if not message.startswith(b"H\n"):
        return None
    head = message.split(b"\n", 7)
    if len(head) < 7:
        raise ValueError("handoff message is truncated")
    _, sid, fence, token, asked, tries, count = head[:7]
    rest = head[7] if len(head) > 7 else b""
    answers: dict[str, bytes] = {}
    pos = 0
    for _ in range(int(count)):
        qid_end = rest.index(b"\n", pos)
        len_end = rest.index(b"\n", qid_end + 1)
        size = int(rest[qid_end + 1:len_end])
        start = len_end + 1
        value = rest[start:start + size]
        if len(value) != size:
            raise ValueError("handoff message is truncated")
        answers[rest[pos:qid_end].decode()] = value
        pos = start + size + 1
    return Handoff(sid.decode(), int(fence), token.decode(), int(asked), int(tries), answers)
