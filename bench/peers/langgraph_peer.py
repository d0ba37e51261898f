"""LangGraph: interrupt/resume, with its Postgres checkpointer and with ``InMemorySaver``.

A one-node graph whose (async) node loops K times over ``interrupt(question)``; the host
starts a thread with ``ainvoke`` (it returns at the first interrupt) and answers each question
with ``ainvoke(Command(resume="ok"))``, which returns at the next interrupt or at the end. On
each resume LangGraph re-runs the node from the top, handing the earlier ``interrupt()`` calls
their recorded answers: that is its interrupt design, so it is measured as such.

There are no worker processes: the graph runs inside the host process, so throughput is keyed
by sessions in flight (``throughput_by="sessions"``), all in one process on one event loop.

Postgres: ``AsyncPostgresSaver`` over a psycopg ``AsyncConnectionPool`` (autocommit, no
prepared statements, as its documentation sets it up) in a database created for the run.
Durability: LangGraph's default ``"async"`` mode writes checkpoints in the background of a run
but waits for them before ``ainvoke`` returns, so each pause is on disk when the host holds
its question, like every other durable peer here.
"""

from __future__ import annotations

import sys
from typing import Any, TypedDict

from ..stats import now
from . import (
    PeerConfig,
    PeerResult,
    Record,
    SessionFn,
    fresh_database,
    main,
    measure_latency,
    measure_throughput,
    parse_config,
    run_prefix,
    versions,
)

POOL_SIZE = 20


class State(TypedDict, total=False):
    k: int
    answers: list[str]


def build_graph(checkpointer: Any) -> Any:
    from langgraph.graph import END, START, StateGraph
    from langgraph.types import interrupt

    async def ask(state: State) -> State:
        answers = [interrupt(f"question {i}") for i in range(state["k"])]
        return {"answers": answers}

    builder = StateGraph(State)
    builder.add_node("ask", ask)
    builder.add_edge(START, "ask")
    builder.add_edge("ask", END)
    return builder.compile(checkpointer=checkpointer)


def make_session(graph: Any, prefix: str, k: int, durability: str | None) -> SessionFn:
    from langgraph.types import Command

    kw: dict[str, Any] = {} if durability is None else {"durability": durability}

    def question(out: dict[str, Any]) -> str | None:
        intr = out.get("__interrupt__")
        return str(intr[0].value) if intr else None

    async def session(sid: str, record: Record) -> None:
        config = {"configurable": {"thread_id": f"{prefix}-{sid}"}}
        out = await graph.ainvoke({"k": k}, config, **kw)
        if question(out) != "question 0":
            raise RuntimeError(f"langgraph: no first question for {sid}: {out!r}")
        for i in range(1, k + 1):
            t0 = now()
            out = await graph.ainvoke(Command(resume="ok"), config, **kw)
            record(now() - t0)
            want = f"question {i}" if i < k else None
            if question(out) != want or (want is None and len(out.get("answers", [])) != k):
                raise RuntimeError(f"langgraph: step {i} of {sid} gave {out!r}")

    return session


async def _measure(name: str, graph: Any, cfg: PeerConfig, durability: str | None) -> PeerResult:
    session = make_session(graph, run_prefix(name), cfg.k, durability)
    latency = await measure_latency(session, cfg)
    await measure_throughput(
        session, _short(cfg), tag="warm"
    )  # connections and caches at steady state
    tp = await measure_throughput(session, cfg)
    return PeerResult(
        name=name,
        latency=latency,
        throughput={cfg.in_flight: tp},
        throughput_by="sessions",
        versions=versions("langgraph", "langgraph-checkpoint-postgres", "psycopg"),
    )


def _short(cfg: PeerConfig) -> PeerConfig:
    from dataclasses import replace

    return replace(cfg, ramp_s=0.0, window_s=0.5)


async def run(cfg: PeerConfig, durability: str | None = None) -> PeerResult:
    from langgraph.checkpoint.postgres.aio import AsyncPostgresSaver
    from psycopg.rows import dict_row
    from psycopg_pool import AsyncConnectionPool

    async with (
        fresh_database(cfg, "alc_bench_langgraph") as url,
        AsyncConnectionPool(
            url,
            min_size=POOL_SIZE,
            max_size=POOL_SIZE,
            open=False,
            kwargs={"autocommit": True, "prepare_threshold": 0, "row_factory": dict_row},
        ) as pool,
    ):
        saver = AsyncPostgresSaver(pool)  # type: ignore[arg-type]
        await saver.setup()
        res = await _measure("langgraph-postgres", build_graph(saver), cfg, durability)
    res.notes = (
        f"one node, K interrupt() calls; AsyncPostgresSaver on a pool of {POOL_SIZE}; "
        f"durability {durability or 'async (default)'}; runs in the host process"
    )
    return res


async def run_memory(cfg: PeerConfig) -> PeerResult:
    from langgraph.checkpoint.memory import InMemorySaver

    res = await _measure("langgraph-memory", build_graph(InMemorySaver()), cfg, None)
    res.notes = "one node, K interrupt() calls; InMemorySaver (not durable); in the host process"
    res.durable = False
    res.versions = versions("langgraph", "langgraph-checkpoint")
    return res


if __name__ == "__main__":
    _cfg, _args = parse_config(sys.argv[1:])
    main(run_memory if _args.saver == "memory" else run)
