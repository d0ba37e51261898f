"""``tot``: upstream algocline's ``tot`` package (beam-search Tree of Thoughts, after Yao et
al. 2023), in Python.

Upstream's algorithm, defaults, questions and result fields, asked in fewer rounds. Upstream
asks everything one question at a time: for each beam, its ``breadth`` thoughts in turn
(each is shown the ones before it, so they stay sequential), then a score for each thought.
The beams of one depth are independent of each other, and so are the scores, so here the
``i``-th thought of every beam is one batch, and every score of a depth one more batch:
``breadth + 1`` rounds per depth instead of ``2 * breadth`` per beam. At the defaults that is
13 rounds for upstream's 31 questions (upstream: 31 rounds).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..catalog import strategy
from ..context import Context
from ..text import parse_score
from .inputs import int_input, require_task

_PROPOSER = "You are a creative problem solver. Each thought must be distinct from others."
_EVALUATOR = "You are a critical evaluator of reasoning quality. Just the number."
_SYNTHESISER = "You are an expert synthesizer. Produce a thorough, well-structured answer."
#: Upstream's ``alc.parse_score`` default, for an evaluation with no number in it.
NO_SCORE = 5


@dataclass(frozen=True)
class Beam:
    path: tuple[str, ...]
    score: int | float


def _steps(path: tuple[str, ...]) -> str:
    return "".join(f"Step {i}: {step}\n" for i, step in enumerate(path, start=1))


def _propose_prompt(task: str, path: tuple[str, ...], proposed: list[str]) -> str:
    """The question for the next thought of ``path``, shown the ones ``proposed`` before."""
    number = len(proposed) + 1
    listed = "".join(f"  [Already proposed {j}]: {t}\n" for j, t in enumerate(proposed, start=1))
    if not path:
        others = (f"Other approaches already proposed:\n{listed}\n"
                  "Propose a DIFFERENT approach.\n\n") if proposed else ""
        return (f"Task: {task}\n\n{others}"
                f"Propose reasoning approach #{number}. A distinct first step toward solving "
                "this. Be specific and concrete. 1-3 sentences.")
    others = (f"Other next steps already proposed:\n{listed}\n"
              "Propose a DIFFERENT next step.\n\n") if proposed else ""
    return (f"Task: {task}\n\nReasoning so far:\n{_steps(path)}\n{others}"
            f"What is the next reasoning step? Propose idea #{number}. "
            "Be specific and concrete. 1-3 sentences.")


def _score_prompt(task: str, path: tuple[str, ...], thought: str) -> str:
    return (
        f"Task: {task}\n\n"
        f"Reasoning path so far:\n{_steps(path)}"
        f"New thought: {thought}\n\n"
        "Evaluate this reasoning direction on a 1-10 scale:\n"
        "- Is it logically sound?\n"
        "- Does it make progress toward solving the task?\n"
        "- Is it a dead end or promising?\n\n"
        "Reply with ONLY the number."
    )


def _score(answer: str) -> int | float:
    """Upstream's ``alc.parse_score``: the number in the answer, clamped to 1..10, 5 when
    there is none; a whole score stays an integer, as upstream's are."""
    value = parse_score(answer, 1, 10)
    if value is None:
        return NO_SCORE
    return int(value) if float(value).is_integer() else value


async def _propose(ctx: Context, task: str, beams: list[Beam], breadth: int) -> list[list[str]]:
    """``breadth`` thoughts for each beam: the i-th of every beam in one batch."""
    thoughts: list[list[str]] = [[] for _ in beams]
    for _ in range(breadth):
        answers = await ctx.llm_batch([
            {"prompt": _propose_prompt(task, beam.path, mine), "system": _PROPOSER,
             "max_tokens": 200}
            for beam, mine in zip(beams, thoughts, strict=True)
        ])
        for mine, answer in zip(thoughts, answers, strict=True):
            mine.append(answer)
    return thoughts


async def _expand(ctx: Context, task: str, beams: list[Beam], breadth: int) -> list[Beam]:
    """Every beam's ``breadth`` children, scored (in one batch), in upstream's order: by
    beam, then by thought."""
    thoughts = await _propose(ctx, task, beams, breadth)
    children = [(beam, thought) for beam, mine in zip(beams, thoughts, strict=True)
                for thought in mine]
    answers = await ctx.llm_batch([
        {"prompt": _score_prompt(task, beam.path, thought), "system": _EVALUATOR,
         "max_tokens": 10}
        for beam, thought in children
    ])
    return [Beam((*beam.path, thought), _score(answer))
            for (beam, thought), answer in zip(children, answers, strict=True)]


@strategy("tot")
async def tot(
    ctx: Context,
    task: str = "",
    breadth: int = 3,
    depth: int = 3,
    beam_width: int = 2,
    **_: Any,
) -> dict[str, Any]:
    """Tree of Thoughts: grow ``breadth`` scored thoughts per beam, keep the best, synthesise.

    Inputs: ``task`` (required); ``breadth`` (3 thoughts per beam per depth); ``depth`` (3);
    ``beam_width`` (2 beams kept after each depth). Each depth proposes ``breadth``
    thoughts for every beam (the i-th of all beams in one batch; each proposal is shown
    its beam's earlier ones), scores every new thought 1-10 in one batch and keeps the
    ``beam_width`` best (ties: the earlier). At the defaults: 31 questions in 13 rounds
    (upstream asks the same 31 one by one). Result: ``conclusion``, ``best_path``,
    ``best_score``, ``explored_paths`` (``rank``, ``path``, ``score`` of each kept beam)
    and ``tree_stats`` (``depth``, ``breadth``, ``beam_width``).
    """
    task = require_task(task)
    breadth = int_input("breadth", breadth, 1, 10)
    depth = int_input("depth", depth, 0, 10)
    beam_width = int_input("beam_width", beam_width, 1, 10)

    beams = [Beam((), 0)]
    for d in range(1, depth + 1):
        candidates = await _expand(ctx, task, beams, breadth)
        # sorted() is stable: equal scores keep upstream's generation order (Lua's sort
        # leaves ties in no defined order; a replay needs one).
        beams = sorted(candidates, key=lambda b: -b.score)[:beam_width]
        ctx.log("info", f"tot: depth {d}/{depth} — {len(candidates)} candidates, kept "
                        f"{len(beams)} (best score: {int(beams[0].score)})")

    best = beams[0]
    conclusion = await ctx.llm(
        f"Task: {task}\n\n"
        f"Best reasoning path (score: {int(best.score)}/10):\n{_steps(best.path)}\n"
        "Synthesize these reasoning steps into a clear, comprehensive answer.",
        system=_SYNTHESISER, max_tokens=600,
    )
    return {
        "conclusion": conclusion,
        "best_path": list(best.path),
        "best_score": best.score,
        "explored_paths": [{"rank": i, "path": list(b.path), "score": b.score}
                           for i, b in enumerate(beams, start=1)],
        "tree_stats": {"depth": depth, "breadth": breadth, "beam_width": beam_width},
    }
