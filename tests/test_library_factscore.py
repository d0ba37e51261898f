"""``factscore`` (workers.library.factscore) against upstream's package: atomic claims from
a numbered list, every claim checked in one batch (grounded), a precision score."""

from __future__ import annotations

from typing import Any

import pytest

from coordinator import Finished, Phase, SessionRegistry
from tests.library_driver import drive

TEXT = "Paris is the capital of France. It has 40 million people."
CLAIMS = "1. Paris is the capital of France.\n2. Paris has 40 million people.\n" \
         "3. Paris is in Europe.\n4) The Eiffel Tower is in Paris."
VERDICTS = {
    "Paris is the capital of France.": "SUPPORTED — yes\nIt is the capital.  ",
    "Paris has 40 million people.": "UNSUPPORTED\nAbout 2 million live in the city.",
    "Paris is in Europe.": "SUPPORTED",
    "The Eiffel Tower is in Paris.": "UNCERTAIN\n\nNot in the reference.",
}


def respond(prompt: str) -> str:
    if prompt.startswith("Text to analyze:"):
        return CLAIMS
    claim = prompt.split('"')[1]
    return VERDICTS[claim]


async def test_factscore_extracts_claims_checks_them_in_one_batch_and_scores(
    registry: SessionRegistry, worker: Any
) -> None:
    run = await drive(registry, "factscore", {"text": TEXT}, respond)
    assert run.shape() == [1, 4]
    extract, checks = run.rounds
    assert extract[0].prompt == (
        f'Text to analyze:\n"""\n{TEXT}\n"""\n\nDecompose this text into atomic claims. '
        "Each claim should be:\n- A single, verifiable factual statement\n"
        "- Self-contained (understandable without the original text)\n"
        "- As specific as possible (include names, dates, numbers)\n\n"
        "Output a numbered list:\n1. [atomic claim]\n2. [atomic claim]\n...")
    assert extract[0].max_tokens == 500 and not extract[0].grounded
    assert extract[0].system is not None and "precise fact-checker" in extract[0].system
    assert checks[0].prompt == (
        'Claim to verify:\n"Paris is the capital of France."\n\n'
        "Evaluate this claim's factual accuracy.\n\nAnswer with exactly one of:\n"
        "SUPPORTED — the claim is factually correct\n"
        "UNSUPPORTED — the claim is factually incorrect or misleading\n"
        "UNCERTAIN — cannot determine with confidence\n\n"
        "Then provide a one-sentence justification.")
    assert [q.prompt.split('"')[1] for q in checks] == list(VERDICTS)
    assert all(q.grounded and q.max_tokens == 200 for q in checks)
    assert all(q.system is not None and "rigorous fact-checker" in q.system for q in checks)
    assert run.result == {
        "score": 2 / 3,  # uncertain claims are left out
        "claims": [
            {"claim": "Paris is the capital of France.", "status": "supported",
             "justification": "It is the capital."},
            {"claim": "Paris has 40 million people.", "status": "unsupported",
             "justification": "About 2 million live in the city."},
            {"claim": "Paris is in Europe.", "status": "supported", "justification": ""},
            {"claim": "The Eiffel Tower is in Paris.", "status": "uncertain",
             "justification": "Not in the reference."},
        ],
        "supported": 2, "unsupported": 1, "uncertain": 1, "total": 4,
    }


async def test_factscore_shows_the_reference_context_and_its_token_limits(
    registry: SessionRegistry, worker: Any
) -> None:
    run = await drive(registry, "factscore", {"text": TEXT, "context": "Paris: 2.1M people.",
                                              "verify_tokens": 30, "extract_tokens": 90},
                      respond)
    assert run.rounds[0][0].max_tokens == 90
    assert {q.max_tokens for q in run.rounds[1]} == {30}
    assert run.rounds[1][1].prompt.startswith(
        'Claim to verify:\n"Paris has 40 million people."\n\nReference context:\n"""\n'
        'Paris: 2.1M people.\n"""\n\nEvaluate this claim')


async def test_factscore_with_no_claims_asks_once_and_scores_one(
    registry: SessionRegistry, worker: Any
) -> None:
    run = await drive(registry, "factscore", {"text": TEXT}, lambda p: "No factual claims.")
    assert run.shape() == [1]
    assert run.result == {"score": 1.0, "claims": [], "supported": 0, "unsupported": 0,
                          "uncertain": 0, "total": 0}


async def test_factscore_with_only_uncertain_claims_scores_one(
    registry: SessionRegistry, worker: Any
) -> None:
    run = await drive(registry, "factscore", {"text": TEXT},
                      lambda p: "1. a claim" if p.startswith("Text") else "UNCERTAIN\nno idea")
    assert run.shape() == [1, 1]
    assert run.result["score"] == 1.0 and run.result["uncertain"] == 1


@pytest.mark.parametrize(("inp", "words"), [
    ({"task": "a task is not the text"}, "text must be a non-empty string"),
    ({"text": TEXT, "context": 3}, "context must be a string"),
    ({"text": TEXT, "verify_tokens": 0}, "verify_tokens must be an integer"),
])
async def test_factscore_refuses_bad_input(registry: SessionRegistry, worker: Any,
                                           inp: dict[str, Any], words: str) -> None:
    _, event = await registry.start_execution("factscore", inp, timeout=10)
    assert isinstance(event, Finished) and event.state is Phase.FAILED
    assert event.error is not None and words in event.error, event.error
