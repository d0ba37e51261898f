"""What the HTTP API and the MCP server share: one meaning for each host call.

Both fronts are thin layers over ``SessionRegistry``; keeping the few decisions they make
(which query a bare response answers, how a batch is fed, which HTTP status an error is)
here means an answer fed over MCP and one fed over HTTP can never behave differently.
This module imports no optional dependency, so either front can load without the other's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .errors import InvalidInput, SessionError
from .models import FeedResult
from .registry import SessionRegistry


def http_status(exc: SessionError) -> int:
    """The HTTP status of a coordinator error: its class says (``errors.vocabulary``)."""
    return exc.http_status


@dataclass(frozen=True, slots=True)
class Answer:
    """One answer of a batch: algocline's ``{query_id, response, usage}``."""

    query_id: str
    response: str
    usage: dict[str, int] | None = None


_INT_MIN, _INT_MAX = -(2**63), 2**64 - 1  # what msgpack can store


def describe_validation(errors: Sequence[Any]) -> str:
    """pydantic's validation errors (a front's schema refusing a request) as one line a
    person can act on: where, and what was expected. The rejected values are left out:
    they are the caller's data, and may be huge."""
    parts = []
    for err in list(errors)[:5]:
        where = ".".join(str(p) for p in err.get("loc", ())) or "the arguments"
        parts.append(f"{where}: {err.get('msg', 'invalid')}")
    more = len(errors) - 5
    if more > 0:
        parts.append(f"and {more} more")
    return "; ".join(parts) or "invalid request"


def check_wire(value: Any, what: str) -> None:
    """Refuse what JSON can carry but Redis cannot store: lone surrogates (not encodable
    as UTF-8) and integers beyond 64 bits. Caught here they are a 422 naming the field,
    not an encoding crash (a 500) deep in the registry."""
    stack: list[tuple[Any, str]] = [(value, what)]
    while stack:
        item, where = stack.pop()
        if isinstance(item, str):
            _check_utf8(item, where)
        elif isinstance(item, bool) or item is None or isinstance(item, float):
            continue
        elif isinstance(item, int):
            if not _INT_MIN <= item <= _INT_MAX:
                raise InvalidInput(f"{where} holds an integer outside the 64-bit range")
        elif isinstance(item, dict):
            for key, sub in item.items():
                _check_utf8(str(key), f"a key of {where}")
                stack.append((sub, f"{where}.{key}"))
        elif isinstance(item, list | tuple):
            stack.extend((sub, f"{where}[{n}]") for n, sub in enumerate(item))


