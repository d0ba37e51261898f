"""``panel`` (workers.library.panel) against upstream's package: each role speaks in turn,
seeing every argument before it, then a moderator synthesises."""

from __future__ import annotations

from typing import Any

from coordinator import Finished, Phase, SessionRegistry
from tests.library_driver import drive


def respond(prompt: str) -> str:
    if prompt.startswith("Topic:") and "Synthesize:" in prompt:
        return "balanced conclusion"
    role = prompt.split("As a ", 1)[1].split(",", 1)[0]
    return f"{role} says {prompt.count('[')}"  # how many arguments it was shown


async def test_panel_speaks_in_turn_then_synthesises(registry: SessionRegistry,
                                                     worker: Any) -> None:
    run = await drive(registry, "panel", {"task": "Adopt Rust?"}, respond)
    assert run.shape() == [1, 1, 1, 1]  # 3 roles + moderator, each its own round
    advocate, critic, pragmatist, moderator = (r[0] for r in run.rounds)
    assert advocate.prompt == ("Topic: Adopt Rust?\n\nAs a advocate, present your initial "
                               "position. 2-3 sentences.")
    assert advocate.system == "You are a advocate. Stay in character. Be specific."
    assert critic.prompt == (
        "Topic: Adopt Rust?\n\nPrevious arguments:\n[advocate]: advocate says 0\n\n\n"
        "As a critic, respond to the discussion. Engage with specific points. 2-3 sentences.")
    assert "[advocate]: advocate says 0\n[critic]: critic says 1\n" in pragmatist.prompt
    assert [q.max_tokens for q in (advocate, critic, pragmatist, moderator)] == \
        [250, 250, 250, 400]
    assert moderator.prompt.startswith(
        "Topic: Adopt Rust?\n\nDebate:\n[advocate]: advocate says 0\n[critic]: critic says 1\n"
        "[pragmatist]: pragmatist says 2\n\n\nSynthesize: identify agreements")
    assert moderator.system is not None and "moderator" in moderator.system
    assert run.result == {
        "arguments": [{"role": "advocate", "text": "advocate says 0"},
                      {"role": "critic", "text": "critic says 1"},
                      {"role": "pragmatist", "text": "pragmatist says 2"}],
        "synthesis": "balanced conclusion",
    }


async def test_panel_takes_its_roles(registry: SessionRegistry, worker: Any) -> None:
    run = await drive(registry, "panel", {"task": "t", "roles": ["lawyer", "engineer"]},
                      respond)
    assert run.shape() == [1, 1, 1]
    assert [a["role"] for a in run.result["arguments"]] == ["lawyer", "engineer"]
    for inp in ({"task": "t", "roles": []}, {"task": "t", "roles": "critic"},
                {"task": "t", "roles": ["ok", ""]}):
        _, event = await registry.start_execution("panel", inp, timeout=10)
        assert isinstance(event, Finished) and event.state is Phase.FAILED, inp
        assert event.error == "roles must be a list of 1 to 12 non-empty strings"
