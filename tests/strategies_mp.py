"""Strategies for the multi-process tests, loaded by worker processes with
``--import tests.strategies_mp`` (the worker runs with the repo root on ``PYTHONPATH``).

All are deterministic given their answers, and their results are a pure function of the
answers, so a test can compute the exact expected result: ``expected_rounds`` and
``expected_batches`` below.
"""

from __future__ import annotations

import asyncio
import os
import signal
from typing import Any

import redis

from workers.catalog import strategy
from workers.context import Context


def prompt_for(tag: str, round_no: int, index: int) -> str:
    return f"session {tag}: round {round_no}, item {index}"


def expected_rounds(
    tag: str, rounds: int, width: int, answer: Any
) -> list[list[str]]:
    """What ``mp-rounds`` returns when every query is answered with ``answer(prompt)``."""
    return [[answer(prompt_for(tag, r, i)) for i in range(width)] for r in range(rounds)]


@strategy("mp-rounds")
async def mp_rounds(
    ctx: Context, tag: str = "", rounds: int = 5, width: int = 3, **_: Any
) -> dict[str, Any]:
    """``rounds`` rounds of ``width`` queries each; returns every round's answers in query
    order, one list per applied round, so a round applied twice (or lost) shows."""
    collected: list[list[str]] = []
    for r in range(rounds):
        ctx.progress(r + 1, rounds, f"round {r}")
        answers = await ctx.llm_batch([prompt_for(tag, r, i) for i in range(width)])
        collected.append(list(answers))
    return {"tag": tag, "rounds": collected}


@strategy("mp-slow")
async def mp_slow(ctx: Context, tag: str = "", delay: float = 1.0, **_: Any) -> dict[str, Any]:
    """Round 1 asks two queries; every later step first sleeps ``delay`` seconds (live steps
    only, not replays), so a test can observe the session while it is ``running``."""
    first = await ctx.llm_batch([f"{tag} first a", f"{tag} first b"])
    if not ctx.replaying:
        await asyncio.sleep(delay)
    second = await ctx.llm(f"{tag} second")
    if not ctx.replaying:
        await asyncio.sleep(delay)
    return {"tag": tag, "first": list(first), "second": second}


# -- for the fault tests (tests/test_faults_*.py) -------------------------------------------


def batch_sizes(n: int, rounds: int) -> list[int]:
    """Round sizes (1 to 4 queries) of session number ``n``: a pure function of ``n``."""
    return [1 + (n + 3 * r) % 4 for r in range(rounds)]


def expected_batches(tag: str, sizes: list[int], answer: Any) -> list[list[str]]:
    """What ``mp-batches`` returns when every query is answered with ``answer(prompt)``."""
    return [[answer(prompt_for(tag, r, i)) for i in range(size)] for r, size in enumerate(sizes)]


@strategy("mp-batches")
async def mp_batches(
    ctx: Context, tag: str = "", sizes: list[int] | None = None, **_: Any
) -> dict[str, Any]:
    """One round per entry of ``sizes``, of that many queries; returns every applied round's
    answers in query order, so a round applied twice (or lost) shows in the result."""
    sizes = list(sizes or [])
    collected: list[list[str]] = []
    for r, size in enumerate(sizes):
        ctx.progress(r + 1, len(sizes), f"round {r}")
        answers = await ctx.llm_batch([prompt_for(tag, r, i) for i in range(size)])
        collected.append(list(answers))
    return {"tag": tag, "rounds": collected}


def hold_keys(tag: str) -> dict[str, str]:
    """Redis keys of an ``mp-hold`` session: ``taken`` (SET NX: only the first live step
    holds), ``entered`` (the holding process pushes its pid: "I am in the step now"), ``go``
    (the test pushes to let the held step go on)."""
    return {name: f"test-hold:{tag}:{name}" for name in ("taken", "entered", "go")}


def _hold_once(url: str, tag: str) -> None:
    keys = hold_keys(tag)
    client = redis.Redis.from_url(url)
    try:
        if client.set(keys["taken"], os.getpid(), nx=True, ex=600):
            client.rpush(keys["entered"], os.getpid())
            client.blpop([keys["go"]], timeout=120)
    finally:
        client.close()


@strategy("mp-hold")
async def mp_hold(ctx: Context, tag: str = "", url: str = "", **_: Any) -> dict[str, Any]:
    """Asks ``first``; the first live step after that answer (on whichever worker) is held
    mid-step, lock A held, until the test pushes to ``go``: it signals its pid on ``entered``
    and then blocks in a thread (CPU-idle), so the test can SIGSTOP or SIGKILL that process
    in the middle of a step. Later steps (a takeover, a replay) do not hold."""
    first = await ctx.llm(f"{tag} first")
    if url and not ctx.replaying:
        await asyncio.to_thread(_hold_once, url, tag)
    second = await ctx.llm(f"{tag} second after {first}")
    return {"tag": tag, "first": first, "second": second}


@strategy("mp-crash")
async def mp_crash(ctx: Context, tag: str = "", **_: Any) -> dict[str, Any]:
    """A poison session: every live step after the first answer kills its worker process
    (no commit, no ack, lock A left to expire), however often it is retried."""
    first = await ctx.llm(f"{tag} go?")
    if not ctx.replaying:
        os._exit(1)
    return {"tag": tag, "first": first}


# -- for the isolation tests (tests/test_isolation.py) ------------------------------------------


def block_keys(tag: str) -> dict[str, str]:
    """Redis keys of an ``mp-block`` session: ``pids`` (each blocking attempt pushes its
    process's pid, then blocks), ``modes`` (the test pushes how each attempt blocks)."""
    return {name: f"test-block:{tag}:{name}" for name in ("pids", "modes")}


@strategy("mp-block")
async def mp_block(ctx: Context, tag: str = "", url: str = "", **_: Any) -> dict[str, Any]:
    """Asks ``go?``; then every attempt at the next step (live or replayed) pushes its pid on
    ``pids`` and holds its worker's event loop for ever, as the next entry of ``modes`` says:
    ``spin`` (the default: ``while True: pass``, which the watchdog's signal interrupts),
    ``masked`` (the same with SIGUSR1 blocked first: the signal never lands) or ``gil`` (a C
    loop that holds the GIL: no other thread of the process runs, the watchdog's included)."""
    await ctx.llm(f"{tag} go?")
    client = redis.Redis.from_url(url)
    try:
        keys = block_keys(tag)
        client.rpush(keys["pids"], os.getpid())
        mode = client.lpop(keys["modes"]) or b"spin"
    finally:
        client.close()
    if mode == b"gil":
        sum(range(10**15))
    if mode == b"masked":
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
    while True:
        pass
