"""``sc``: upstream's self-consistency (package ``sc``): sample, extract, vote."""

from __future__ import annotations

from typing import Any

from ..catalog import strategy
from ..context import Context
from ..text import clean, normalise, vote
from .inputs import int_input, require_task

#: Rotated over the paths (path i takes hint i mod 7) so the samples reason differently.
DIVERSITY_HINTS = (
    "Think step by step carefully.",
    "Approach this from first principles.",
    "Consider an alternative perspective.",
    "Work backwards from the expected outcome.",
    "Break this into smaller sub-problems.",
    "Use an analogy to reason about this.",
    "Consider edge cases and exceptions first.",
)
_PATH_SYSTEM = ("You are a careful reasoner. Think through the problem thoroughly before "
                "answering.")
_EXTRACT_SYSTEM = "Extract the final answer concisely. One sentence max."
_CONSENSUS_SYSTEM = "You are a precise vote counter. Identify the majority answer. Be exact."


def _path_prompt(task: str, i: int, gen_tokens: int) -> dict[str, Any]:
    hint = DIVERSITY_HINTS[i % len(DIVERSITY_HINTS)]
    return {"prompt": f"Question: {task}\n\n{hint} Show your reasoning, then give a clear "
                      "final answer.",
            "system": _PATH_SYSTEM, "max_tokens": gen_tokens}


def _extract_prompt(task: str, reasoning: str) -> dict[str, Any]:
    # 100 tokens is coupled to "one short sentence", as upstream insists: not an input.
    return {"prompt": f"Original question: {task}\n\nReasoning:\n{reasoning}\n\n"
                      "Extract ONLY the final answer in one short sentence. No explanation.",
            "system": _EXTRACT_SYSTEM, "max_tokens": 100}


def tally(answers: list[str]) -> tuple[list[str], dict[str, int], str, str]:
    """``(votes, vote_counts, answer, answer_norm)``: each path's normalised answer, their
    counts, and the majority (ties to the first seen, as upstream's scan) shown as the
    cleaned form of the first path that voted for it ("Tokyo", not "tokyo" or "Tokyo.")."""
    votes = [normalise(a) for a in answers]
    winner, counts = vote(answers)
    return votes, counts, clean(answers[votes.index(winner)]), winner


@strategy("sc")
async def self_consistency(ctx: Context, task: str = "", n: int = 5, gen_tokens: int = 400,
                           **_: Any) -> dict[str, Any]:
    """Self-consistency: ``n`` reasoning paths with rotating diversity hints, a short answer
    extracted from each path, a consensus summary, and a deterministic majority vote over
    the extracted answers.

    Inputs: ``task`` (required), ``n`` (default 5; 1 to 64), ``gen_tokens`` (tokens per
    path, default 400). Upstream asks path, extraction, path, extraction... one after
    another; the paths are independent of each other, and so are the extractions, so here
    the n paths are one batch and the n extractions a second: the same 2n+1 questions
    (11 at the defaults) in 3 rounds instead of 11. Result: ``{consensus, answer,
    answer_norm, paths: [{reasoning, answer}], votes, vote_counts, n_sampled,
    total_llm_calls}``; the vote, not the consensus text, decides ``answer``.
    """
    task = require_task(task)
    n = int_input("n", n, 1, 64)
    gen_tokens = int_input("gen_tokens", gen_tokens, 1, 2**31 - 1)
    ctx.progress(1, 3, f"sampling {n} paths")
    reasonings = await ctx.llm_batch([_path_prompt(task, i, gen_tokens) for i in range(n)])
    ctx.progress(2, 3, f"extracting {n} answers")
    answers = await ctx.llm_batch([_extract_prompt(task, r) for r in reasonings])
    votes, counts, answer, answer_norm = tally(answers)
    ctx.log("info", f"vote: {counts[answer_norm]} of {n} for {answer_norm!r}")
    ctx.progress(3, 3, "consensus")
    listing = "".join(f"Path {i} answer: {a}\n" for i, a in enumerate(answers, 1))
    consensus = await ctx.llm(
        f"Question: {task}\n\nMultiple reasoning paths produced these answers:\n{listing}\n"
        "Group similar answers together. Which answer appears most frequently? State the "
        "majority answer and the vote count (e.g., '3 out of 5 paths agreed').",
        system=_CONSENSUS_SYSTEM, max_tokens=300,
    )
    return {
        "consensus": consensus,
        "answer": answer,
        "answer_norm": answer_norm,
        "paths": [{"reasoning": r, "answer": a}
                  for r, a in zip(reasonings, answers, strict=True)],
        "votes": votes,
        "vote_counts": counts,
        "n_sampled": n,
        "total_llm_calls": 2 * n + 1,
    }
