"""A Python host loop: start a strategy, answer every query it asks, print the result.

Run it from the repository root (after ``pip install -e .``):

    python examples/host_loop.py                         # cot on "What is 2+2?", embedded
    python examples/host_loop.py reflect "Design a cache" '{"max_rounds": 2}'

Without ``REDIS_URL`` it runs on the embedded default: an in-process Redis with two
in-process workers, nothing else needed. With ``REDIS_URL`` (and ``ALC_NAMESPACE``, default
``alc``) it is a host of that deployment, whose workers run the strategy:

    coordinator worker --redis redis://127.0.0.1:6379/0 &
    REDIS_URL=redis://127.0.0.1:6379/0 python examples/host_loop.py sc "2+2" '{"n": 3}'

Each query is answered by ``answer()``, a canned echo standing in for your LLM call; each
exchange is printed to stderr, the final result (the ``alc_continue`` JSON) to stdout.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from coordinator import Finished, LlmQuery, Paused, SessionRegistry, Settings
from coordinator.embedded import embedded


def answer(query: LlmQuery) -> str:
    """Your model goes here. The echo makes the run easy to follow: each answer names the
    first line of the prompt it answers."""
    return "echo: " + query.prompt.splitlines()[0]


@asynccontextmanager
async def registry() -> AsyncIterator[SessionRegistry]:
    """The deployment REDIS_URL names, or the embedded default when it is unset."""
    settings = Settings.from_url()  # REDIS_URL and ALC_* settings from the environment
    if settings.url is None:
        async with embedded(settings) as reg:
            yield reg
    else:
        async with SessionRegistry.from_url(settings.url, namespace=settings.namespace) as reg:
            yield reg


async def drive(reg: SessionRegistry, strategy: str, input: dict[str, Any]) -> dict[str, Any]:
    """Start the session, then answer each round's queries until it ends."""
    sid, event = await reg.start_execution(strategy, input)
    while isinstance(event, Paused):
        queries = event.queries  # this round's; `event` moves on as they are answered
        for query in queries:
            reply = answer(query)
            print(f"{sid} {query.id}: {query.prompt.splitlines()[0]!r} -> {reply!r}",
                  file=sys.stderr)
            # Accepted while other answers of the round are missing; then the next event.
            event = await reg.feed_response(sid, query.id, reply)
    assert isinstance(event, Finished)
    return {"session_id": sid, **event.to_json(sid)}


async def main(argv: list[str]) -> int:
    strategy = argv[0] if argv else "cot"
    task = argv[1] if len(argv) > 1 else "What is 2+2?"
    options = json.loads(argv[2]) if len(argv) > 2 else {}
    async with registry() as reg:
        result = await drive(reg, strategy, {"task": task, **options})
    print(json.dumps(result, indent=2))
    return 0 if result["status"] == "completed" else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main(sys.argv[1:])))
