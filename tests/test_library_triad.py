"""``triad`` (workers.library.triad) against upstream's package: both openings in one batch,
then each rebuttal answering the last argument, then a judge; ``{verdict, winner,
transcript, total_rounds}``."""

from __future__ import annotations

import re
from typing import Any

import pytest

from coordinator import Finished, Phase, SessionRegistry
from tests.library_driver import drive

TOPIC = "Remote work beats the office"
JUDGE = "WINNER: Opponent.\nREASONING: sharper rebuttals\nSYNTHESIS: hybrid"


def respond(prompt: str) -> str:
    """Openings say who opened; a rebuttal names the argument it answers, so the test sees
    each one was shown the latest argument of the other side."""
    opening = re.search(r"You are the (\w+)\. Present your opening", prompt)
    if opening:
        return f"{opening.group(1)} opening"
    rebuttal = re.search(r"(Opponent|Proponent)'s latest argument:\n(.*)\n\nCounter", prompt,
                         re.DOTALL)
    if rebuttal:
        answering = "proponent" if rebuttal.group(1) == "Opponent" else "opponent"
        return f"{answering} vs [{rebuttal.group(2)}]"
    assert "As the impartial judge" in prompt, prompt
    return JUDGE


async def test_triad_opens_in_one_batch_then_rebuts_in_turn_then_judges(
    registry: SessionRegistry, worker: Any
) -> None:
    run = await drive(registry, "triad", {"task": TOPIC}, respond)
    assert run.shape() == [2, 1, 1, 1, 1, 1, 1, 1]  # 9 questions, 8 rounds
    pro_open, opp_open = run.rounds[0]
    assert pro_open.prompt == (
        f"Topic: {TOPIC}\n\nYou are the proponent. Present your opening argument to SUPPORT "
        "this position.\nBe specific, cite reasoning, and anticipate counterarguments.")
    assert "to OPPOSE this position" in opp_open.prompt
    assert pro_open.system is not None and "assigned the proponent role" in pro_open.system
    assert opp_open.system is not None and "assigned the opponent role" in opp_open.system
    rebuttals = [r[0] for r in run.rounds[1:-1]]
    assert rebuttals[0].prompt == (
        f"Topic: {TOPIC}\n\nOpponent's latest argument:\nopponent opening\n\n"
        "Counter this argument. Identify weaknesses, logical flaws, or missing evidence. "
        "Then strengthen your own position.")
    assert [q.system.split(".")[0] for q in rebuttals if q.system] == \
        ["You are the proponent", "You are the opponent"] * 3
    assert all(q.max_tokens == 400 for r in run.rounds[:-1] for q in r)

    p1 = "proponent vs [opponent opening]"
    o1 = f"opponent vs [{p1}]"
    p2 = f"proponent vs [{o1}]"
    o2 = f"opponent vs [{p2}]"
    p3 = f"proponent vs [{o2}]"
    o3 = f"opponent vs [{p3}]"
    (judge,) = run.rounds[-1]
    assert judge.max_tokens == 500
    assert judge.system is not None and "impartial, rigorous judge" in judge.system
    assert judge.prompt == (
        f"Topic: {TOPIC}\n\nFull debate transcript:\n\n"
        "--- Opening ---\nPROPONENT: proponent opening\n\nOPPONENT: opponent opening\n\n"
        f"--- Round 1 ---\nPROPONENT: {p1}\n\nOPPONENT: {o1}\n\n"
        f"--- Round 2 ---\nPROPONENT: {p2}\n\nOPPONENT: {o2}\n\n"
        f"--- Round 3 ---\nPROPONENT: {p3}\n\nOPPONENT: {o3}\n\n\n"
        "As the impartial judge, evaluate:\n1. Which side presented stronger evidence?\n"
        "2. Which side had better logical reasoning?\n"
        "3. Which side effectively rebutted the other?\n\nDeliver your verdict:\n"
        "WINNER: [proponent|opponent|draw]\nREASONING: [detailed explanation]\n"
        "SYNTHESIS: [balanced conclusion incorporating valid points from both sides]")
    assert run.result == {
        "verdict": JUDGE,
        "winner": "opponent.",  # upstream keeps the word as written, lower-cased
        "transcript": [
            {"round": 0, "proponent": "proponent opening", "opponent": "opponent opening"},
            {"round": 1, "proponent": p1, "opponent": o1},
            {"round": 2, "proponent": p2, "opponent": o2},
            {"round": 3, "proponent": p3, "opponent": o3},
        ],
        "total_rounds": 3,
    }


async def test_triad_rounds_and_token_limits(registry: SessionRegistry, worker: Any) -> None:
    run = await drive(registry, "triad", {"task": TOPIC, "rounds": 1, "gen_tokens": 40,
                                          "judge_tokens": 60}, respond)
    assert run.shape() == [2, 1, 1, 1]
    assert [q.max_tokens for r in run.rounds for q in r] == [40, 40, 40, 40, 60]
    assert run.result["total_rounds"] == 1 and len(run.result["transcript"]) == 2


async def test_triad_with_no_rounds_judges_the_openings_and_no_winner_line_is_unknown(
    registry: SessionRegistry, worker: Any
) -> None:
    run = await drive(registry, "triad", {"task": TOPIC, "rounds": 0},
                      lambda p: "It is a draw." if "impartial judge" in p else respond(p))
    assert run.shape() == [2, 1]
    assert "--- Opening ---" in run.rounds[1][0].prompt
    assert "--- Round" not in run.rounds[1][0].prompt
    assert run.result["winner"] == "unknown"


@pytest.mark.parametrize(("inp", "words"), [
    ({}, "needs input {'task'"),
    ({"task": "t", "rounds": -1}, "rounds must be an integer from 0 to 20"),
    ({"task": "t", "judge_tokens": True}, "judge_tokens must be an integer"),
])
async def test_triad_refuses_bad_input(registry: SessionRegistry, worker: Any,
                                       inp: dict[str, Any], words: str) -> None:
    _, event = await registry.start_execution("triad", inp, timeout=10)
    assert isinstance(event, Finished) and event.state is Phase.FAILED
    assert event.error is not None and words in event.error, event.error
