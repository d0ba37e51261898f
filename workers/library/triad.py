"""``triad``: upstream algocline's ``triad`` package (adversarial debate with a judge, after
Du et al. 2023), in Python.

Its questions, their wording and limits, and its result fields are upstream's; the opening
statements were one ``alc.parallel`` batch there too, and each rebuttal answers the one
before it, so the rounds are the same (``rounds`` * 2 + 2).
"""

from __future__ import annotations

import re
from typing import Any

from ..catalog import strategy
from ..context import MAX_COUNT, Context
from .inputs import int_input, require_task

#: Upstream's ``verdict:match("WINNER:%s*(%S+)")``.
_WINNER = re.compile(r"WINNER:\s*(\S+)", re.ASCII)
_REBUT = ("Counter this argument. Identify weaknesses, logical flaws, "
          "or missing evidence. Then strengthen your own position.")
_JUDGE = (
    "You are an impartial, rigorous judge. Evaluate arguments on "
    "evidence quality, logical soundness, and rebuttal effectiveness. "
    "Do not favor either side by default. If both sides have merit, "
    "synthesize the strongest position from both."
)


def _opening(task: str, role: str, gen_tokens: int) -> dict[str, Any]:
    stance = "SUPPORT" if role == "proponent" else "OPPOSE"
    return {
        "prompt": f"Topic: {task}\n\n"
                  f"You are the {role}. Present your opening argument to {stance} this "
                  "position.\nBe specific, cite reasoning, and anticipate counterarguments.",
        "system": f"You are a skilled debater assigned the {role} role. "
                  "Argue persuasively for your assigned position. "
                  "Use evidence and logical reasoning.",
        "max_tokens": gen_tokens,
    }


async def _rebut(ctx: Context, task: str, role: str, other: str, argument: str,
                 gen_tokens: int) -> str:
    """``role`` answers ``other``'s latest ``argument``."""
    return await ctx.llm(
        f"Topic: {task}\n\n{other.capitalize()}'s latest argument:\n{argument}\n\n{_REBUT}",
        system=f"You are the {role}. Dismantle the {other}'s argument and reinforce your "
               "position. Be precise about which claims are weak and why.",
        max_tokens=gen_tokens,
    )


def _judge_prompt(task: str, transcript: list[dict[str, Any]]) -> str:
    debate = "".join(
        f"--- {'Opening' if e['round'] == 0 else 'Round ' + str(e['round'])} ---\n"
        f"PROPONENT: {e['proponent']}\n\nOPPONENT: {e['opponent']}\n\n"
        for e in transcript
    )
    return (
        f"Topic: {task}\n\n"
        f"Full debate transcript:\n\n{debate}\n"
        "As the impartial judge, evaluate:\n"
        "1. Which side presented stronger evidence?\n"
        "2. Which side had better logical reasoning?\n"
        "3. Which side effectively rebutted the other?\n\n"
        "Deliver your verdict:\n"
        "WINNER: [proponent|opponent|draw]\n"
        "REASONING: [detailed explanation]\n"
        "SYNTHESIS: [balanced conclusion incorporating valid points from both sides]"
    )


@strategy("triad")
async def triad(
    ctx: Context,
    task: str = "",
    rounds: int = 3,
    gen_tokens: int = 400,
    judge_tokens: int = 500,
    **_: Any,
) -> dict[str, Any]:
    """Debate: a proponent and an opponent open, rebut each other ``rounds`` times, a judge rules.

    Inputs: ``task`` (required: the question or claim); ``rounds`` (3 rebuttal rounds after
    the openings); ``gen_tokens`` (400, per argument); ``judge_tokens`` (500). At the
    defaults: 9 questions in 8 rounds (the two openings in one batch, then each rebuttal
    in turn, then the verdict). Result: ``verdict`` (the judge's text), ``winner`` (the
    word after ``WINNER:``, lower-cased: proponent, opponent, draw, or unknown),
    ``transcript`` (``round`` 0 for the openings, then 1.., with ``proponent`` and
    ``opponent``) and ``total_rounds``.
    """
    task = require_task(task)
    rounds = int_input("rounds", rounds, 0, 20)
    gen_tokens = int_input("gen_tokens", gen_tokens, 1, MAX_COUNT)
    judge_tokens = int_input("judge_tokens", judge_tokens, 1, MAX_COUNT)

    pro, opp = await ctx.llm_batch([_opening(task, role, gen_tokens)
                                    for role in ("proponent", "opponent")])
    transcript: list[dict[str, Any]] = [{"round": 0, "proponent": pro, "opponent": opp}]
    for r in range(1, rounds + 1):
        pro = await _rebut(ctx, task, "proponent", "opponent", opp, gen_tokens)
        opp = await _rebut(ctx, task, "opponent", "proponent", pro, gen_tokens)
        transcript.append({"round": r, "proponent": pro, "opponent": opp})
        ctx.log("info", f"triad: round {r}/{rounds} complete")

    verdict = await ctx.llm(_judge_prompt(task, transcript), system=_JUDGE,
                            max_tokens=judge_tokens)
    found = _WINNER.search(verdict)
    return {
        "verdict": verdict,
        "winner": found.group(1).lower() if found else "unknown",
        "transcript": transcript,
        "total_rounds": rounds,
    }
