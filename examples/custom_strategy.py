"""A strategy of your own: draft several answers in one batch, then ask for the best one.

A worker loads it with ``--import`` (run from the repository root, so that ``examples`` is
importable; ``python -m coordinator`` puts the current directory on the path, the
``coordinator`` script needs ``PYTHONPATH=.``):

    export REDIS_URL=redis://127.0.0.1:6379/0
    python -m coordinator worker --import examples.custom_strategy &
    python examples/host_loop.py draft-vote "Name a cache" '{"n": 3}'

Or run this file: its ``__main__`` is a small host that drives the strategy on the embedded
default (in-process Redis and workers), then prints the result with the session's progress
and logs:

    python -m examples.custom_strategy "Name a cache" 3
"""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

from coordinator import Finished, Paused, SessionRegistry, Settings
from coordinator.embedded import embedded
from workers import Context, strategy


@strategy("draft-vote")
async def draft_vote(ctx: Context, task: str, n: int = 3) -> dict[str, Any]:
    """Draft n answers in one round, then ask which draft is best and return it."""
    ctx.progress(1, 2, f"drafting {n} answers")
    drafts = await ctx.llm_batch([
        {"prompt": f"Draft {i + 1} of {n} for: {task}", "max_tokens": 200} for i in range(n)
    ])
    ctx.log("info", f"{len(drafts)} drafts in")
    ctx.progress(2, 2, "choosing")
    listing = "\n".join(f"{i + 1}. {d}" for i, d in enumerate(drafts))
    choice = await ctx.llm(f"Which draft answers best: {task}?\n{listing}\n"
                           "Reply with its number only.", max_tokens=8)
    # Deterministic given the answers, as every strategy must be (a replay re-asks nothing).
    digits = "".join(c for c in choice if c.isdigit())
    pick = int(digits) - 1 if digits and 0 < int(digits) <= n else 0
    ctx.log("info", f"picked draft {pick + 1}")
    return {"best": drafts[pick], "drafts": drafts}


def answer(prompt: str) -> str:
    """The host's stand-in for an LLM: drafts echo their prompt, the vote picks draft 2."""
    return "2" if prompt.startswith("Which draft") else "echo: " + prompt


async def host(task: str, n: int) -> dict[str, Any]:
    settings = Settings()  # the embedded default: in-process Redis and two workers
    async with embedded(settings, modules=["examples.custom_strategy"]) as reg:
        return await drive(reg, task, n)


async def drive(reg: SessionRegistry, task: str, n: int) -> dict[str, Any]:
    sid, event = await reg.start_execution("draft-vote", {"task": task, "n": n})
    while isinstance(event, Paused):
        queries = event.queries  # this round's; `event` moves on as they are answered
        for query in queries:
            event = await reg.feed_response(sid, query.id, answer(query.prompt))
    assert isinstance(event, Finished)
    status = await reg.status(sid)
    return {"session_id": sid, **event.to_json(sid), "progress": status["metrics"].get("progress"),
            "logs": [entry["message"] for entry in status["metrics"]["recent_logs"]]}


if __name__ == "__main__":
    # Run as a program this file is ``__main__``, and its @strategy has registered here.
    # The embedded workers import ``examples.custom_strategy``: let them find this module
    # rather than run it a second time (which would register "draft-vote" twice).
    sys.modules.setdefault("examples.custom_strategy", sys.modules[__name__])
    out = asyncio.run(host(sys.argv[1] if len(sys.argv) > 1 else "Name a cache",
                           int(sys.argv[2]) if len(sys.argv) > 2 else 3))
    print(json.dumps(out, indent=2))
