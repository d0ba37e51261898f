"""``cot`` (workers.library.cot) against upstream's package: depth insight questions, each
seeing the chain so far, then a synthesis; ``{chain, conclusion}``."""

from __future__ import annotations

from typing import Any

from coordinator import Finished, Phase, SessionRegistry
from tests.library_driver import drive


def respond(prompt: str) -> str:
    """Insight k names how many steps the prompt showed; the synthesis says so."""
    if "Synthesize" in prompt:
        return "the conclusion"
    return f"insight {prompt.count('Step ') + 1}"


async def test_cot_asks_depth_insights_in_order_then_a_synthesis(
    registry: SessionRegistry, worker: Any
) -> None:
    run = await drive(registry, "cot", {"task": "Why is the sky blue?"}, respond)
    assert run.shape() == [1, 1, 1, 1]  # depth 3 + synthesis, one question a round
    first, second, third, synth = (r[0] for r in run.rounds)
    assert first.prompt == ("Task: Why is the sky blue?\n\nThink step by step. What is the "
                            "first key insight? 1-2 sentences.")
    assert second.prompt == (
        "Task: Why is the sky blue?\n\nReasoning so far:\nStep 1: insight 1\n\n\n"
        "What is the next key insight? Build on previous reasoning. 1-2 sentences.")
    assert "Step 1: insight 1\nStep 2: insight 2\n" in third.prompt
    assert synth.prompt == (
        "Task: Why is the sky blue?\n\nReasoning chain:\nStep 1: insight 1\nStep 2: insight 2"
        "\nStep 3: insight 3\n\n\nSynthesize into a clear, comprehensive answer.")
    assert [q.max_tokens for q in (first, second, third, synth)] == [200, 200, 200, 500]
    assert first.system == second.system and first.system is not None \
        and "deep thinker" in first.system
    assert synth.system is not None and "synthesizer" in synth.system
    assert run.result == {"chain": ["insight 1", "insight 2", "insight 3"],
                          "conclusion": "the conclusion"}
    progress = (await registry.status(run.session_id))["metrics"]["progress"]
    assert progress == {"step": 4, "total": 4, "message": "synthesis"}


async def test_cot_depth_sets_the_number_of_insights(registry: SessionRegistry,
                                                     worker: Any) -> None:
    run = await drive(registry, "cot", {"task": "t", "depth": 1}, respond)
    assert run.shape() == [1, 1]
    assert run.result == {"chain": ["insight 1"], "conclusion": "the conclusion"}
    only = await drive(registry, "cot", {"task": "t", "depth": 0}, respond)
    assert only.prompts() == [["Task: t\n\nReasoning chain:\n\n\nSynthesize into a clear, "
                               "comprehensive answer."]]
    assert only.result == {"chain": [], "conclusion": "the conclusion"}


async def test_cot_refuses_a_missing_task_or_a_bad_depth(registry: SessionRegistry,
                                                         worker: Any) -> None:
    for inp, words in (({}, "needs input {'task'"), ({"task": "  "}, "needs input {'task'"),
                       ({"task": "t", "depth": "3"}, "depth must be an integer from 0 to 50"),
                       ({"task": "t", "depth": 51}, "depth must be an integer")):
        _, event = await registry.start_execution("cot", inp, timeout=10)
        assert isinstance(event, Finished) and event.state is Phase.FAILED, inp
        assert event.error is not None and words in event.error, event.error
