"""``verify_select`` (workers.library.verify_select) against upstream's package: n candidates
in one batch, one rubric verifier, its verdict block read as upstream reads it."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import pytest

from coordinator import Finished, Paused, Phase, SessionRegistry
from coordinator.models import LlmQuery
from tests.library_driver import Run, drive
from workers.library.verify_select import DEFAULT_RUBRIC, parse_verdicts

VERDICT = (
    "Candidate 1 score: 6 - decent but vague\n"
    "candidate 2 score: 8.5 — precise\n"
    "Candidate 3 score: 7\n"
    "SELECTED: 3\n"
    "RATIONALE:  the clearest of the three  \n"
)


def responder(verdict: str) -> Callable[[str], str]:
    def respond(prompt: str) -> str:
        return verdict if "Score EACH candidate" in prompt else "draft"

    return respond


def generator(query: LlmQuery) -> int:
    """Which candidate generator a query is for: every candidate's prompt is the same, only
    the system text numbers them."""
    found = re.search(r"You are candidate generator #(\d+)\.", query.system or "")
    assert found, query.system
    return int(found.group(1))


async def drive_numbered(registry: SessionRegistry, inp: dict[str, Any], verdict: str) -> Run:
    """Like ``drive``, but each candidate answers ``answer <its generator number>``, which
    only the query's system text tells (hence a loop of its own over the queries)."""
    sid, event = await registry.start_execution("verify_select", inp, timeout=10)
    rounds = []
    while isinstance(event, Paused):
        rounds.append(event.queries)
        for q in event.queries:
            answer = verdict if "Score EACH candidate" in q.prompt else f"answer {generator(q)}"
            event = await registry.feed_response(sid, q.id, answer, timeout=10)
    return Run(sid, rounds, event)


async def test_verify_select_batches_candidates_then_verifies_once(
    registry: SessionRegistry, worker: Any
) -> None:
    run = await drive_numbered(registry, {"task": "Name a prime"}, VERDICT)
    assert run.shape() == [3, 1]
    gen, (verify,) = run.rounds
    assert [q.prompt for q in gen] == ["Task: Name a prime\n\nProvide your best, complete "
                                       "response."] * 3
    assert [generator(q) for q in gen] == [1, 2, 3]
    assert all("distinctive approach" in (q.system or "") and q.max_tokens == 400
               for q in gen)
    assert verify.prompt == (
        "Task: Name a prime\n\nCandidates:\n[Candidate 1]\nanswer 1\n\n[Candidate 2]\n"
        "answer 2\n\n[Candidate 3]\nanswer 3\n\n"
        f"Rubric (selection criteria):\n{DEFAULT_RUBRIC}\n\n"
        "Score EACH candidate from 0 to 10 against the rubric, then select the single best "
        "candidate.\nOutput EXACTLY this format (one score line per candidate):\n"
        "Candidate <i> score: <0-10> - <one-line verdict>\nSELECTED: <candidate number>\n"
        "RATIONALE: <why the selected candidate wins under the rubric>")
    assert verify.max_tokens == 400
    assert verify.system is not None and "rigorous verifier" in verify.system
    assert run.result == {
        "selected": "answer 3",
        "candidates": 3,
        "verdicts": [
            {"index": 1, "score": 6, "verdict": "decent but vague"},
            {"index": 2, "score": 8.5, "verdict": "— precise"},
            {"index": 3, "score": 7, "verdict": ""},
        ],
        "rationale": "the clearest of the three",
    }


async def test_verify_select_without_selected_takes_the_first_best_score(
    registry: SessionRegistry, worker: Any
) -> None:
    verdict = "Candidate 1 score: 4 - meh\nCandidate 2 score: 9 - good\n" \
              "Candidate 3 score: 9 - as good\nSELECTED: 7\nno rationale line"
    run = await drive_numbered(registry, {"task": "t"}, verdict)
    assert run.result["selected"] == "answer 2"  # 7 names no candidate
    assert run.result["rationale"] == verdict  # the whole verdict, trimmed


async def test_verify_select_with_an_unreadable_verdict_takes_candidate_one(
    registry: SessionRegistry, worker: Any
) -> None:
    run = await drive_numbered(registry, {"task": "t", "n": 2}, "  I like them all.\n")
    assert run.shape() == [2, 1]
    assert run.result == {
        "selected": "answer 1", "candidates": 2,
        "verdicts": [{"index": 1, "score": 0, "verdict": ""},
                     {"index": 2, "score": 0, "verdict": ""}],
        "rationale": "I like them all.",
    }


async def test_verify_select_rubric_and_token_limit_reach_the_questions(
    registry: SessionRegistry, worker: Any
) -> None:
    run = await drive(registry, "verify_select",
                      {"task": "t", "n": 1, "rubric": "Brevity only.", "gen_tokens": 80},
                      responder(VERDICT))
    assert run.shape() == [1, 1]
    assert run.rounds[0][0].max_tokens == 80
    assert "Rubric (selection criteria):\nBrevity only.\n\n" in run.rounds[1][0].prompt
    # SELECTED: 3 names no candidate of one; the best score of those there is candidate 1
    assert run.result["selected"] == "draft"
    assert run.result["verdicts"] == [{"index": 1, "score": 6, "verdict": "decent but vague"}]


def test_parse_verdicts_reads_lines_as_upstream() -> None:
    parsed, selected, rationale = parse_verdicts(
        "Candidate 2 score: 1.2.3 - broken number\nCandidate 1 score: 5\n"
        "Candidate 1 score: 9 - later line wins\nSELECTED: 2\nSELECTED: 1\nRATIONALE: a\n"
        "RATIONALE: b")
    assert parsed == {1: (9, "later line wins"), 2: (None, "broken number")}
    assert (selected, rationale) == (1, "b")


@pytest.mark.parametrize(("inp", "words"), [
    ({"task": ""}, "needs input {'task'"),
    ({"task": "t", "n": 0}, "n must be an integer from 1 to 64"),
    ({"task": "t", "rubric": ["a"]}, "rubric must be a string"),
])
async def test_verify_select_refuses_bad_input(registry: SessionRegistry, worker: Any,
                                               inp: dict[str, Any], words: str) -> None:
    _, event = await registry.start_execution("verify_select", inp, timeout=10)
    assert isinstance(event, Finished) and event.state is Phase.FAILED
    assert event.error is not None and words in event.error, event.error
