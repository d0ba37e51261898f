"""``cove``: upstream's Chain-of-Verification (package ``cove``)."""

from __future__ import annotations

import re
from typing import Any

from ..catalog import strategy
from ..context import Context
from .inputs import int_input, require_task

_DRAFT_SYSTEM = "You are a knowledgeable assistant. Provide a detailed, informative answer."
_PLAN_SYSTEM = "You are a fact-checker. Generate precise, targeted verification questions."
_CHECK_SYSTEM = ("You are a fact-checker. Answer based on what you know. If uncertain, say "
                 "so. Do not fabricate.")
_EDIT_SYSTEM = ("You are a meticulous editor. Correct factual errors found by verification. "
                "Preserve accurate information. Be transparent about uncertainty.")
# "1. q", "2) q", "3 q" or "- q", "* q", at the very start of a line, as upstream reads them.
# ASCII digits and whitespace only, as Lua's %d and %s.
_NUMBERED = re.compile(r"^[0-9]+[.) \t\r\f\v]+(.+)")
_BULLET = re.compile(r"^[-*][ \t\r\f\v]*(.+)")


def parse_questions(text: str) -> list[str]:
    """The numbered or bulleted lines of the planner's answer, longer than 10 bytes of
    UTF-8 as upstream counts (shorter ones are stray labels, not questions)."""
    questions = []
    for line in text.split("\n"):
        found = _NUMBERED.match(line) or _BULLET.match(line)
        if found and len(found.group(1).encode()) > 10:
            questions.append(found.group(1))
    return questions


@strategy("cove")
async def cove(ctx: Context, task: str = "", n_questions: int = 3, **_: Any) -> dict[str, Any]:
    """Chain-of-Verification: draft an answer, plan ``n_questions`` questions that check
    its claims, answer each without the draft in view, then revise the draft by them.

    Inputs: ``task`` (required), ``n_questions`` (default 3; 1 to 20). Upstream answers the
    verification questions one after another; they are independent (none sees the draft
    or another's answer), so here they are one batch of grounded questions: n+3 questions
    (6 at the defaults) in 4 rounds instead of 6, or 3 rounds when the plan holds no
    usable question. Result: ``{draft, verifications: [{question, answer}],
    final_response}``; ``verifications`` may be shorter than ``n_questions``.
    """
    task = require_task(task)
    n_questions = int_input("n_questions", n_questions, 1, 20)
    ctx.progress(1, 4, "draft")
    draft = await ctx.llm(f"Answer the following thoroughly:\n\n{task}",
                          system=_DRAFT_SYSTEM, max_tokens=500)
    ctx.progress(2, 4, "planning verification questions")
    plan = await ctx.llm(
        f"Original question: {task}\n\nDraft answer:\n{draft}\n\n"
        f"Generate exactly {n_questions} verification questions that would help fact-check "
        "the specific claims in the draft answer. Each question should target a different "
        "factual claim. Format: one question per line, numbered.",
        system=_PLAN_SYSTEM, max_tokens=300,
    )
    questions = parse_questions(plan)[:n_questions]
    ctx.log("info", f"cove: {len(questions)} verification question(s) planned")
    ctx.progress(3, 4, f"verifying {len(questions)} claim(s)")
    answers = await ctx.llm_batch([
        {"prompt": f"Answer this question accurately and concisely:\n\n{q}",
         "system": _CHECK_SYSTEM, "max_tokens": 200, "grounded": True}
        for q in questions
    ]) if questions else []
    summary = "".join(f"Q{i}: {q}\nA{i}: {a}\n\n"
                      for i, (q, a) in enumerate(zip(questions, answers, strict=True), 1))
    ctx.progress(4, 4, "revising")
    final = await ctx.llm(
        f"Original question: {task}\n\nDraft answer:\n{draft}\n\n"
        f"Verification results:\n{summary}\n"
        "Revise the draft answer based on the verification results. Correct any "
        "inaccuracies found. If the draft was accurate, keep it. Mark any claims you could "
        "not verify with [unverified].",
        system=_EDIT_SYSTEM, max_tokens=600,
    )
    return {"draft": draft,
            "verifications": [{"question": q, "answer": a}
                              for q, a in zip(questions, answers, strict=True)],
            "final_response": final}
