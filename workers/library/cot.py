"""``cot``: upstream's iterative chain of thought (package ``cot``)."""

from __future__ import annotations

from typing import Any

from ..catalog import strategy
from ..context import Context
from .inputs import int_input, require_task

_STEP_SYSTEM = "You are a deep thinker. Each step should reveal a new insight."
_SYNTH_SYSTEM = "You are an expert synthesizer. Be thorough but concise."


def _steps(chain: list[str]) -> str:
    return "".join(f"Step {i}: {text}\n" for i, text in enumerate(chain, 1))


def _step_prompt(task: str, chain: list[str]) -> str:
    if not chain:
        return (f"Task: {task}\n\nThink step by step. What is the first key insight? "
                "1-2 sentences.")
    return (f"Task: {task}\n\nReasoning so far:\n{_steps(chain)}\n\nWhat is the next key "
            "insight? Build on previous reasoning. 1-2 sentences.")


@strategy("cot")
async def cot(ctx: Context, task: str = "", depth: int = 3, **_: Any) -> dict[str, Any]:
    """Chain of thought: ``depth`` insights, each building on the ones before, then one
    synthesis of the chain into an answer.

    Inputs: ``task`` (required), ``depth`` (default 3; 0 to 50). Each insight needs the
    previous ones, so every question is its own round: ``depth + 1`` questions and rounds
    (4 at the defaults). Result: ``{chain: [insight, ...], conclusion}``.
    """
    task = require_task(task)
    depth = int_input("depth", depth, 0, 50)
    chain: list[str] = []
    for i in range(1, depth + 1):
        ctx.progress(i, depth + 1, f"insight {i}")
        chain.append(await ctx.llm(_step_prompt(task, chain), system=_STEP_SYSTEM,
                                   max_tokens=200))
    ctx.progress(depth + 1, depth + 1, "synthesis")
    conclusion = await ctx.llm(
        f"Task: {task}\n\nReasoning chain:\n{_steps(chain)}\n\n"
        "Synthesize into a clear, comprehensive answer.",
        system=_SYNTH_SYSTEM, max_tokens=500,
    )
    return {"chain": chain, "conclusion": conclusion}
