"""Built-in strategies, always registered: what a user tries first.

All are deterministic given their answers (see ``workers.context``), so any worker can
replay them.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Any

from coordinator.errors import InvalidInput

from .catalog import strategy
from .context import Context

_SYSTEM = "You are a careful expert. Answer precisely."


def _task(task: Any) -> str:
    if not isinstance(task, str) or not task.strip():
        raise InvalidInput("this strategy needs input {'task': '<what to solve>'}")
    return task


@strategy("cot")
async def cot(ctx: Context, task: str = "", **_: Any) -> dict[str, Any]:
    """Chain of thought: reason step by step, then state the final answer."""
    task = _task(task)
    ctx.progress(1, 2, "reasoning")
    reasoning = await ctx.llm(
        f"Task: {task}\n\nThink step by step. Number each step.", system=_SYSTEM
    )
    ctx.log("info", f"reasoning received ({len(reasoning)} chars)")
    ctx.progress(2, 2, "final answer")
    answer = await ctx.llm(
        f"Task: {task}\n\nReasoning:\n{reasoning}\n\n"
        "State only the final answer, in one or two sentences.",
        system=_SYSTEM, max_tokens=256,
    )
    return {"answer": answer, "reasoning": reasoning}


@strategy("reflect")
async def reflect(ctx: Context, task: str = "", rounds: int = 1, **_: Any) -> dict[str, Any]:
    """Draft, critique, revise (``rounds`` critique/revise cycles)."""
    task = _task(task)
    if not isinstance(rounds, int) or not 1 <= rounds <= 10:
        raise InvalidInput("rounds must be an integer from 1 to 10")
    total = 1 + 2 * rounds
    ctx.progress(1, total, "draft")
    draft = await ctx.llm(f"Task: {task}\n\nWrite a first draft.", system=_SYSTEM)
    current, critiques = draft, []
    for n in range(rounds):
        ctx.progress(2 + 2 * n, total, f"critique {n + 1}")
        critique = await ctx.llm(
            f"Task: {task}\n\nDraft:\n{current}\n\n"
            "Critique this draft: list its errors, gaps and unclear parts.",
            system="You are a demanding reviewer.",
        )
        critiques.append(critique)
        ctx.log("info", f"critique {n + 1} received")
        ctx.progress(3 + 2 * n, total, f"revision {n + 1}")
        current = await ctx.llm(
            f"Task: {task}\n\nDraft:\n{current}\n\nCritique:\n{critique}\n\n"
            "Rewrite the draft, fixing every point of the critique.",
            system=_SYSTEM,
        )
    return {"answer": current, "draft": draft, "critiques": critiques}


def _normalise(answer: str) -> str:
    """The vote key: the last line, lowercased, without punctuation at the ends."""
    lines = [ln for ln in answer.strip().splitlines() if ln.strip()]
    last = lines[-1] if lines else ""
    return re.sub(r"^\W+|\W+$", "", last.strip().lower())


@strategy("sc")
async def self_consistency(ctx: Context, task: str = "", n: int = 5, **_: Any) -> dict[str, Any]:
    """Self-consistency: N independent answers in one batch, then a majority vote."""
    task = _task(task)
    if not isinstance(n, int) or not 1 <= n <= 64:
        raise InvalidInput("n must be an integer from 1 to 64")
    ctx.progress(1, 1, f"sampling {n} answers")
    samples = await ctx.llm_batch([
        {"prompt": f"Task: {task}\n\nSolve it independently (sample {i + 1} of {n}). "
                   "Put the final answer alone on the last line.",
         "system": _SYSTEM}
        for i in range(n)
    ])
    votes = Counter(_normalise(s) for s in samples)
    # Ties go to the answer seen first, so the vote is a pure function of the answers.
    order = {key: i for i, key in reversed(list(enumerate(_normalise(s) for s in samples)))}
    winner = max(votes, key=lambda k: (votes[k], -order[k]))
    ctx.log("info", f"vote: {votes[winner]} of {n} for {winner!r}")
    return {"answer": winner, "votes": dict(votes), "samples": samples}
