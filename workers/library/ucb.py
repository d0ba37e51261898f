"""``ucb``: upstream's UCB1 hypothesis exploration (package ``ucb``)."""

from __future__ import annotations

import math
from typing import Any

from ..catalog import strategy
from ..context import Context
from ..text import parse_score
from .inputs import int_input, require_task

_GEN_SYSTEM = "You are a creative problem solver. Each hypothesis must differ from others."
_SCORE_SYSTEM = "You are a critical evaluator. Just the number."
_REFINE_SYSTEM = "You are an expert refiner. Make it sharper and more actionable."
#: Upstream's ``alc.parse_score`` default: an answer with no number scores mid-scale.
NO_SCORE = 5.0


class Arm:
    """One hypothesis's scores so far: the bandit's arm."""

    def __init__(self) -> None:
        self.total = 0.0
        self.pulls = 0

    def mean(self) -> float:
        return self.total / self.pulls if self.pulls else 0.0

    def ucb1(self, total_pulls: int) -> float:
        """Mean plus the exploration bonus; an arm never pulled comes first."""
        if not self.pulls:
            return math.inf
        return self.mean() + math.sqrt(2 * math.log(total_pulls + 1) / self.pulls)


def _score(answer: str) -> float:
    score = parse_score(answer, 1.0, 10.0)
    return NO_SCORE if score is None else score


def _pick(arms: list[Arm], total_pulls: int) -> int:
    """The arm with the highest UCB1 value, the first of equals (upstream's strict scan)."""
    best, best_value = 0, -1.0
    for i, arm in enumerate(arms):
        value = arm.ucb1(total_pulls)
        if value > best_value:
            best, best_value = i, value
    return best


def _score_prompts(task: str, hypotheses: list[str]) -> list[dict[str, Any]]:
    listing = "".join(f"#{i}: {h}\n" for i, h in enumerate(hypotheses, 1))
    return [{"prompt": f"Task: {task}\n\nHypotheses:\n{listing}\nRate hypothesis #{i} (1-10) "
                       "for quality, feasibility, and originality. Reply with ONLY the number.",
             "system": _SCORE_SYSTEM, "max_tokens": 10}
            for i in range(1, len(hypotheses) + 1)]


@strategy("ucb")
async def ucb(ctx: Context, task: str = "", rounds: int = 2, n: int = 3,
              **_: Any) -> dict[str, Any]:
    """UCB1 exploration: propose ``n`` hypotheses, then for each of ``rounds`` rounds
    score every hypothesis (1-10) and refine the one with the highest UCB1 value; rank
    them by average score.

    Inputs: ``task`` (required), ``rounds`` (default 2; 0 to 20), ``n`` (default 3; 1 to
    20). Upstream asks every question one after another; the n proposals are independent,
    and so are a round's n scores, so each of those is one batch here: the same
    n + rounds * (n + 1) questions (11 at the defaults) in 1 + 2 * rounds rounds (5)
    instead of 11. A score answer without a number counts as 5. Result: ``{best,
    ranking: [{rank, hypothesis, avg_score, pulls}]}``, best average first (ties keep the
    hypotheses' order).
    """
    task = require_task(task)
    rounds = int_input("rounds", rounds, 0, 20)
    n = int_input("n", n, 1, 20)
    total = 1 + 2 * rounds
    ctx.progress(1, total, f"proposing {n} hypotheses")
    hypotheses = await ctx.llm_batch([
        {"prompt": f"Task: {task}\n\nPropose hypothesis #{i}. A distinct, specific approach. "
                   "2-3 sentences.",
         "system": _GEN_SYSTEM, "max_tokens": 200}
        for i in range(1, n + 1)
    ])
    arms = [Arm() for _h in hypotheses]
    total_pulls = 0
    for r in range(1, rounds + 1):
        ctx.progress(2 * r, total, f"scoring round {r}")
        scores = await ctx.llm_batch(_score_prompts(task, hypotheses))
        for arm, answer in zip(arms, scores, strict=True):
            arm.total += _score(answer)
            arm.pulls += 1
        total_pulls += len(arms)
        pick = _pick(arms, total_pulls)
        ctx.log("info", f"ucb: round {r} refines hypothesis #{pick + 1}")
        ctx.progress(2 * r + 1, total, f"refining #{pick + 1}")
        hypotheses[pick] = await ctx.llm(
            f"Task: {task}\n\nCurrent best hypothesis:\n{hypotheses[pick]}\n\nRefine and "
            "strengthen it. Address weaknesses. 2-3 sentences.",
            system=_REFINE_SYSTEM, max_tokens=200,
        )
    # A stable sort: equal averages keep the hypotheses' order (upstream's is unstable).
    order = sorted(range(len(arms)), key=lambda i: -arms[i].mean())
    ranking = [{"rank": rank, "hypothesis": hypotheses[i], "avg_score": arms[i].mean(),
                "pulls": arms[i].pulls} for rank, i in enumerate(order, 1)]
    return {"best": ranking[0]["hypothesis"], "ranking": ranking}
