"""``tot`` (workers.library.tot) against upstream's package: beam search over thoughts, with
upstream's 31 questions at the defaults asked in 13 rounds (the i-th proposal of every beam in
one batch, every score of a depth in one batch)."""

from __future__ import annotations

import re
from typing import Any

import pytest

from coordinator import Finished, Phase, SessionRegistry
from tests.conftest import FakeCluster
from tests.library_driver import drive, resume

TASK = "Get 24 from 4 7 8 8"
#: What the evaluator answers for each thought (any other thought: "5").
SCORES = {
    "A1": "6", "A2": "Score: 9/10", "A3": "7",
    "A2.1": "5", "A2.2": "8", "A2.3": "no idea",  # no number: upstream's default, 5
    "A3.1": "8",  # ties A2.2, which was proposed first and stays ahead
    "A3.2": "2", "A3.3": "12",  # clamped to 10
    "A3.3.1": "3", "A3.3.2": "4", "A3.3.3": "7.5",
    "A2.2.1": "0", "A2.2.2": "9", "A2.2.3": "6",
}


def respond(prompt: str) -> str:
    """A proposal is named after its beam's last step and its number (A2 -> A2.1, A2.2,
    ...); a score comes from SCORES; the synthesis quotes the best path."""
    thought = re.search(r"\nNew thought: (.*)\n\nEvaluate", prompt)
    if thought:
        return SCORES.get(thought.group(1), "5")
    first = re.search(r"Propose reasoning approach #(\d+)\.", prompt)
    if first:
        return f"A{first.group(1)}"
    idea = re.search(r"Propose idea #(\d+)\.", prompt)
    if idea:
        last = re.findall(r"Step \d+: (.*)\n", prompt)[-1]
        return f"{last}.{idea.group(1)}"
    assert "Synthesize these reasoning steps" in prompt, prompt
    return "conclusion: " + " > ".join(re.findall(r"Step \d+: (.*)\n", prompt))


EXPECTED = {
    "conclusion": "conclusion: A2 > A2.2 > A2.2.2",
    "best_path": ["A2", "A2.2", "A2.2.2"],
    "best_score": 9,
    "explored_paths": [
        {"rank": 1, "path": ["A2", "A2.2", "A2.2.2"], "score": 9},
        {"rank": 2, "path": ["A3", "A3.3", "A3.3.3"], "score": 7.5},
    ],
    "tree_stats": {"depth": 3, "breadth": 3, "beam_width": 2},
}


