"""``ucb`` (workers.library.ucb) against upstream's package: n hypotheses (one batch
here), then per round a score for each (one batch) and a refinement of the UCB1 pick;
ranked by average score."""

from __future__ import annotations

import re
from typing import Any

from coordinator import Finished, Phase, SessionRegistry
from tests.library_driver import drive

#: Round 1: #2 scores best; round 2: #1's refinement does. A missing number counts 5.
SCORES = {1: {1: "4", 2: "9/10", 3: "no idea"}, 2: {1: "10", 2: "6", 3: "score: 12"}}


def respond(prompt: str) -> str:
    """Hypothesis i is "hi"; a refinement appends "+"; a score depends on the round, told
    by whether the listing shows a refined hypothesis yet."""
    asked = re.search(r"Propose hypothesis #(\d)", prompt)
    if asked:
        return f"h{asked.group(1)}"
    rate = re.search(r"Rate hypothesis #(\d)", prompt)
    if rate:
        return SCORES[2 if "+" in prompt else 1][int(rate.group(1))]
    best = prompt.split("Current best hypothesis:\n", 1)[1].split("\n", 1)[0]
    return best + "+"


async def test_ucb_generates_scores_and_refines_the_ucb1_pick(registry: SessionRegistry,
                                                              worker: Any) -> None:
    run = await drive(registry, "ucb", {"task": "Cache a REST API."}, respond)
    assert run.shape() == [3, 3, 1, 3, 1]  # 11 questions in 5 rounds at the defaults
    gen, score1, (refine1,), score2, (refine2,) = run.rounds
    assert [q.prompt for q in gen] == [
        f"Task: Cache a REST API.\n\nPropose hypothesis #{i}. A distinct, specific approach. "
        "2-3 sentences." for i in (1, 2, 3)]
    assert {q.max_tokens for q in gen} == {200}
    assert [q.prompt for q in score1] == [
        f"Task: Cache a REST API.\n\nHypotheses:\n#1: h1\n#2: h2\n#3: h3\n\nRate hypothesis "
        f"#{i} (1-10) for quality, feasibility, and originality. Reply with ONLY the number."
        for i in (1, 2, 3)]
    assert {q.max_tokens for q in score1} == {10}
    # round 1: means 4, 9, 5 with equal bonuses: #2 is refined
    assert refine1.prompt.startswith("Task: Cache a REST API.\n\nCurrent best hypothesis:\nh2"
                                     "\n\nRefine and strengthen it.")
    assert "#1: h1\n#2: h2+\n#3: h3\n" in score2[0].prompt
    # round 2: totals 14, 15, 15 over 2 pulls: #2 (first of the equal 7.5s) again
    assert "Current best hypothesis:\nh2+\n\n" in refine2.prompt
    assert run.result == {
        "best": "h2++",
        "ranking": [
            {"rank": 1, "hypothesis": "h2++", "avg_score": 7.5, "pulls": 2},
            {"rank": 2, "hypothesis": "h3", "avg_score": 7.5, "pulls": 2},
            {"rank": 3, "hypothesis": "h1", "avg_score": 7.0, "pulls": 2},
        ],
    }


async def test_ucb_without_rounds_ranks_the_unscored_hypotheses(registry: SessionRegistry,
                                                                worker: Any) -> None:
    run = await drive(registry, "ucb", {"task": "t", "rounds": 0, "n": 2}, respond)
    assert run.shape() == [2]
    assert run.result == {"best": "h1", "ranking": [
        {"rank": 1, "hypothesis": "h1", "avg_score": 0.0, "pulls": 0},
        {"rank": 2, "hypothesis": "h2", "avg_score": 0.0, "pulls": 0}]}


async def test_ucb_refuses_bad_inputs(registry: SessionRegistry, worker: Any) -> None:
    for inp, words in (({}, "needs input {'task'"),
                       ({"task": "t", "n": 0}, "n must be an integer from 1 to 20"),
                       ({"task": "t", "rounds": -1}, "rounds must be an integer")):
        _, event = await registry.start_execution("ucb", inp, timeout=10)
        assert isinstance(event, Finished) and event.state is Phase.FAILED, inp
        assert event.error is not None and words in event.error, event.error
