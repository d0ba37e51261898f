"""The benchmark's workload, as strategies: K questions in sequence, or K rounds of batches."""

from __future__ import annotations

from typing import Any

from workers import Context, strategy


@strategy("bench-seq")
async def seq(ctx: Context, k: int = 10, prompt_chars: int = 20, **_: Any) -> int:
    prompt = "p" * prompt_chars
    for _i in range(k):
        await ctx.llm(prompt)
    return k


@strategy("bench-batch")
async def batch(ctx: Context, k: int = 10, width: int = 4, **_: Any) -> int:
    for _i in range(k):
        await ctx.llm_batch(["p"] * width)
    return k * width
