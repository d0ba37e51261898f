"""Checks of a ported strategy's inputs, shared by the modules of this package.

Upstream's Lua packages take whatever ``ctx`` holds and fail deep inside a loop (or loop
zero times) on a bad value; a host here hears at once which input is wrong and what it may
be, as an ``InvalidInput`` that fails the session before any question is asked.
"""

from __future__ import annotations

from typing import Any

from coordinator.errors import InvalidInput

#: The message every strategy of this package gives for a missing task; hosts and tests
#: match on it, so it stays the same for all of them.
TASK_NEEDED = "this strategy needs input {'task': '<what to solve>'}"


def require_task(task: Any) -> str:
    """``task`` as given, or ``InvalidInput`` when it is missing, empty or not text."""
    if not isinstance(task, str) or not task.strip():
        raise InvalidInput(TASK_NEEDED)
    return task


def int_input(name: str, value: Any, low: int, high: int) -> int:
    """An integer input within ``[low, high]`` (a bool is no integer here)."""
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise InvalidInput(f"{name} must be an integer from {low} to {high}, got {value!r:.60}")
    return value


def text_input(name: str, value: Any) -> str:
    """A non-empty text input."""
    if not isinstance(value, str) or not value.strip():
        raise InvalidInput(f"{name} must be a non-empty string")
    return value


def choice_input(name: str, value: Any, choices: tuple[str, ...]) -> str:
    """One of ``choices``: upstream falls back to its default on an unknown value, which
    hides a typo; here the host hears it."""
    if value not in choices:
        raise InvalidInput(f"{name} must be one of {', '.join(choices)}, got {value!r:.60}")
    return str(value)


def text_list_input(name: str, value: Any, low: int, high: int) -> list[str]:
    """A list of ``low`` to ``high`` non-empty strings."""
    if not isinstance(value, list) or not low <= len(value) <= high \
            or not all(isinstance(v, str) and v.strip() for v in value):
        raise InvalidInput(f"{name} must be a list of {low} to {high} non-empty strings")
    return list(value)
