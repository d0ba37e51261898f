"""``cove`` (workers.library.cove) against upstream's package: a draft, a plan of
verification questions, each answered without the draft (one batch here, grounded), then
a revision by the answers."""

from __future__ import annotations

from typing import Any

from coordinator import Finished, Phase, SessionRegistry
from tests.library_driver import drive
from workers.library.cove import parse_questions

PLAN = ("Here are the questions:\n"
        "1. When was the Eiffel Tower completed?\n"
        "2) How tall is the Eiffel Tower today?\n"
        "3 Short?\n"  # 6 characters: a stray label, not a question
        "- Who designed the Eiffel Tower's structure?\n"
        "* What material is the Eiffel Tower made of?\n")
QUESTIONS = ["When was the Eiffel Tower completed?", "How tall is the Eiffel Tower today?",
             "Who designed the Eiffel Tower's structure?",
             "What material is the Eiffel Tower made of?"]


def respond(prompt: str) -> str:
    if prompt.startswith("Answer the following thoroughly:"):
        return "It was finished in 1887 by Eiffel."
    if "Generate exactly" in prompt:
        return PLAN
    if prompt.startswith("Answer this question accurately and concisely:"):
        return "answer to " + prompt.rsplit("\n", 1)[1]
    assert "Revise the draft answer based on the verification results." in prompt, prompt
    return "It was finished in 1889."


async def test_cove_drafts_plans_verifies_in_one_batch_and_revises(
    registry: SessionRegistry, worker: Any
) -> None:
    run = await drive(registry, "cove", {"task": "Tell me about the Eiffel Tower."}, respond)
    assert run.shape() == [1, 1, 3, 1]  # n_questions=3: 6 questions in 4 rounds
    (draft,), (plan,), checks, (final,) = run.rounds
    assert draft.prompt == "Answer the following thoroughly:\n\nTell me about the Eiffel Tower."
    assert draft.max_tokens == 500
    assert plan.prompt.startswith("Original question: Tell me about the Eiffel Tower.\n\n"
                                  "Draft answer:\nIt was finished in 1887 by Eiffel.\n\n"
                                  "Generate exactly 3 verification questions")
    assert plan.max_tokens == 300
    assert [q.prompt for q in checks] == [
        f"Answer this question accurately and concisely:\n\n{q}" for q in QUESTIONS[:3]]
    assert all(q.grounded and q.max_tokens == 200 for q in checks)
    assert all("1887" not in q.prompt for q in checks)  # independent of the draft
    assert ("Verification results:\n"
            f"Q1: {QUESTIONS[0]}\nA1: answer to {QUESTIONS[0]}\n\n"
            f"Q2: {QUESTIONS[1]}\nA2: answer to {QUESTIONS[1]}\n\n"
            f"Q3: {QUESTIONS[2]}\nA3: answer to {QUESTIONS[2]}\n\n\n"
            "Revise the draft answer") in final.prompt
    assert final.max_tokens == 600 and "[unverified]" in final.prompt
    assert run.result == {
        "draft": "It was finished in 1887 by Eiffel.",
        "verifications": [{"question": q, "answer": f"answer to {q}"} for q in QUESTIONS[:3]],
        "final_response": "It was finished in 1889.",
    }


async def test_cove_asks_no_batch_when_the_plan_has_no_question(
    registry: SessionRegistry, worker: Any
) -> None:
    def vague(prompt: str) -> str:
        return "I cannot think of any." if "Generate exactly" in prompt else respond(prompt)

    run = await drive(registry, "cove", {"task": "t", "n_questions": 5}, vague)
    assert run.shape() == [1, 1, 1]
    assert "Generate exactly 5 verification questions" in run.rounds[1][0].prompt
    assert run.result["verifications"] == []
    assert "Verification results:\n\nRevise" in run.rounds[2][0].prompt


def test_parse_questions_reads_numbered_and_bulleted_lines_as_upstream() -> None:
    assert parse_questions(PLAN) == QUESTIONS
    assert parse_questions(" 1. an indented question line") == []  # Lua's ^ anchors
    assert parse_questions("12)   Is 12 a valid question?") == ["Is 12 a valid question?"]
    assert parse_questions("1. \u00e9\u00e9\u00e9\u00e9\u00e9\u00e9") == ["\u00e9" * 6]  # 12 bytes


async def test_cove_refuses_bad_inputs(registry: SessionRegistry, worker: Any) -> None:
    for inp, words in (({}, "needs input {'task'"),
                       ({"task": "t", "n_questions": 0}, "n_questions must be an integer")):
        _, event = await registry.start_execution("cove", inp, timeout=10)
        assert isinstance(event, Finished) and event.state is Phase.FAILED, inp
        assert event.error is not None and words in event.error, event.error
