"""The state machine of one execution, in one screen.

The same table is enforced where the data lives: each Lua script under ``scripts/`` checks
the phase it reads against the transition it makes, atomically.

``running`` covers both "a worker is stepping the strategy" and "the last answer of a
round arrived and the resume job waits for a worker": the original engine goes straight back
to Running when the last answer arrives, and hosts only need to know the session is busy.
"""

from __future__ import annotations

from enum import StrEnum


class Phase(StrEnum):
    RUNNING = "running"
    PAUSED = "paused"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL

    @property
    def state(self) -> str:
        """The coarse ``state`` field of a snapshot: running / paused / terminal."""
        return "terminal" if self.terminal else self.value


TERMINAL: frozenset[Phase] = frozenset({Phase.COMPLETED, Phase.FAILED, Phase.CANCELLED})

#: Allowed transitions; the scripts named in the comments are the only writers.
TRANSITIONS: dict[Phase, frozenset[Phase]] = {
    # commit_step.lua (pause / complete / fail), cancel.lua, expire.lua
    Phase.RUNNING: frozenset({Phase.PAUSED, Phase.COMPLETED, Phase.FAILED, Phase.CANCELLED}),
    # feed.lua (last answer of a round), cancel.lua, expire.lua
    Phase.PAUSED: frozenset({Phase.RUNNING, Phase.CANCELLED, Phase.FAILED}),
    Phase.COMPLETED: frozenset(),
    Phase.FAILED: frozenset(),
    Phase.CANCELLED: frozenset(),
}


def can_transition(src: Phase, dst: Phase) -> bool:
    return dst in TRANSITIONS[src]
