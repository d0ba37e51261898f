"""``reflect`` (workers.library.reflect) against upstream's package: a draft (or the given
``initial_draft``), then critique and revise up to ``max_rounds`` times, stopping at the
first critique that says NO_MAJOR_ISSUES (or NO_ISSUES, per ``stop_when``)."""

from __future__ import annotations

from typing import Any

from coordinator import Finished, Phase, SessionRegistry
from tests.conftest import FakeCluster
from tests.library_driver import drive, resume


def critic(verdicts: list[str]) -> Any:
    """A responder whose k-th critique is ``verdicts[k]``; drafts and revisions are
    numbered by how many critiques came before them."""
    critiques = 0

    def respond(prompt: str) -> str:
        nonlocal critiques
        if prompt.endswith("Provide a thorough response."):
            return "draft 0"
        if "Critique this draft." in prompt:
            critiques += 1
            return verdicts[critiques - 1]
        assert "Revise the draft to address ALL issues" in prompt, prompt
        return f"draft {critiques}"

    return respond


async def test_reflect_stops_early_on_no_major_issues(registry: SessionRegistry,
                                                      worker: Any) -> None:
    verdicts = ["The intro is wrong.", "Better. NO_MAJOR_ISSUES remain."]
    run = await drive(registry, "reflect", {"task": "Explain TCP."}, critic(verdicts))
    assert run.shape() == [1, 1, 1, 1]  # draft, critique, revision, critique: converged
    draft, first, revise, second = (r[0] for r in run.rounds)
    assert draft.prompt == "Task: Explain TCP.\n\nProvide a thorough response."
    assert draft.max_tokens == 500 and draft.system is not None and "expert" in draft.system
    assert first.prompt.startswith("Task: Explain TCP.\n\nCurrent draft:\ndraft 0\n\n"
                                   "Critique this draft. Identify:\n- Errors or inaccuracies")
    assert first.prompt.endswith("If there are no major issues, output: NO_MAJOR_ISSUES\n"
                                 "If the draft is excellent with no issues at all, output: "
                                 "NO_ISSUES")
    assert first.max_tokens == 300 and first.system is not None and "critic" in first.system
    assert revise.prompt.startswith("Task: Explain TCP.\n\nPrevious draft:\ndraft 0\n\n"
                                    "Critique:\nThe intro is wrong.\n\nRevise the draft")
    assert revise.max_tokens == 500
    assert "Current draft:\ndraft 1\n\n" in second.prompt
    assert run.result == {
        "output": "draft 1",
        "rounds": [{"round": 1, "critique": "The intro is wrong.", "converged": False},
                   {"round": 2, "critique": verdicts[1], "converged": True}],
        "total_rounds": 2,
        "converged": True,
    }
    status = await registry.status(run.session_id)
    messages = [e["message"] for e in status["metrics"]["recent_logs"]]
    assert messages == ["critique 1 received", "critique 2 received",
                        "reflect: converged at round 2"]
    # progress counts steps as if no critique converged: draft + 3 x (critique, revision)
    assert status["metrics"]["progress"] == {"step": 4, "total": 7, "message": "critique 2"}


async def test_reflect_runs_max_rounds_without_convergence(registry: SessionRegistry,
                                                           worker: Any) -> None:
    run = await drive(registry, "reflect", {"task": "t"}, critic(["a", "b", "c"]))
    assert run.shape() == [1] * 7  # draft + 3 x (critique, revision), the most at defaults
    assert run.result == {
        "output": "draft 3",
        "rounds": [{"round": i, "critique": c, "converged": False}
                   for i, c in enumerate("abc", 1)],
        "total_rounds": 3,
        "converged": False,
    }


async def test_reflect_refines_an_initial_draft_and_honours_its_options(
    registry: SessionRegistry, worker: Any
) -> None:
    inp = {"task": "t", "initial_draft": "my draft", "max_rounds": 2, "stop_when": "no_issues",
           "gen_tokens": 77, "critique_tokens": 33}
    # NO_MAJOR_ISSUES does not stop a "no_issues" run; NO_ISSUES does
    run = await drive(registry, "reflect", inp, critic(["NO_MAJOR_ISSUES", "NO_ISSUES"]))
    assert run.shape() == [1, 1, 1]  # no draft question: critique, revision, critique
    critique, revise, _ = (r[0] for r in run.rounds)
    assert "Current draft:\nmy draft\n\n" in critique.prompt and critique.max_tokens == 33
    assert revise.max_tokens == 77
    assert run.result["output"] == "draft 1"
    assert [r["converged"] for r in run.result["rounds"]] == [False, True]
    assert run.result["converged"] is True

    none = await drive(registry, "reflect", {"task": "t", "max_rounds": 0}, critic([]))
    assert none.shape() == [1]
    assert none.result == {"output": "draft 0", "rounds": [], "total_rounds": 0,
                           "converged": False}


async def test_reflect_refuses_bad_inputs(registry: SessionRegistry, worker: Any) -> None:
    for inp, words in (({}, "needs input {'task'"),
                       ({"task": "t", "stop_when": "never"},
                        "stop_when must be one of no_issues, no_major_issues"),
                       ({"task": "t", "max_rounds": 21}, "max_rounds must be an integer"),
                       ({"task": "t", "initial_draft": ""}, "initial_draft must be a")):
        _, event = await registry.start_execution("reflect", inp, timeout=10)
        assert isinstance(event, Finished) and event.state is Phase.FAILED, inp
        assert event.error is not None and words in event.error, event.error


async def test_reflect_finishes_on_another_worker_by_replay(fake_cluster: FakeCluster,
                                                            registry: SessionRegistry) -> None:
    """Draft and first critique answered on one worker; a second, with nothing in memory,
    replays them, asks the same revision, and stops at the converging critique."""
    a = await fake_cluster.worker()
    respond = critic(["Too vague.", "NO_ISSUES"])
    first = await drive(registry, "reflect", {"task": "t"}, respond, rounds=2)
    await fake_cluster.stop_worker(a)
    b = await fake_cluster.worker()
    event = await registry.wait_event(first.session_id, timeout=10)
    assert event == first.end  # the revision asked before the stop
    run = await resume(registry, first.session_id, event, respond, asked=first.rounds)
    assert b.stats.replays == 1
    assert run.shape() == [1, 1, 1, 1]
    assert run.result["output"] == "draft 1" and run.result["total_rounds"] == 2
    assert run.result["converged"] is True
