"""``sc`` (workers.library.sc) against upstream's package: n reasoning paths with rotating
hints, one answer extraction per path, a consensus summary, and a vote over the extracted
answers. Upstream asks the 2n+1 questions one by one; here they are 3 rounds."""

from __future__ import annotations

from typing import Any

from coordinator import Finished, Paused, Phase, SessionRegistry
from tests.conftest import FakeCluster
from tests.library_driver import drive, resume
from workers.library.sc import DIVERSITY_HINTS

#: What path i (by its hint) concludes, formatted as carelessly as models do.
CONCLUSIONS = {
    DIVERSITY_HINTS[0]: "Tokyo.",
    DIVERSITY_HINTS[1]: "Kyoto",
    DIVERSITY_HINTS[2]: "  tokyo ",
    DIVERSITY_HINTS[3]: "Kyoto!",
    DIVERSITY_HINTS[4]: "TOKYO",
    DIVERSITY_HINTS[5]: "Osaka",
    DIVERSITY_HINTS[6]: "Osaka",
}


def respond(prompt: str) -> str:
    """A path reasons to its hint's conclusion; an extraction reads the conclusion back
    out of the reasoning it is shown (so a mix-up of paths would change the vote)."""
    if prompt.startswith("Question:") and "Multiple reasoning paths" not in prompt:
        hint = next(h for h in DIVERSITY_HINTS if h in prompt)
        return f"Reasoning with hint {DIVERSITY_HINTS.index(hint)}. Final: {CONCLUSIONS[hint]}"
    if prompt.startswith("Original question:"):
        return prompt.split("Final: ", 1)[1].split("\n\nExtract ONLY", 1)[0]
    return "Tokyo, 3 out of 5 paths agreed."


async def test_sc_samples_extracts_per_path_then_asks_for_consensus(
    registry: SessionRegistry, worker: Any
) -> None:
    run = await drive(registry, "sc", {"task": "Capital of Japan before 1869?"}, respond)
    assert run.shape() == [5, 5, 1]  # 2n+1 questions at n=5, in 3 rounds
    paths, extractions, (consensus,) = run.rounds
    for i, q in enumerate(paths):
        assert q.prompt == (f"Question: Capital of Japan before 1869?\n\n{DIVERSITY_HINTS[i]} "
                            "Show your reasoning, then give a clear final answer.")
        assert q.max_tokens == 400 and q.system is not None and "careful reasoner" in q.system
    for i, q in enumerate(extractions):  # extraction i reads path i's reasoning
        assert q.prompt.startswith("Original question: Capital of Japan before 1869?\n\n"
                                   f"Reasoning:\nReasoning with hint {i}. Final: ")
        assert q.prompt.endswith("Extract ONLY the final answer in one short sentence. "
                                 "No explanation.")
        assert q.max_tokens == 100
    assert consensus.max_tokens == 300
    assert ("Path 1 answer: Tokyo.\nPath 2 answer: Kyoto\nPath 3 answer:   tokyo \n"
            "Path 4 answer: Kyoto!\nPath 5 answer: TOKYO\n") in consensus.prompt
    assert "Which answer appears most frequently?" in consensus.prompt
    assert run.result == {
        "consensus": "Tokyo, 3 out of 5 paths agreed.",
        "answer": "Tokyo",  # the first tokyo path, cleaned: not "tokyo" or "Tokyo."
        "answer_norm": "tokyo",
        "paths": [{"reasoning": f"Reasoning with hint {i}. Final: {c}", "answer": c}
                  for i, c in enumerate(["Tokyo.", "Kyoto", "  tokyo ", "Kyoto!", "TOKYO"])],
        "votes": ["tokyo", "kyoto", "tokyo", "kyoto", "tokyo"],
        "vote_counts": {"tokyo": 3, "kyoto": 2},
        "n_sampled": 5,
        "total_llm_calls": 11,
    }
    metrics = (await registry.status(run.session_id))["metrics"]
    assert [e.get("message", e.get("msg")) for e in metrics["recent_logs"]] == [
        "vote: 3 of 5 for 'tokyo'"]
    assert metrics["progress"] == {"step": 3, "total": 3, "message": "consensus"}


async def test_sc_hints_rotate_and_a_tie_goes_to_the_first_answer(
    registry: SessionRegistry, worker: Any
) -> None:
    run = await drive(registry, "sc", {"task": "q", "n": 9, "gen_tokens": 50}, respond)
    assert run.shape() == [9, 9, 1]
    hints = [next(h for h in DIVERSITY_HINTS if h in q.prompt) for q in run.rounds[0]]
    assert hints == [*DIVERSITY_HINTS, DIVERSITY_HINTS[0], DIVERSITY_HINTS[1]]
    assert {q.max_tokens for q in run.rounds[0]} == {50}
    # tokyo 4 (paths 1, 3, 5, 8), kyoto 3 (2, 4, 9), osaka 2
    assert run.result["vote_counts"] == {"tokyo": 4, "kyoto": 3, "osaka": 2}
    tie = await drive(registry, "sc", {"task": "q", "n": 2}, respond)
    assert tie.result["vote_counts"] == {"tokyo": 1, "kyoto": 1}
    assert (tie.result["answer"], tie.result["answer_norm"]) == ("Tokyo", "tokyo")
    assert tie.result["total_llm_calls"] == 5


async def test_sc_finishes_on_another_worker_by_replay(fake_cluster: FakeCluster,
                                                       registry: SessionRegistry) -> None:
    """The paths answered on one worker, the extractions on a second that has nothing in
    memory: it replays the first round and asks the same extractions."""
    a = await fake_cluster.worker()
    first = await drive(registry, "sc", {"task": "q", "n": 3}, respond, rounds=1)
    assert isinstance(first.end, Paused) and len(first.end.queries) == 3
    await fake_cluster.stop_worker(a)
    b = await fake_cluster.worker()
    event = await registry.wait_event(first.session_id, timeout=10)
    run = await resume(registry, first.session_id, event, respond, asked=first.rounds)
    assert b.stats.replays == 1
    assert run.shape() == [3, 3, 1]
    assert run.rounds[1] == first.end.queries
    assert run.result["votes"] == ["tokyo", "kyoto", "tokyo"]


async def test_sc_refuses_bad_inputs(registry: SessionRegistry, worker: Any) -> None:
    for inp, words in (({"n": 3}, "needs input {'task'"),
                       ({"task": "q", "n": 0}, "n must be an integer from 1 to 64"),
                       ({"task": "q", "gen_tokens": True}, "gen_tokens must be an integer")):
        _, event = await registry.start_execution("sc", inp, timeout=10)
        assert isinstance(event, Finished) and event.state is Phase.FAILED, inp
        assert event.error is not None and words in event.error, event.error
