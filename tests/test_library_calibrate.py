"""``calibrate`` (workers.library.calibrate) against upstream's package: one answer with a
confidence; at or above the threshold that is all, below it an escalation: a retry, or ``sc``
or ``panel`` run inline with ``ctx.run`` (their questions become this session's rounds)."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import pytest

from coordinator import Finished, Phase, SessionRegistry
from tests.conftest import FakeCluster
from tests.library_driver import drive, resume
from workers.library.calibrate import parse_confidence

#: Every test here also runs on a real redis-server (escalation is composition).
ON_BOTH_SERVERS = True

TASK = "What is 17 * 3?"
ASSESS = (f"Task: {TASK}\n\nProvide your answer, then assess your confidence.\n\nFormat:\n"
          "ANSWER: [your response]\nCONFIDENCE: [0.0 to 1.0, where 1.0 = absolutely certain]")


def responder(assessment: str) -> Callable[[str], str]:
    """The first answer is ``assessment``; the escalations' questions get answers that name
    what was asked, so the result shows which answer went where."""
    def respond(prompt: str) -> str:
        if prompt == ASSESS:
            return assessment
        if "A previous attempt had low confidence" in prompt:
            return "51, checked twice"
        if prompt.startswith("Question: ") and "Show your reasoning" in prompt:  # sc path
            return "17 * 3 = 51"
        if prompt.startswith("Original question:"):  # sc extraction
            return "51."
        if "Group similar answers together" in prompt:  # sc consensus
            return f"51 ({prompt.count('answer: 51')} paths agreed)"
        role = re.search(r"As a (\w+), ", prompt)  # a panel speaker
        if role:
            return f"{role.group(1)} says 51"
        assert prompt.endswith("3-4 sentences."), prompt  # the panel's moderator
        return "the panel agrees on 51"

    return respond


async def test_confident_answer_is_taken_with_one_question(
    registry: SessionRegistry, worker: Any
) -> None:
    run = await drive(registry, "calibrate", {"task": TASK},
                      responder("ANSWER: 51\n\nCONFIDENCE: 0.9 (simple arithmetic)"))
    assert run.shape() == [1]
    (q,) = run.rounds[0]
    assert q.prompt == ASSESS and q.max_tokens == 400
    assert q.system is not None and "Be well-calibrated" in q.system
    assert run.result == {"answer": "51", "confidence": 0.9, "escalated": False,
                          "strategy": "direct", "total_llm_calls": 1}
    assert run.end.to_json(run.session_id)["stats"]["custom"] == {"initial_confidence": 0.9}


async def test_confidence_at_the_threshold_is_enough(registry: SessionRegistry,
                                                    worker: Any) -> None:
    run = await drive(registry, "calibrate", {"task": TASK, "threshold": 0.8},
                      responder("ANSWER: 51 CONFIDENCE: 8/10"))
    assert run.shape() == [1]
    assert run.result["strategy"] == "direct" and run.result["confidence"] == 0.8


async def test_low_confidence_retries_with_care(registry: SessionRegistry,
                                                worker: Any) -> None:
    run = await drive(registry, "calibrate",
                      {"task": TASK, "fallback": "retry", "gen_tokens": 120},
                      responder("ANSWER: about 50\nCONFIDENCE: 55%"))
    assert run.shape() == [1, 1]
    (retry,) = run.rounds[1]
    assert retry.prompt == (f"Task: {TASK}\n\nA previous attempt had low confidence. Think "
                            "more carefully. Consider edge cases. Provide a thorough, "
                            "well-reasoned answer.")
    assert retry.max_tokens == 120 and run.rounds[0][0].max_tokens == 120
    assert retry.system is not None and "now reason more deeply" in retry.system
    assert run.result == {"answer": "51, checked twice", "confidence": 0.55,
                          "escalated": True, "strategy": "retry", "total_llm_calls": 2}
    status = await registry.status(run.session_id)
    logs = [e["message"] for e in status["metrics"]["recent_logs"]]
    assert logs == ["calibrate: confidence=0.55, threshold=0.70",
                    "calibrate: escalating to retry"]


SC_DETAIL_PATHS = [{"reasoning": "17 * 3 = 51", "answer": "51."}] * 5


async def test_low_confidence_escalates_to_an_sc_ensemble_by_default(
    registry: SessionRegistry, worker: Any
) -> None:
    run = await drive(registry, "calibrate", {"task": TASK},
                      responder("I think 51 but am unsure."))  # no confidence: 0.0
    assert run.shape() == [1, 5, 5, 1]  # sc at its defaults: paths, extractions, consensus
    paths = run.prompts()[1]
    assert paths[0] == (f"Question: {TASK}\n\nThink step by step carefully. Show your "
                        "reasoning, then give a clear final answer.")
    assert all(p.startswith(f"Question: {TASK}\n\n") for p in paths)
    assert run.result == {
        "answer": "51 (5 paths agreed)",
        "confidence": 0.0,
        "escalated": True,
        "strategy": "ensemble",
        "fallback_detail": {
            "consensus": "51 (5 paths agreed)", "answer": "51", "answer_norm": "51",
            "paths": SC_DETAIL_PATHS, "votes": ["51"] * 5, "vote_counts": {"51": 5},
            "n_sampled": 5, "total_llm_calls": 11,
        },
        "total_llm_calls": 12,
    }


async def test_fallback_opts_reach_the_escalated_strategy(registry: SessionRegistry,
                                                          worker: Any) -> None:
    run = await drive(registry, "calibrate",
                      {"task": TASK, "fallback_opts": {"n": 2, "gen_tokens": 64}},
                      responder("ANSWER: 51\nCONFIDENCE: 0.2"))
    assert run.shape() == [1, 2, 2, 1]
    assert {q.max_tokens for q in run.rounds[1]} == {64}
    assert run.result["total_llm_calls"] == 6
    assert run.result["fallback_detail"]["n_sampled"] == 2


async def test_low_confidence_escalates_to_a_panel(registry: SessionRegistry,
                                                   worker: Any) -> None:
    run = await drive(registry, "calibrate", {"task": TASK, "fallback": "panel"},
                      responder("ANSWER: 51\nCONFIDENCE: 3/10"))
    assert run.shape() == [1, 1, 1, 1, 1]  # the three roles speak in turn, then the moderator
    assert run.prompts()[1] == [f"Topic: {TASK}\n\nAs a advocate, present your initial "
                                "position. 2-3 sentences."]
    arguments = [{"role": r, "text": f"{r} says 51"}
                 for r in ("advocate", "critic", "pragmatist")]
    assert run.result == {
        "answer": "the panel agrees on 51",
        "confidence": 0.3,
        "escalated": True,
        "strategy": "panel",
        "fallback_detail": {"arguments": arguments, "synthesis": "the panel agrees on 51"},
        "total_llm_calls": 5,
    }


async def test_an_escalated_session_replays_on_another_worker(
    fake_cluster: FakeCluster, registry: SessionRegistry
) -> None:
    respond = responder("ANSWER: 51\nCONFIDENCE: 0.1")
    first = await fake_cluster.worker()
    part = await drive(registry, "calibrate", {"task": TASK}, respond, rounds=2)
    assert part.shape() == [1, 5]  # stopped inside sc, run inline
    await fake_cluster.stop_worker(first)
    second = await fake_cluster.worker()
    run = await resume(registry, part.session_id, part.end, respond, asked=part.rounds)
    assert run.shape() == [1, 5, 5, 1]
    assert run.result["answer"] == "51 (5 paths agreed)"
    assert run.result["total_llm_calls"] == 12
    assert second.stats.replays == 1
    assert run.end.to_json(run.session_id)["stats"]["custom"] == {"initial_confidence": 0.1}


@pytest.mark.parametrize(("raw", "confidence"), [
    ("0.85", 0.85),
    ("85%", 0.85),
    ("8/10", 0.8),
    ("12/10", 1.0),            # a fraction is capped at 1
    ("1.5, so 90%", 0.9),       # a decimal above 1 is passed over for the percentage
    ("7 out of 10", 0.0),       # no form upstream reads: escalate
    ("", 0.0),
])
def test_parse_confidence_reads_upstreams_forms(raw: str, confidence: float) -> None:
    assert parse_confidence(raw) == confidence


@pytest.mark.parametrize(("inp", "words"), [
    ({"threshold": 0.5}, "needs input {'task'"),
    ({"task": "t", "fallback": "sc"}, "fallback must be one of ensemble, panel, retry"),
    ({"task": "t", "threshold": 1.5}, "threshold must be a number from 0 to 1"),
    ({"task": "t", "fallback_opts": ["n", 3]}, "fallback_opts must be an object"),
])
async def test_calibrate_refuses_bad_input(registry: SessionRegistry, worker: Any,
                                           inp: dict[str, Any], words: str) -> None:
    _, event = await registry.start_execution("calibrate", inp, timeout=10)
    assert isinstance(event, Finished) and event.state is Phase.FAILED
    assert event.error is not None and words in event.error, event.error
