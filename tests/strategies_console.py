"""The strategy the console's browser tests drive (``tests/test_console_browser.py``), loaded
by the worker process with ``--import tests.strategies_console``.

``console-quiz`` asks a batch of three questions, then one more, and returns a pure function
of the answers, so a test that types the answers knows the exact result.
"""

from __future__ import annotations

from typing import Any

from workers.catalog import strategy
from workers.context import Context

#: The name the Start form offers and the tests pick.
QUIZ = "console-quiz"


def batch_prompts(task: str) -> list[str]:
    return [f"{task}: first idea?", f"{task}: second idea?", f"{task}: third idea?"]


def final_prompt(task: str, answers: list[str]) -> str:
    return f"{task}: pick one of {', '.join(answers)}"


def expected_result(task: str, answers: list[str], choice: str) -> dict[str, Any]:
    """What ``console-quiz`` returns for batch ``answers`` (in query order) and ``choice``."""
    return {"task": task, "ideas": answers, "choice": choice,
            "summary": f"{choice} (of {len(answers)})"}


@strategy(QUIZ)
async def console_quiz(ctx: Context, task: str, style: str = "plain", **_: Any) -> dict[str, Any]:
    """Ask three ideas in one round, then which one to pick; returns the ideas and the pick.

    ``style`` is only echoed into the system text of the first question."""
    ctx.progress(1, 2, "collecting ideas")
    ideas = await ctx.llm_batch([
        {"prompt": batch_prompts(task)[0], "system": f"Answer in a {style} style."},
        batch_prompts(task)[1],
        batch_prompts(task)[2],
    ])
    ctx.log("info", f"{len(ideas)} ideas in")
    ctx.progress(2, 2, "choosing")
    choice = await ctx.llm(final_prompt(task, list(ideas)))
    return expected_result(task, list(ideas), choice)
