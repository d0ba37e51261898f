"""What travels on a session's event channel.

A pause carries its round number and its queries, so a waiter that sees it can answer its
caller without reading them back; every other message ("complete", "fail", a phase name) is a
plain wake-up after which the waiter reads the state. Either way the keys are the truth: a
waiter that misses a message re-reads them after its wait slice.
"""

from __future__ import annotations

from typing import Any

import msgpack

from .codec import pack
from .models import LlmQuery, Paused

_PAUSE = "p"


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
        return Paused(tuple(LlmQuery.from_record(r) for r in records))
    except (ValueError, TypeError, KeyError, msgpack.ExtraData):
        return None
