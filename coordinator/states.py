"""The state machine of one execution, in one screen.

Why a table: the phase of a session is written only by the Lua scripts under ``scripts/``, each
checking the phase it reads and writing the next one atomically. ``MADE_BY`` names, for every
allowed transition, the scripts (and the mode a script takes, ``script.lua:mode``) that make
it, so the table states what the scripts do rather than what they were meant to do;
tests/test_states.py reads the scripts' code and headers and fails when they and this table
disagree.

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

#: (source, destination) -> the only writers of that transition; source ``None`` is creation.
MADE_BY: dict[tuple[Phase | None, Phase], tuple[str, ...]] = {
    (None, Phase.RUNNING): ("create.lua",),
    (Phase.RUNNING, Phase.PAUSED): ("commit_step.lua:pause",),
    (Phase.RUNNING, Phase.COMPLETED): ("commit_step.lua:complete",),
    (Phase.RUNNING, Phase.FAILED): (
        "commit_step.lua:fail", "terminate.lua:fail"),  # expire refuses a running one
    (Phase.RUNNING, Phase.CANCELLED): ("terminate.lua:cancel",),
    (Phase.PAUSED, Phase.RUNNING): ("feed.lua",),  # the last answer of a round
    (Phase.PAUSED, Phase.FAILED): ("terminate.lua:expire", "terminate.lua:fail"),
    (Phase.PAUSED, Phase.CANCELLED): ("terminate.lua:cancel",),
}

#: Allowed destinations of each phase (``MADE_BY`` without its writers and creation).
TRANSITIONS: dict[Phase, frozenset[Phase]] = {
    src: frozenset(dst for (s, dst) in MADE_BY if s is src) for src in Phase
}


def can_transition(src: Phase | None, dst: Phase) -> bool:
    """``src`` ``None``: may a session be created in ``dst``."""
    return (src, dst) in MADE_BY
