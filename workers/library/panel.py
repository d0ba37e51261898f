"""``panel``: upstream's multi-perspective deliberation (package ``panel``)."""

from __future__ import annotations

from typing import Any

from ..catalog import strategy
from ..context import Context
from .inputs import require_task, text_list_input

DEFAULT_ROLES = ("advocate", "critic", "pragmatist")
_MODERATOR_SYSTEM = "You are a wise moderator. Be balanced and decisive."


def _transcript(arguments: list[dict[str, str]]) -> str:
    return "".join(f"[{a['role']}]: {a['text']}\n" for a in arguments)


def _turn_prompt(task: str, role: str, arguments: list[dict[str, str]]) -> str:
    if not arguments:
        return f"Topic: {task}\n\nAs a {role}, present your initial position. 2-3 sentences."
    return (f"Topic: {task}\n\nPrevious arguments:\n{_transcript(arguments)}\n\n"
            f"As a {role}, respond to the discussion. Engage with specific points. "
            "2-3 sentences.")


@strategy("panel")
async def panel(ctx: Context, task: str = "",
                roles: list[str] | tuple[str, ...] = DEFAULT_ROLES,
                **_: Any) -> dict[str, Any]:
    """Panel deliberation: each role speaks in turn, answering the arguments made before
    it, then a moderator synthesises agreements, disagreements and a conclusion.

    Inputs: ``task`` (required), ``roles`` (default ``["advocate", "critic",
    "pragmatist"]``; 1 to 12 names). Every speaker sees the earlier ones, so each question
    is its own round: ``len(roles) + 1`` questions and rounds (4 at the defaults).
    Result: ``{arguments: [{role, text}], synthesis}``.
    """
    task = require_task(task)
    speakers = list(roles) if roles is DEFAULT_ROLES else text_list_input("roles", roles, 1, 12)
    arguments: list[dict[str, str]] = []
    for i, role in enumerate(speakers, 1):
        ctx.progress(i, len(speakers) + 1, role)
        text = await ctx.llm(_turn_prompt(task, role, arguments),
                             system=f"You are a {role}. Stay in character. Be specific.",
                             max_tokens=250)
        arguments.append({"role": role, "text": text})
    ctx.progress(len(speakers) + 1, len(speakers) + 1, "moderator")
    synthesis = await ctx.llm(
        f"Topic: {task}\n\nDebate:\n{_transcript(arguments)}\n\nSynthesize: identify "
        "agreements, key disagreements, and a balanced actionable conclusion. 3-4 sentences.",
        system=_MODERATOR_SYSTEM, max_tokens=400,
    )
    return {"arguments": arguments, "synthesis": synthesis}
