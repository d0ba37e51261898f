"""``decompose`` (workers.library.decompose) against upstream's package: a split into a
numbered list, every sub-task in one batch, a merge; ``{answer, subtasks, subtask_results,
decomposition_raw}``."""

from __future__ import annotations

import re
from typing import Any

from coordinator import Finished, Phase, SessionRegistry
from tests.library_driver import drive

SPLIT = "1. Gather the data\n2) Analyse it\nsome remark, not an item\n  3   Write the report  \n"


def respond(prompt: str) -> str:
    if "Break this into" in prompt:
        return SPLIT
    found = re.search(r"Your specific sub-task \((\d+) of (\d+)\): (.*)\n", prompt)
    if found:
        return f"done {found.group(1)}/{found.group(2)}: {found.group(3)}"
    assert "Merge these results" in prompt, prompt
    return "the merged answer"


async def test_decompose_splits_solves_in_one_batch_and_merges(
    registry: SessionRegistry, worker: Any
) -> None:
    run = await drive(registry, "decompose", {"task": "Plan a survey"}, respond)
    assert run.shape() == [1, 3, 1]
    split, subs, merge = run.rounds
    assert split[0].prompt == (
        "Complex task:\nPlan a survey\n\nBreak this into 5 or fewer independent sub-tasks. "
        "Each sub-task should be self-contained and answerable on its own. Order by logical "
        "dependency (independent tasks first).\n\nOutput a numbered list:\n"
        "1. [sub-task description]\n2. [sub-task description]\n...")
    assert split[0].max_tokens == 300
    assert split[0].system is not None and "expert task planner" in split[0].system
    assert [q.prompt for q in subs] == [
        "You are working on part of a larger task.\n\nOverall goal: Plan a survey\n\n"
        f"Your specific sub-task ({i} of 3): {s}\n\n"
        "Provide a thorough, self-contained answer for this sub-task."
        for i, s in enumerate(["Gather the data", "Analyse it", "Write the report"], start=1)]
    assert {q.max_tokens for q in subs} == {400}
    assert all(q.system is not None and "focused specialist" in q.system for q in subs)
    assert merge[0].prompt == (
        "Overall task: Plan a survey\n\nSub-task results:\n\n"
        "## Sub-task 1: Gather the data\ndone 1/3: Gather the data\n\n"
        "## Sub-task 2: Analyse it\ndone 2/3: Analyse it\n\n"
        "## Sub-task 3: Write the report\ndone 3/3: Write the report\n\n\n"
        "Merge these results into a unified, coherent response. Resolve any "
        "inconsistencies between sub-tasks. Ensure completeness — nothing from the "
        "sub-results should be lost.")
    assert merge[0].max_tokens == 600
    assert merge[0].system is not None and "expert integrator" in merge[0].system
    assert run.result == {
        "answer": "the merged answer",
        "subtasks": ["Gather the data", "Analyse it", "Write the report"],
        "subtask_results": ["done 1/3: Gather the data", "done 2/3: Analyse it",
                            "done 3/3: Write the report"],
        "decomposition_raw": SPLIT,
    }
    status = await registry.status(run.session_id)
    assert "decompose: 3 sub-tasks" in [e["message"]
                                         for e in status["metrics"]["recent_logs"]]


async def test_decompose_keeps_max_subtasks_and_its_token_limits(
    registry: SessionRegistry, worker: Any
) -> None:
    run = await drive(registry, "decompose", {"task": "t", "max_subtasks": 2,
                                              "subtask_tokens": 50, "merge_tokens": 70},
                      respond)
    assert run.shape() == [1, 2, 1]
    assert "Break this into 2 or fewer" in run.rounds[0][0].prompt
    assert [q.max_tokens for r in run.rounds for q in r] == [300, 50, 50, 70]
    assert run.result["subtasks"] == ["Gather the data", "Analyse it"]


async def test_decompose_without_a_numbered_list_solves_the_task_itself(
    registry: SessionRegistry, worker: Any
) -> None:
    def plain(prompt: str) -> str:
        return "no list here" if "Break this into" in prompt else respond(prompt)

    run = await drive(registry, "decompose", {"task": "Plan a survey"}, plain)
    assert run.shape() == [1, 1, 1]
    assert "Your specific sub-task (1 of 1): Plan a survey\n" in run.rounds[1][0].prompt
    assert run.result == {"answer": "the merged answer", "subtasks": ["Plan a survey"],
                          "subtask_results": ["done 1/1: Plan a survey"],
                          "decomposition_raw": "no list here"}


async def test_decompose_refuses_a_missing_task_or_bad_limits(
    registry: SessionRegistry, worker: Any
) -> None:
    for inp, words in (({}, "needs input {'task'"),
                       ({"task": "t", "max_subtasks": 0}, "max_subtasks must be an integer"),
                       ({"task": "t", "merge_tokens": "600"}, "merge_tokens must be an integer")):
        _, event = await registry.start_execution("decompose", inp, timeout=10)
        assert isinstance(event, Finished) and event.state is Phase.FAILED, inp
        assert event.error is not None and words in event.error, event.error
        assert event.to_json("s")["type"] == "invalid_input"
