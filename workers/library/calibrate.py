"""``calibrate``: upstream algocline's ``calibrate`` package (confidence-gated reasoning, after
CISC, ACL Findings 2025), in Python.

One answer with a self-assessed confidence; below the threshold it escalates: a careful
retry, or another strategy run inline with ``ctx.run`` (upstream ``require``s ``sc`` or
``panel`` and calls its ``run``), whose questions are then this session's. Questions, their
wording and limits, the confidence reading and the result fields are upstream's.
"""

from __future__ import annotations

import math
import re
from typing import Any

from coordinator.errors import InvalidInput

from ..catalog import strategy
from ..context import MAX_COUNT, Context
from .inputs import choice_input, int_input, require_task

FALLBACKS = ("ensemble", "panel", "retry")
#: The strategy each escalation runs inline (``retry`` asks its one question itself).
ESCALATES_TO = {"ensemble": "sc", "panel": "panel"}
_ASSESSOR = (
    "You are an expert. Answer the task, then honestly assess "
    "how confident you are in your answer. Be well-calibrated: "
    "use low scores when uncertain, high scores when you have "
    "strong evidence."
)
_CAREFUL = (
    "You are an expert taking extra care. "
    "Your initial attempt was uncertain — now reason more deeply."
)
# Upstream's Lua patterns: ``.`` crosses lines there (DOTALL), ``%d``/``%s`` are ASCII.
_ANSWER = re.compile(r"ANSWER:\s*(.*?)\s*CONFIDENCE:", re.DOTALL | re.ASCII)
_CONFIDENCE = re.compile(r"CONFIDENCE:\s*(.+)", re.DOTALL | re.ASCII)
_DECIMAL = re.compile(r"(\d+\.\d+)", re.ASCII)
_PERCENT = re.compile(r"(\d+)%", re.ASCII)
_FRACTION = re.compile(r"(\d+)/(\d+)", re.ASCII)


def parse_confidence(raw: str) -> float:
    """Upstream's reading of a confidence, first form found wins: a decimal in [0, 1]
    ("0.85"), a percentage ("85%"), a fraction ("8/10", capped at 1); else 0.0, so that an
    unreadable confidence escalates."""
    decimal = _DECIMAL.search(raw)
    if decimal is not None:
        value = float(decimal.group(1))
        if 0 <= value <= 1:
            return value
    percent = _PERCENT.search(raw)
    if percent is not None:
        value = float(percent.group(1))
        if value <= 100:
            return value / 100
    fraction = _FRACTION.search(raw)
    if fraction is not None:
        num, den = float(fraction.group(1)), float(fraction.group(2))
        ratio = num / den if den > 0 else math.nan  # inf/inf (absurd digits) is no ratio
        if not math.isnan(ratio):
            return min(ratio, 1.0)
    return 0.0


def _assess_prompt(task: str) -> str:
    return (
        f"Task: {task}\n\n"
        "Provide your answer, then assess your confidence.\n\n"
        "Format:\n"
        "ANSWER: [your response]\n"
        "CONFIDENCE: [0.0 to 1.0, where 1.0 = absolutely certain]"
    )


def _threshold(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) \
            or not math.isfinite(value) or not 0 <= value <= 1:
        raise InvalidInput(f"threshold must be a number from 0 to 1, got {value!r:.60}")
    return float(value)


def _options(value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise InvalidInput("fallback_opts must be an object: the inputs of the strategy "
                           "escalated to (sc's n, gen_tokens; panel's roles)")
    return value


async def _escalate(ctx: Context, fallback: str, task: str, opts: dict[str, Any],
                    gen_tokens: int) -> tuple[Any, int, Any]:
    """(answer, questions asked, the fallback's own result or None for a retry)."""
    if fallback == "retry":
        answer = await ctx.llm(
            f"Task: {task}\n\n"
            "A previous attempt had low confidence. "
            "Think more carefully. Consider edge cases. "
            "Provide a thorough, well-reasoned answer.",
            system=_CAREFUL, max_tokens=gen_tokens,
        )
        return answer, 1, None
    # The options may override the task, as upstream merges them over it.
    detail = await ctx.run(ESCALATES_TO[fallback], {"task": task, **opts})
    if fallback == "panel":
        # One question per role plus the moderator's, as upstream counts them.
        arguments = detail.get("arguments")
        return detail.get("synthesis"), len(arguments) + 1 if arguments else 0, detail
    return detail.get("consensus"), detail.get("total_llm_calls") or 0, detail


@strategy("calibrate")
async def calibrate(
    ctx: Context,
    task: str = "",
    threshold: float = 0.7,
    fallback: str = "ensemble",
    fallback_opts: dict[str, Any] | None = None,
    gen_tokens: int = 400,
    **_: Any,
) -> dict[str, Any]:
    """Answer with a confidence; below ``threshold`` escalate to ``retry``, ``panel`` or ``sc``.

    Inputs: ``task`` (required); ``threshold`` (0.7); ``fallback`` (``"ensemble"``, which
    runs ``sc``; ``"panel"``, which runs ``panel``; or ``"retry"``, one careful retry; an
    unknown name is refused, where upstream quietly ran the ensemble); ``fallback_opts``
    (inputs passed on to ``sc`` / ``panel``, over the task); ``gen_tokens`` (400). It asks
    1 question when confident; escalated, 2 in 2 rounds (retry), 5 in 5 (panel at its
    defaults) or 12 in 4 (sc at its defaults: 11 questions in 3 rounds). Records the custom metric
    ``initial_confidence``. Result: ``answer``, ``confidence`` (the first answer's),
    ``escalated``, ``strategy`` (``direct``, ``retry``, ``panel`` or ``ensemble``),
    ``fallback_detail`` (the fallback's own result, panel and ensemble only) and
    ``total_llm_calls``.
    """
    task = require_task(task)
    threshold = _threshold(threshold)
    fallback = choice_input("fallback", fallback, FALLBACKS)
    opts = _options(fallback_opts)
    gen_tokens = int_input("gen_tokens", gen_tokens, 1, MAX_COUNT)

    response = await ctx.llm(_assess_prompt(task), system=_ASSESSOR, max_tokens=gen_tokens)
    found = _ANSWER.search(response)
    answer = found.group(1) if found else response
    stated = _CONFIDENCE.search(response)
    confidence = parse_confidence(stated.group(1) if stated else "")
    ctx.metric("initial_confidence", confidence)
    ctx.log("info", f"calibrate: confidence={confidence:.2f}, threshold={threshold:.2f}")

    if confidence >= threshold:
        return {"answer": answer, "confidence": confidence, "escalated": False,
                "strategy": "direct", "total_llm_calls": 1}

    ctx.log("info", f"calibrate: escalating to {fallback}")
    better, asked, detail = await _escalate(ctx, fallback, task, opts, gen_tokens)
    result: dict[str, Any] = {"answer": better, "confidence": confidence, "escalated": True,
                              "strategy": fallback}
    if detail is not None:
        result["fallback_detail"] = detail
    result["total_llm_calls"] = 1 + asked
    return result
