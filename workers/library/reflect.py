"""``reflect``: upstream's Self-Refine loop (package ``reflect``)."""

from __future__ import annotations

from typing import Any

from ..catalog import strategy
from ..context import Context
from .inputs import choice_input, int_input, require_task, text_input

#: Markers a critique may carry to say the draft needs no more work, per ``stop_when``.
STOP_MARKERS = {
    "no_issues": ("NO_ISSUES",),
    "no_major_issues": ("NO_MAJOR_ISSUES", "NO_ISSUES"),
}
_DRAFT_SYSTEM = "You are an expert. Produce a high-quality, detailed response."
_CRITIC_SYSTEM = ("You are a rigorous critic. Be specific about problems and what exactly "
                  "needs improvement. Do not be lenient.")
_REVISE_SYSTEM = ("You are an expert reviser. Address every critique point while preserving "
                  "the strengths of the original.")


def converged(critique: str, stop_when: str) -> bool:
    """Whether the critique carries a marker of ``stop_when`` anywhere (case matters, as
    upstream's pattern match does)."""
    return any(marker in critique for marker in STOP_MARKERS[stop_when])


def _critique_prompt(task: str, draft: str) -> str:
    return (f"Task: {task}\n\nCurrent draft:\n{draft}\n\n"
            "Critique this draft. Identify:\n"
            "- Errors or inaccuracies\n- Missing information\n"
            "- Unclear or weak reasoning\n- Improvements needed\n\n"
            "If there are no major issues, output: NO_MAJOR_ISSUES\n"
            "If the draft is excellent with no issues at all, output: NO_ISSUES")


def _revise_prompt(task: str, draft: str, critique: str) -> str:
    return (f"Task: {task}\n\nPrevious draft:\n{draft}\n\nCritique:\n{critique}\n\n"
            "Revise the draft to address ALL issues raised in the critique. "
            "Maintain what was already good.")


@strategy("reflect")
async def reflect(
    ctx: Context, task: str = "", initial_draft: str | None = None, max_rounds: int = 3,
    stop_when: str = "no_major_issues", gen_tokens: int = 500, critique_tokens: int = 300,
    **_: Any,
) -> dict[str, Any]:
    """Self-Refine: draft, then critique and revise up to ``max_rounds`` times, stopping
    at the first critique that says ``NO_MAJOR_ISSUES`` (or ``NO_ISSUES``).

    Inputs: ``task`` (required), ``initial_draft`` (a draft to refine instead of writing
    one; default none), ``max_rounds`` (default 3; 0 to 20), ``stop_when``
    (``"no_major_issues"``, the default, or ``"no_issues"``), ``gen_tokens`` (draft and
    revisions, default 500), ``critique_tokens`` (default 300). Each question needs the
    answer before it: one question a round, 2 to 7 at the defaults (1 fewer with an
    ``initial_draft``). Result: ``{output, rounds: [{round, critique, converged}],
    total_rounds, converged}``.
    """
    task = require_task(task)
    max_rounds = int_input("max_rounds", max_rounds, 0, 20)
    stop_when = choice_input("stop_when", stop_when, tuple(STOP_MARKERS))
    gen_tokens = int_input("gen_tokens", gen_tokens, 1, 2**31 - 1)
    critique_tokens = int_input("critique_tokens", critique_tokens, 1, 2**31 - 1)
    drafting = 1 if initial_draft is None else 0
    total = drafting + 2 * max_rounds  # progress steps if no critique converges
    if initial_draft is None:
        ctx.progress(1, total, "draft")
        draft = await ctx.llm(f"Task: {task}\n\nProvide a thorough response.",
                              system=_DRAFT_SYSTEM, max_tokens=gen_tokens)
    else:
        draft = text_input("initial_draft", initial_draft)
    rounds: list[dict[str, Any]] = []
    for i in range(1, max_rounds + 1):
        ctx.progress(drafting + 2 * i - 1, total, f"critique {i}")
        critique = await ctx.llm(_critique_prompt(task, draft), system=_CRITIC_SYSTEM,
                                 max_tokens=critique_tokens)
        ctx.log("info", f"critique {i} received")
        done = converged(critique, stop_when)
        rounds.append({"round": i, "critique": critique, "converged": done})
        if done:
            ctx.log("info", f"reflect: converged at round {i}")
            break
        ctx.progress(drafting + 2 * i, total, f"revision {i}")
        draft = await ctx.llm(_revise_prompt(task, draft, critique), system=_REVISE_SYSTEM,
                              max_tokens=gen_tokens)
    return {"output": draft, "rounds": rounds, "total_rounds": len(rounds),
            "converged": bool(rounds) and rounds[-1]["converged"]}
