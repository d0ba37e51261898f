"""``verify_select``: upstream algocline's ``verify_select`` package (generate-then-verify
best-of-N), in Python.

Its questions, their wording and limits, its reading of the verifier's verdict block and its
result fields are upstream's; upstream already asks its candidates in one batch, so the
rounds are the same (two).
"""

from __future__ import annotations

import math
import re
from typing import Any

from coordinator.errors import InvalidInput

from ..catalog import strategy
from ..context import MAX_COUNT, Context
from .decompose import LUA_SPACE
from .inputs import int_input, require_task

#: The rubric when the host gives none (upstream's, word for word).
DEFAULT_RUBRIC = (
    "Correctness and factual accuracy; completeness of the answer; "
    "clarity and directness; absence of unsupported or fabricated claims."
)
_VERIFIER = (
    "You are a rigorous verifier. Judge strictly against the "
    "provided rubric. Be exact and follow the output format."
)
# Upstream's Lua patterns, with ASCII classes as Lua's.
_SCORE_LINE = re.compile(r"[Cc]andidate\s+(\d+)\s+score:\s*([\d.]+)", re.ASCII)
_VERDICT_TEXT = re.compile(r"score:\s*[\d.]+\s*-?\s*(.*)$", re.ASCII)
_SELECTED = re.compile(r"SELECTED:\s*(\d+)", re.ASCII)
_RATIONALE = re.compile(r"RATIONALE:\s*(.+)", re.ASCII)


def _generator(i: int) -> str:
    return (
        f"You are candidate generator #{i}. Produce a high-quality, "
        "self-contained answer. Take a distinctive approach so that "
        "candidates differ from one another."
    )


def _verify_prompt(task: str, candidates: list[str], rubric: str) -> str:
    listing = "".join(f"[Candidate {i}]\n{c}\n\n" for i, c in enumerate(candidates, start=1))
    return (
        f"Task: {task}\n\n"
        f"Candidates:\n{listing}"
        f"Rubric (selection criteria):\n{rubric}\n\n"
        "Score EACH candidate from 0 to 10 against the rubric, then select "
        "the single best candidate.\n"
        "Output EXACTLY this format (one score line per candidate):\n"
        "Candidate <i> score: <0-10> - <one-line verdict>\n"
        "SELECTED: <candidate number>\n"
        "RATIONALE: <why the selected candidate wins under the rubric>"
    )


def _lua_number(text: str) -> int | float | None:
    """Lua's ``tonumber`` of ``[%d%.]+``: "7" is an integer, "7.5" and "7." floats, "1.2.3"
    nothing (the score then counts as 0, as upstream). An integer past 2**53 stays a float
    here (Lua keeps 64 bits), and one too large for a float counts as nothing: the result
    must stay JSON, and real scores are 0 to 10."""
    try:
        value = float(text)
    except ValueError:
        return None
    if not math.isfinite(value):
        return None
    return int(value) if "." not in text and value <= 2**53 else value


def parse_verdicts(
    text: str,
) -> tuple[dict[int, tuple[int | float | None, str]], int | None, str | None]:
    """Candidate number -> (score, one-line verdict), the SELECTED number and the RATIONALE
    line, as upstream reads the verifier: line by line, later lines winning."""
    parsed: dict[int, tuple[int | float | None, str]] = {}
    selected: int | None = None
    rationale: str | None = None
    for line in text.split("\n"):
        score = _SCORE_LINE.search(line)
        if score is not None:
            verdict = _VERDICT_TEXT.search(line)
            parsed[int(score.group(1))] = (_lua_number(score.group(2)),
                                           verdict.group(1).strip(LUA_SPACE) if verdict else "")
            continue
        sel = _SELECTED.search(line)
        if sel is not None:
            selected = int(sel.group(1))
        rat = _RATIONALE.search(line)
        if rat is not None:
            rationale = rat.group(1).strip(LUA_SPACE)
    return parsed, selected, rationale


def _choice(verdicts: list[dict[str, Any]], selected: int | None) -> int:
    """The verifier's SELECTED candidate when it names one; else the first of the highest
    scores (candidate 1 when none scored), as upstream."""
    if selected is not None and 1 <= selected <= len(verdicts):
        return selected
    best, best_score = 1, -math.inf
    for v in verdicts:
        if v["score"] > best_score:
            best, best_score = v["index"], v["score"]
    return best


@strategy("verify_select")
async def verify_select(
    ctx: Context,
    task: str = "",
    n: int = 3,
    rubric: str | None = None,
    gen_tokens: int = 400,
    **_: Any,
) -> dict[str, Any]:
    """Best of N: ``n`` candidate answers in one batch, then one verifier scores and picks.

    Inputs: ``task`` (required); ``n`` (3 candidates); ``rubric`` (upstream's accuracy /
    completeness / clarity rubric when not given); ``gen_tokens`` (400, per candidate).
    At the defaults: 4 questions in 2 rounds. The verifier answers one line per candidate
    ``Candidate <i> score: <0-10> - <verdict>``, then ``SELECTED: <i>`` and
    ``RATIONALE: ...``; without a valid SELECTED the highest score wins. Result:
    ``selected`` (the winning text), ``candidates`` (how many), ``verdicts`` (``index``,
    ``score``, ``verdict`` per candidate) and ``rationale``.
    """
    task = require_task(task)
    n = int_input("n", n, 1, 64)
    gen_tokens = int_input("gen_tokens", gen_tokens, 1, MAX_COUNT)
    if rubric is None:
        rubric = DEFAULT_RUBRIC
    elif not isinstance(rubric, str):
        raise InvalidInput("rubric must be a string (the selection criteria) when given")

    candidates = await ctx.llm_batch([
        {"prompt": f"Task: {task}\n\nProvide your best, complete response.",
         "system": _generator(i), "max_tokens": gen_tokens}
        for i in range(1, n + 1)
    ])
    ctx.log("info", f"verify_select: {len(candidates)} candidates generated, verifying")
    out = await ctx.llm(_verify_prompt(task, candidates, rubric), system=_VERIFIER,
                        max_tokens=400)

    parsed, selected, rationale = parse_verdicts(out)
    verdicts = []
    for i in range(1, len(candidates) + 1):
        score, verdict = parsed.get(i, (None, ""))
        verdicts.append({"index": i, "score": 0 if score is None else score,
                         "verdict": verdict})
    return {
        "selected": candidates[_choice(verdicts, selected) - 1],
        "candidates": len(candidates),
        "verdicts": verdicts,
        "rationale": rationale if rationale is not None else out.strip(LUA_SPACE),
    }
