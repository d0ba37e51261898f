"""``decompose``: upstream algocline's ``decompose`` package (task decomposition), in Python.

Its questions, their wording and limits, and its result fields are upstream's; the sub-task
questions were one ``alc.parallel`` batch there too, so the rounds are the same (three).
"""

from __future__ import annotations

import re
from typing import Any

from ..catalog import strategy
from ..context import MAX_COUNT, Context
from .inputs import int_input, require_task

#: A numbered line, as upstream's Lua pattern ``^%s*(%d+)[%.%)%s]+(.+)`` reads it (ASCII
#: digits and spaces, like Lua's classes).
NUMBERED = re.compile(r"^\s*(\d+)[.)\s]+(.+)", re.ASCII)
#: What Lua's ``%s`` trims: ASCII whitespace only.
LUA_SPACE = " \t\n\r\f\v"

_PLANNER = (
    "You are an expert task planner. Decompose into sub-tasks that are: "
    "(1) self-contained, (2) collectively exhaustive, (3) non-overlapping. "
    "Each sub-task should produce a concrete, useful partial result."
)
_SPECIALIST = (
    "You are a focused specialist. Solve only the assigned sub-task "
    "thoroughly. Be specific and detailed."
)
_INTEGRATOR = (
    "You are an expert integrator. Synthesize partial results "
    "into a complete, well-structured answer. "
    "Eliminate redundancy while preserving all unique contributions."
)


def numbered_items(raw: str, limit: int | None = None) -> list[str]:
    """The items of a numbered list ("1. ...", "2) ...") in a model's answer, trimmed, at
    most ``limit``; other lines are skipped. Shared with ``factscore``, which reads its
    claims with the same upstream pattern."""
    items: list[str] = []
    for line in raw.split("\n"):
        found = NUMBERED.match(line) if line else None
        if found is not None and (limit is None or len(items) < limit):
            items.append(found.group(2).strip(LUA_SPACE))
    return items


def _split_prompt(task: str, max_subtasks: int) -> str:
    return (
        f"Complex task:\n{task}\n\n"
        f"Break this into {max_subtasks} or fewer independent sub-tasks. "
        "Each sub-task should be self-contained and answerable on its own. "
        "Order by logical dependency (independent tasks first).\n\n"
        "Output a numbered list:\n"
        "1. [sub-task description]\n"
        "2. [sub-task description]\n..."
    )


def _subtask_prompt(task: str, index: int, count: int, subtask: str) -> str:
    return (
        "You are working on part of a larger task.\n\n"
        f"Overall goal: {task}\n\n"
        f"Your specific sub-task ({index} of {count}): {subtask}\n\n"
        "Provide a thorough, self-contained answer for this sub-task."
    )


def _merge_prompt(task: str, subtasks: list[str], results: list[str]) -> str:
    parts = "".join(
        f"## Sub-task {i}: {subtask}\n{result}\n\n"
        for i, (subtask, result) in enumerate(zip(subtasks, results, strict=True), start=1)
    )
    return (
        f"Overall task: {task}\n\n"
        f"Sub-task results:\n\n{parts}\n"
        "Merge these results into a unified, coherent response. "
        "Resolve any inconsistencies between sub-tasks. "
        "Ensure completeness — nothing from the sub-results should be lost."
    )


@strategy("decompose")
async def decompose(
    ctx: Context,
    task: str = "",
    max_subtasks: int = 5,
    subtask_tokens: int = 400,
    merge_tokens: int = 600,
    **_: Any,
) -> dict[str, Any]:
    """Split the task into at most ``max_subtasks`` sub-tasks, solve them all in one batch, merge.

    Inputs: ``task`` (required); ``max_subtasks`` (5); ``subtask_tokens`` (400, per
    sub-task answer); ``merge_tokens`` (600, for the merge). At the defaults it asks at
    most 7 questions in 3 rounds: the split, the sub-tasks (one batch, as upstream's
    ``alc.parallel``), the merge. An answer with no numbered line gives one sub-task, the
    task itself. Result: ``answer``, ``subtasks``, ``subtask_results``,
    ``decomposition_raw``.
    """
    task = require_task(task)
    max_subtasks = int_input("max_subtasks", max_subtasks, 1, 64)
    subtask_tokens = int_input("subtask_tokens", subtask_tokens, 1, MAX_COUNT)
    merge_tokens = int_input("merge_tokens", merge_tokens, 1, MAX_COUNT)

    raw = await ctx.llm(_split_prompt(task, max_subtasks), system=_PLANNER, max_tokens=300)
    subtasks = numbered_items(raw, max_subtasks) or [task]
    ctx.log("info", f"decompose: {len(subtasks)} sub-tasks")

    results = await ctx.llm_batch([
        {"prompt": _subtask_prompt(task, i, len(subtasks), subtask), "system": _SPECIALIST,
         "max_tokens": subtask_tokens}
        for i, subtask in enumerate(subtasks, start=1)
    ])
    merged = await ctx.llm(_merge_prompt(task, subtasks, results), system=_INTEGRATOR,
                           max_tokens=merge_tokens)
    return {
        "answer": merged,
        "subtasks": subtasks,
        "subtask_results": results,
        "decomposition_raw": raw,
    }
