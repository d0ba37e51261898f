"""Strategies for the multi-process tests, loaded by worker processes with
``--import tests.strategies_mp`` (the worker runs with the repo root on ``PYTHONPATH``).

Both are deterministic given their answers, and their results are a pure function of the
answers, so a test can compute the exact expected result: ``expected_rounds`` below.
"""

from __future__ import annotations

import asyncio
from typing import Any

from workers.catalog import strategy
from workers.context import Context


def prompt_for(tag: str, round_no: int, index: int) -> str:
    return f"session {tag}: round {round_no}, item {index}"


def expected_rounds(
    tag: str, rounds: int, width: int, answer: Any
) -> list[list[str]]:
    """What ``mp-rounds`` returns when every query is answered with ``answer(prompt)``."""
    return [[answer(prompt_for(tag, r, i)) for i in range(width)] for r in range(rounds)]


@strategy("mp-rounds")
async def mp_rounds(
    ctx: Context, tag: str = "", rounds: int = 5, width: int = 3, **_: Any
) -> dict[str, Any]:
    """``rounds`` rounds of ``width`` queries each; returns every round's answers in query
    order, one list per applied round, so a round applied twice (or lost) shows."""
    collected: list[list[str]] = []
    for r in range(rounds):
        ctx.progress(r + 1, rounds, f"round {r}")
        answers = await ctx.llm_batch([prompt_for(tag, r, i) for i in range(width)])
        collected.append(list(answers))
    return {"tag": tag, "rounds": collected}


@strategy("mp-slow")
async def mp_slow(ctx: Context, tag: str = "", delay: float = 1.0, **_: Any) -> dict[str, Any]:
    """Round 1 asks two queries; every later step first sleeps ``delay`` seconds (live steps
    only, not replays), so a test can observe the session while it is ``running``."""
    first = await ctx.llm_batch([f"{tag} first a", f"{tag} first b"])
    if not ctx.replaying:
        await asyncio.sleep(delay)
    second = await ctx.llm(f"{tag} second")
    if not ctx.replaying:
        await asyncio.sleep(delay)
    return {"tag": tag, "first": list(first), "second": second}
