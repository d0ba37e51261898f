"""``factscore``: upstream algocline's ``factscore`` package (FActScore, Min et al. 2023), in
Python: atomic claims, each verified on its own, and a factual precision score.

Its questions, their wording and limits, and its result fields are upstream's; the claim
checks were one ``alc.parallel`` batch there too, so the rounds are the same (two).
"""

from __future__ import annotations

import re
from typing import Any

from coordinator.errors import InvalidInput

from ..catalog import strategy
from ..context import MAX_COUNT, Context
from .decompose import LUA_SPACE, numbered_items
from .inputs import int_input, text_input

_EXTRACTOR = (
    "You are a precise fact-checker. Decompose text into the smallest "
    "possible factual units. Each claim should be independently verifiable. "
    "Do not merge multiple facts into one claim. Do not include opinions "
    "or subjective statements — only factual claims."
)
_CHECKER = (
    "You are a rigorous fact-checker. Evaluate claims strictly. "
    "Only mark SUPPORTED if you are confident the claim is accurate. "
    "Mark UNCERTAIN if you lack sufficient knowledge to verify."
)
#: Upstream's ``verdict:match("\n(.+)")``: everything after the first line (Lua's ``.``
#: crosses lines).
_AFTER_FIRST_LINE = re.compile(r"\n(.+)", re.DOTALL)


def _extract_prompt(text: str) -> str:
    return (
        f'Text to analyze:\n"""\n{text}\n"""\n\n'
        "Decompose this text into atomic claims. Each claim should be:\n"
        "- A single, verifiable factual statement\n"
        "- Self-contained (understandable without the original text)\n"
        "- As specific as possible (include names, dates, numbers)\n\n"
        "Output a numbered list:\n"
        "1. [atomic claim]\n2. [atomic claim]\n..."
    )


def _verify_prompt(claim: str, context: str | None) -> str:
    block = "" if context is None else f'\n\nReference context:\n"""\n{context}\n"""'
    return (
        f'Claim to verify:\n"{claim}"{block}\n\n'
        "Evaluate this claim's factual accuracy.\n\n"
        "Answer with exactly one of:\n"
        "SUPPORTED — the claim is factually correct\n"
        "UNSUPPORTED — the claim is factually incorrect or misleading\n"
        "UNCERTAIN — cannot determine with confidence\n\n"
        "Then provide a one-sentence justification."
    )


def _status(verdict: str) -> str:
    """UNSUPPORTED is looked for first (it contains SUPPORTED); no keyword reads as
    supported, as upstream."""
    if "UNSUPPORTED" in verdict:
        return "unsupported"
    if "UNCERTAIN" in verdict:
        return "uncertain"
    return "supported"


def _justification(verdict: str) -> str:
    found = _AFTER_FIRST_LINE.search(verdict)
    return found.group(1).strip(LUA_SPACE) if found else ""


def _scored(claims: list[str], verdicts: list[str]) -> dict[str, Any]:
    records = [{"claim": claim, "status": _status(verdict),
                "justification": _justification(verdict)}
               for claim, verdict in zip(claims, verdicts, strict=True)]
    counts = {s: sum(r["status"] == s for r in records)
              for s in ("supported", "unsupported", "uncertain")}
    decisive = counts["supported"] + counts["unsupported"]
    # Uncertain claims are left out of the precision, as upstream.
    score = counts["supported"] / decisive if decisive else 1.0
    return {"score": score, "claims": records, **counts, "total": len(claims)}


@strategy("factscore")
async def factscore(
    ctx: Context,
    text: str = "",
    context: str | None = None,
    verify_tokens: int = 200,
    extract_tokens: int = 500,
    **_: Any,
) -> dict[str, Any]:
    """Fact-check a text: split it into atomic claims, verify each in one batch, score it.

    Inputs: ``text`` (required: the text to check, as upstream; not ``task``); ``context``
    (none: reference text the checks are shown); ``verify_tokens`` (200, per claim);
    ``extract_tokens`` (500). With k claims it asks 1 + k questions in 2 rounds (one when
    no claim is found). Result: ``score`` (supported / (supported + unsupported), 1.0 with
    none decisive), ``claims`` (``claim``, ``status``, ``justification`` each),
    ``supported``, ``unsupported``, ``uncertain``, ``total``.
    """
    text = text_input("text", text)
    if context is not None and not isinstance(context, str):
        raise InvalidInput("context must be a string (reference text) when given")
    verify_tokens = int_input("verify_tokens", verify_tokens, 1, MAX_COUNT)
    extract_tokens = int_input("extract_tokens", extract_tokens, 1, MAX_COUNT)

    extraction = await ctx.llm(_extract_prompt(text), system=_EXTRACTOR,
                               max_tokens=extract_tokens)
    claims = numbered_items(extraction)
    if not claims:
        return _scored([], [])
    ctx.log("info", f"factscore: {len(claims)} atomic claims extracted")

    verdicts = await ctx.llm_batch([
        {"prompt": _verify_prompt(claim, context), "system": _CHECKER,
         "max_tokens": verify_tokens, "grounded": True}
        for claim in claims
    ])
    result = _scored(claims, verdicts)
    ctx.log("info", f"factscore: {result['score']:.2f} ({result['supported']} supported, "
                    f"{result['unsupported']} unsupported, {result['uncertain']} uncertain)")
    return result
