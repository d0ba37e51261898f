"""Drives a strategy of ``workers.library`` to its end with a scripted responder.

The responder is a function of the prompt, so a test knows every answer, and the driver
records every round's questions as asked: the test checks how many rounds, how many
questions in each, in which order, and with which options. Each round is answered in
reverse query order, so a strategy reading its answers by position rather than by query
would show it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from coordinator import Paused, SessionRegistry
from coordinator.models import LlmQuery

Responder = Callable[[str], str]


@dataclass
class Run:
    """What a session asked, round by round, and how it ended."""

    session_id: str
    rounds: list[tuple[LlmQuery, ...]]
    end: Any  # a Finished, unless the run was stopped early

    @property
    def result(self) -> Any:
        assert self.end.error is None, self.end.error
        return self.end.result

    def prompts(self) -> list[list[str]]:
        return [[q.prompt for q in r] for r in self.rounds]

    def shape(self) -> list[int]:
        """The number of questions of each round."""
        return [len(r) for r in self.rounds]


async def answer_round(reg: SessionRegistry, sid: str, event: Paused,
                       respond: Responder) -> Any:
    """Answer every query of the round (last first); the event after the last answer."""
    nxt: Any = None
    for query in reversed(event.queries):
        nxt = await reg.feed_response(sid, query.id, respond(query.prompt), timeout=10)
    return nxt


async def drive(reg: SessionRegistry, name: str, inp: dict[str, Any], respond: Responder,
                *, rounds: int | None = None) -> Run:
    """Start ``name`` on ``inp`` and answer it until it ends (or, with ``rounds``, until
    that many rounds are answered; ``end`` is then the event after them, not a Finished)."""
    sid, event = await reg.start_execution(name, inp, timeout=10)
    return await resume(reg, sid, event, respond, rounds=rounds)


async def resume(reg: SessionRegistry, sid: str, event: Any, respond: Responder, *,
                 rounds: int | None = None, asked: list[tuple[LlmQuery, ...]] | None = None
                 ) -> Run:
    """Answer ``sid`` from ``event`` on; ``asked`` are the rounds recorded so far."""
    seen = list(asked or [])
    done = 0
    while isinstance(event, Paused) and (rounds is None or done < rounds):
        seen.append(event.queries)
        event = await answer_round(reg, sid, event, respond)
        done += 1
    return Run(sid, seen, event)