def _check_utf8(text: str, where: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidInput(f"{where} holds a lone surrogate and is not valid Unicode") from None


async def start(
    reg: SessionRegistry,
    strategy: str,
    input: dict[str, Any] | None,
    budget: dict[str, int] | None = None,
    timeout: float | None = None,
    *,
    ttl: float | None = None,
    idempotency_key: str | None = None,
) -> dict[str, Any]:
    """Start a session; its first event, with ``session_id`` first so every host finds it.
    A ``ctx.budget`` inside ``input`` (algocline's place for it) is the budget when
    ``budget`` is not given (the registry reads it there)."""
    check_wire(strategy, "strategy")
    check_wire(input, "input")
    check_wire(budget, "budget")
    check_wire(idempotency_key, "idempotency_key")
    sid, res = await reg.start_execution(strategy, input, budget=budget, timeout=timeout,
                                         ttl=ttl, idempotency_key=idempotency_key)
    return {"session_id": sid, **res.to_json(sid)}


async def feed(
    reg: SessionRegistry,
    session_id: str,
    *,
    response: str | None = None,
    query_id: str | None = None,
    usage: dict[str, int] | None = None,
    responses: Sequence[Answer] | None = None,
    timeout: float | None = None,
    round: int | None = None,
) -> dict[str, Any]:
    """algocline's three ``alc_continue`` modes: a bare response (to the one pending query),
    a response to ``query_id``, or a batch. A batch is fed in order; the result is the last
    feed's (``accepted`` while answers remain, else the next event). A failing answer stops
    the batch: the answers before it stay recorded, and the error names its query.
    ``round`` (the snapshot's ``round``) pins every answer to that round: a session at
    another one refuses it (``StaleRound``) and nothing is written, so an answer typed
    against a page that went stale (another tab answered) never lands on the next round's
    ``q-0``."""
    check_wire(session_id, "session_id")
    check_wire(query_id, "query_id")
    check_wire(response, "response")
    check_wire(usage, "usage")
    for n, a in enumerate(responses or ()):
        check_wire(a.query_id, f"responses[{n}].query_id")
        check_wire(a.response, f"responses[{n}].response")
        check_wire(a.usage, f"responses[{n}].usage")
    if responses is not None:
        if response is not None or query_id is not None:
            raise InvalidInput("give either `responses` (a batch) or `response` "
                               "(with an optional `query_id`), not both")
        return await _feed_batch(reg, session_id, responses, timeout, round)
    if response is None:
        raise InvalidInput("either `response` or `responses` must be provided")
    qid = query_id if query_id is not None else await reg.resolve_sole_pending_id(session_id)
    res = await reg.feed_response(session_id, qid, response, usage, round=round,
                                  timeout=timeout)
    return res.to_json(session_id)


async def _feed_batch(
    reg: SessionRegistry, session_id: str, answers: Sequence[Answer], timeout: float | None,
    round: int | None = None,
) -> dict[str, Any]:
    if not answers:
        raise InvalidInput("`responses` is empty: give at least one {query_id, response}")
    seen: set[str] = set()
    for a in answers:
        if a.query_id in seen:
            raise InvalidInput(f"query {a.query_id!r} appears twice in `responses`",
                               session_id=session_id, query_id=a.query_id)
        seen.add(a.query_id)
    res: FeedResult | None = None
    for a in answers:
        res = await reg.feed_response(session_id, a.query_id, a.response, a.usage,
                                      round=round, timeout=timeout)
    assert res is not None
    return res.to_json(session_id)


async def cancel(reg: SessionRegistry, session_id: str) -> dict[str, Any]:
    check_wire(session_id, "session_id")
    res = await reg.cancel(session_id)
    return {"session_id": session_id, **res.to_json(session_id)}


async def observe(
    reg: SessionRegistry,
    session_id: str | None,
    pending_filter: str | dict[str, Any] | None = None,
    include_history: bool = False,
) -> dict[str, Any]:
    """One session's status, or every paused session's snapshot keyed by id."""
    check_wire(session_id, "session_id")
    check_wire(pending_filter, "pending_filter")
    if session_id:
        return await reg.status(session_id, pending_filter, include_history)
    return await reg.list_snapshots(pending_filter, include_history)


async def sessions(
    reg: SessionRegistry,
    phase: str | None = None,
    strategy: str | None = None,
    limit: int = 100,
    cursor: str | None = None,
    pending_filter: str | dict[str, Any] | None = None,
    include_history: bool = False,
) -> dict[str, Any]:
    """A page of sessions with the counts per phase: bounded whatever the namespace holds,
    so a host (an LLM's context above all) is never flooded. ``active_sessions`` counts the
    running and paused ones, as algocline's ``alc_status`` does."""
    for value, what in ((phase, "phase"), (strategy, "strategy"), (cursor, "cursor"),
                        (pending_filter, "pending_filter")):
        check_wire(value, what)
    page = await reg.list_sessions(phase, strategy, limit, cursor,
                                   pending_filter=pending_filter,
                                   include_history=include_history)
    counts = await reg.counts()
    return {"active_sessions": counts["running"] + counts["paused"], "counts": counts,
            **page.to_json()}


async def strategies(reg: SessionRegistry) -> dict[str, Any]:
    """What live workers offer, by name: description, input parameters, live workers."""
    offered = await reg.strategies()
    return {"strategies": [offered[name] for name in sorted(offered)]}


async def live_workers(reg: SessionRegistry) -> list[str]:
    """Workers whose heartbeat key still exists: the index alone keeps dead workers until
    the next sweep, and only the key's TTL says a worker is alive now."""
    return sorted(await reg.worker_stats())


async def workers(reg: SessionRegistry, dead: int = 20) -> dict[str, Any]:
    """The fleet as an operator's page shows it: each live worker's last heartbeat report
    under its ``worker_id`` (sorted by id), the dead-letter total and the newest ``dead``
    dead letters (over every shard, newest first)."""
    stats = await reg.worker_stats()
    total, letters = await reg.dead_letters(dead)
    return {"workers": [{"worker_id": wid, **stats[wid]} for wid in sorted(stats)],
            "dead_letter_count": total, "dead_letters": letters}