async def test_tot_asks_upstreams_31_questions_in_13_rounds(
    registry: SessionRegistry, worker: Any
) -> None:
    run = await drive(registry, "tot", {"task": TASK}, respond)
    assert run.shape() == [1, 1, 1, 3, 2, 2, 2, 6, 2, 2, 2, 6, 1]
    assert sum(run.shape()) == 31
    p = run.prompts()
    assert p[0] == [f"Task: {TASK}\n\nPropose reasoning approach #1. A distinct first step "
                    "toward solving this. Be specific and concrete. 1-3 sentences."]
    assert p[2] == [
        f"Task: {TASK}\n\nOther approaches already proposed:\n  [Already proposed 1]: A1\n"
        "  [Already proposed 2]: A2\n\nPropose a DIFFERENT approach.\n\nPropose reasoning "
        "approach #3. A distinct first step toward solving this. Be specific and concrete. "
        "1-3 sentences."]
    assert p[3][0] == (
        f"Task: {TASK}\n\nReasoning path so far:\nNew thought: A1\n\nEvaluate this reasoning "
        "direction on a 1-10 scale:\n- Is it logically sound?\n- Does it make progress "
        "toward solving the task?\n- Is it a dead end or promising?\n\n"
        "Reply with ONLY the number.")
    # depth 2 grows the two best beams, A2 (9) then A3 (7), side by side
    assert p[4] == [
        f"Task: {TASK}\n\nReasoning so far:\nStep 1: {beam}\n\nWhat is the next reasoning "
        "step? Propose idea #1. Be specific and concrete. 1-3 sentences."
        for beam in ("A2", "A3")]
    assert p[5][1] == (
        f"Task: {TASK}\n\nReasoning so far:\nStep 1: A3\n\nOther next steps already "
        "proposed:\n  [Already proposed 1]: A3.1\n\nPropose a DIFFERENT next step.\n\n"
        "What is the next reasoning step? Propose idea #2. Be specific and concrete. "
        "1-3 sentences.")
    scored = [re.search(r"New thought: (.*)\n", q).group(1)  # type: ignore[union-attr]
              for q in p[7]]
    assert scored == ["A2.1", "A2.2", "A2.3", "A3.1", "A3.2", "A3.3"]
    assert "Reasoning path so far:\nStep 1: A3\nNew thought: A3.2\n" in p[7][4]
    # depth 3 grows A3.3 (10) and A2.2 (8, ahead of A3.1's equal 8)
    assert [re.findall(r"Step \d+: (.*)\n", q) for q in p[8]] == [["A3", "A3.3"],
                                                                   ["A2", "A2.2"]]
    assert p[12] == [f"Task: {TASK}\n\nBest reasoning path (score: 9/10):\nStep 1: A2\n"
                     "Step 2: A2.2\nStep 3: A2.2.2\n\nSynthesize these reasoning steps into a "
                     "clear, comprehensive answer."]
    tokens = {(len(r), r[0].max_tokens) for r in run.rounds}
    assert tokens == {(1, 200), (2, 200), (3, 10), (6, 10), (1, 600)}
    systems = [q.system or "" for r in run.rounds for q in r]
    assert sum("creative problem solver" in s for s in systems) == 15
    assert sum("critical evaluator" in s for s in systems) == 15
    assert "expert synthesizer" in systems[-1]
    assert run.result == EXPECTED
    logs = [e["message"]
            for e in (await registry.status(run.session_id))["metrics"]["recent_logs"]]
    assert logs == ["tot: depth 1/3 — 3 candidates, kept 2 (best score: 9)",
                    "tot: depth 2/3 — 6 candidates, kept 2 (best score: 10)",
                    "tot: depth 3/3 — 6 candidates, kept 2 (best score: 9)"]


async def test_tot_replays_on_another_worker_to_the_same_end(
    fake_cluster: FakeCluster, registry: SessionRegistry
) -> None:
    first = await fake_cluster.worker()
    part = await drive(registry, "tot", {"task": TASK}, respond, rounds=6)
    await fake_cluster.stop_worker(first)
    second = await fake_cluster.worker()
    run = await resume(registry, part.session_id, part.end, respond, asked=part.rounds)
    assert run.shape() == [1, 1, 1, 3, 2, 2, 2, 6, 2, 2, 2, 6, 1]
    assert run.result == EXPECTED
    assert second.stats.replays == 1


async def test_tot_breadth_depth_and_beam_width(registry: SessionRegistry,
                                                worker: Any) -> None:
    run = await drive(registry, "tot", {"task": TASK, "breadth": 2, "depth": 2,
                                        "beam_width": 1}, respond)
    assert run.shape() == [1, 1, 2, 1, 1, 2, 1]
    assert run.result["best_path"] == ["A2", "A2.2"]
    assert run.result["explored_paths"] == [{"rank": 1, "path": ["A2", "A2.2"], "score": 8}]
    assert run.result["tree_stats"] == {"depth": 2, "breadth": 2, "beam_width": 1}
    flat = await drive(registry, "tot", {"task": TASK, "depth": 0}, respond)
    assert flat.prompts() == [[f"Task: {TASK}\n\nBest reasoning path (score: 0/10):\n\n"
                               "Synthesize these reasoning steps into a clear, comprehensive "
                               "answer."]]
    assert flat.result["best_path"] == [] and flat.result["best_score"] == 0


@pytest.mark.parametrize(("inp", "words"), [
    ({"breadth": 2}, "needs input {'task'"),
    ({"task": "t", "breadth": 0}, "breadth must be an integer from 1 to 10"),
    ({"task": "t", "beam_width": 11}, "beam_width must be an integer from 1 to 10"),
])
async def test_tot_refuses_bad_input(registry: SessionRegistry, worker: Any,
                                     inp: dict[str, Any], words: str) -> None:
    _, event = await registry.start_execution("tot", inp, timeout=10)
    assert isinstance(event, Finished) and event.state is Phase.FAILED
    assert event.error is not None and words in event.error, event.error
