"""Multi-process tests: real redis-server, real worker processes started through the CLI,
and the CLI itself as a subprocess.

Worker processes run ``python -m coordinator worker`` with short leases / claim times from
``ALC_*`` environment variables, so a job whose worker was SIGKILLed is taken over within a
few seconds. Every subprocess is killed at teardown, whatever the test's outcome.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import re
import signal
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from coordinator.errors import WaitTimeout
from coordinator.keys import JOB_GROUP, Keys
from coordinator.models import Accepted, Finished, Paused
from coordinator.registry import SessionRegistry
from coordinator.states import Phase
from tests.helpers import assert_eventually
from tests.procs import (
    FAST_SETTINGS,
    ROOT,
    STRATEGIES,
    WAIT_S,
    WorkerPool,
    WorkerProc,
    answer_for,
    clean_env,
    cli_argv,
    run_cli,
)
from tests.strategies_mp import expected_rounds, prompt_for

pytestmark = [pytest.mark.redis, pytest.mark.slow]


@pytest.fixture
async def registries(redis_url: str, namespace: str) -> AsyncIterator[list[SessionRegistry]]:
    """Three registries with separate Redis clients (three "hosts")."""
    regs = [SessionRegistry.from_url(redis_url, namespace=namespace, **FAST_SETTINGS)
            for _ in range(3)]
    try:
        yield regs
    finally:
        for reg in regs:
            await reg.aclose()


# -- 1. SIGKILL one of two workers under 20 concurrent sessions ----------------------------

SESSIONS = 20
ROUNDS = 5
WIDTH = 3
KILL_AFTER_ROUNDS = (SESSIONS * ROUNDS * 2) // 5  # 40 % of all rounds


@dataclass
class ChaosRun:
    """Drives SESSIONS sessions of mp-rounds from three registries and SIGKILLs the worker
    holding the most live sessions once KILL_AFTER_ROUNDS rounds are done (a shared counter,
    bumped as each round settles: no sleeps)."""

    registries: list[SessionRegistry]
    workers: dict[str, WorkerProc]  # worker id -> process
    keys: Keys
    rng: random.Random
    ctx: str
    rounds_done: int = 0
    sids: dict[int, str] = field(default_factory=dict)
    unfinished: set[str] = field(default_factory=set)
    victim: WorkerProc | None = None
    survivor: WorkerProc | None = None
    #: Sessions not finished, last committed by the victim, once it was dead.
    orphaned: list[str] = field(default_factory=list)
    rounds_at_kill: int = 0

    @property
    def observer(self) -> Any:
        return self.registries[0].client

    async def holders_of_live_sessions(self) -> dict[str, list[str]]:
        """Worker id -> the unfinished sessions whose last step it committed."""
        holders: dict[str, list[str]] = {wid: [] for wid in self.workers}
        live = sorted(self.unfinished)  # a copy: other drivers change the set meanwhile
        pipe = self.observer.pipeline(transaction=False)
        for sid in live:
            pipe.hmget(self.keys.session(sid).session, ["holder", "phase"])
        for sid, (raw, phase) in zip(live, await pipe.execute(), strict=True):
            if raw is not None and raw.decode() in holders and not Phase(phase.decode()).terminal:
                holders[raw.decode()].append(sid)
        return holders

    async def kill_a_holder(self) -> None:
        holders = await self.holders_of_live_sessions()
        victim_id = max(holders, key=lambda w: len(holders[w]))
        self.victim = self.workers[victim_id]
        self.victim.proc.send_signal(signal.SIGKILL)
        self.rounds_at_kill = self.rounds_done
        self.survivor = next(w for wid, w in self.workers.items() if wid != victim_id)
        await asyncio.to_thread(self.victim.proc.wait, WAIT_S)
        self.orphaned = (await self.holders_of_live_sessions())[victim_id]

    async def feed_round(self, regs: list[SessionRegistry], sid: str, ev: Paused) -> Any:
        """Answer one round: one task per query id, each through its own registry (client),
        started in a random order so answers arrive out of order and concurrently."""
        ids = [q.id for q in ev.queries]
        assert ids == [f"q-{i}" for i in range(WIDTH)], f"{sid}: pending {ids} {self.ctx}"
        order = list(ev.queries)
        self.rng.shuffle(order)
        tasks = [
            asyncio.create_task(regs[int(q.id[2:])].feed_response(
                sid, q.id, answer_for(q.prompt), timeout=WAIT_S))
            for q in order
        ]
        results = await asyncio.gather(*tasks)
        settled = [r for r in results if not isinstance(r, Accepted)]
        accepted = sorted(r.remaining for r in results if isinstance(r, Accepted))
        assert len(settled) == 1 and accepted == list(range(1, WIDTH)), (
            f"{sid}: a round of {WIDTH} feeds must give Accepted(2), Accepted(1) and exactly "
            f"one settled event, got {results} {self.ctx}"
        )
        return settled[0]

    async def drive(self, n: int) -> Any:
        regs = self.registries[n % 3:] + self.registries[: n % 3]  # vary who feeds what
        sid = await regs[0].submit(
            "mp-rounds", {"tag": f"s{n}", "rounds": ROUNDS, "width": WIDTH})
        self.sids[n] = sid
        self.unfinished.add(sid)
        ev = await regs[1].wait_event(sid, timeout=WAIT_S)
        while isinstance(ev, Paused):
            ev = await self.feed_round(regs, sid, ev)
            self.rounds_done += 1
            if self.rounds_done == KILL_AFTER_ROUNDS:
                await self.kill_a_holder()
        self.unfinished.discard(sid)
        return ev

    async def check_session(self, n: int, ev: Any) -> None:
        sid, tag, ctx = self.sids[n], f"s{n}", self.ctx
        assert isinstance(ev, Finished), f"{sid}: {ev} {ctx}"
        assert ev.state is Phase.COMPLETED, f"{sid}: {ev.state} error={ev.error} {ctx}"
        assert ev.result == {
            "tag": tag, "rounds": expected_rounds(tag, ROUNDS, WIDTH, answer_for)
        }, f"{sid}: wrong result {ev.result} {ctx}"
        # Each round applied exactly once: counters and the replay journal agree.
        assert ev.metrics["auto"]["rounds"] == ROUNDS, (sid, ev.metrics, ctx)
        assert ev.metrics["auto"]["pauses"] == ROUNDS, (sid, ev.metrics, ctx)
        assert ev.metrics["auto"]["llm_calls"] == ROUNDS * WIDTH, (sid, ev.metrics, ctx)
        sk = self.keys.session(sid)
        assert await self.observer.llen(sk.journal) == ROUNDS, (sid, ctx)
        if sid in self.orphaned:  # it was the victim's: the survivor finished it
            assert self.survivor is not None
            holder = (await self.observer.hget(sk.session, "holder") or b"").decode()
            assert holder == self.survivor.worker_id, (sid, holder, ctx)
        # A host re-attaching afterwards sees the very same final event.
        assert await self.registries[2].wait_event(sid, timeout=WAIT_S) == ev


async def test_sigkill_one_worker_mid_run_remaining_worker_finishes_every_session(
    redis_url: str, namespace: str, worker_pool: WorkerPool, registries: list[SessionRegistry]
) -> None:
    seed = random.randrange(2**32)
    ctx = f"(seed {seed}, namespace {namespace})"
    first = await worker_pool.start(concurrency=4)
    second = await worker_pool.start(concurrency=4)
    run = ChaosRun(registries, {first.worker_id: first, second.worker_id: second},
                   Keys(namespace), random.Random(seed), ctx)

    started = time.monotonic()
    try:
        events = await asyncio.gather(*(run.drive(n) for n in range(SESSIONS)))
    except BaseException as exc:
        raise AssertionError(f"driving the sessions failed {ctx}: {exc!r}\n"
                             f"{worker_pool.logs()}") from exc
    elapsed = time.monotonic() - started

    assert run.victim is not None and run.survivor is not None, f"no kill happened {ctx}"
    assert run.victim.proc.returncode == -signal.SIGKILL
    assert run.survivor.proc.poll() is None, f"the survivor died:\n{run.survivor.log_tail()}"
    assert run.orphaned, f"the victim held no live session when killed: no takeover {ctx}"
    assert run.rounds_done == SESSIONS * ROUNDS
    for n, ev in enumerate(events):
        await run.check_session(n, ev)

    # No job is left pending on any consumer (the dead worker's were claimed and acked).
    async def no_pending_jobs() -> bool:
        info = await run.observer.xpending(run.keys.jobs, JOB_GROUP)
        return int(info["pending"]) == 0

    await assert_eventually(no_pending_jobs, timeout=10,
                            message=f"jobs left pending after every session finished {ctx}")
    assert elapsed < 60, f"took {elapsed:.1f} s {ctx}"


# -- 2. cross-process re-attach -------------------------------------------------------------


async def test_reattach_from_other_registries_and_processes(
    redis_url: str, namespace: str, worker_pool: WorkerPool, registries: list[SessionRegistry]
) -> None:
    await worker_pool.start(concurrency=2)
    reg_a, reg_b, reg_c = registries
    sid = await reg_a.submit("mp-slow", {"tag": "t", "delay": 1.0})

    # A and C (separate clients) both see the first pause, identically.
    first = await reg_c.wait_event(sid, timeout=WAIT_S)
    assert isinstance(first, Paused)
    assert [q.id for q in first.queries] == ["q-0", "q-1"]
    assert await reg_a.wait_event(sid, timeout=WAIT_S) == first

    # B answers half the round; C sees only the query still unanswered.
    assert await reg_b.feed_response(sid, "q-1", "B1") == Accepted(1)
    half = await reg_c.wait_event(sid, timeout=WAIT_S)
    assert isinstance(half, Paused)
    assert [q.id for q in half.queries] == ["q-0"]

    # B's own wait runs out while the (slow) step runs; the session carries on, and C
    # re-attaches to the same next event.
    with pytest.raises(WaitTimeout) as info:
        await reg_b.feed_response(sid, "q-0", "B0", timeout=0.05)
    assert info.value.session_id == sid and info.value.state == "running"
    second = await reg_c.wait_event(sid, timeout=WAIT_S)
    assert isinstance(second, Paused)
    assert [q.prompt for q in second.queries] == ["t second"]
    assert await reg_b.wait_event(sid, timeout=WAIT_S) == second
    assert await reg_a.wait_event(sid, timeout=WAIT_S) == second

    # The last answer comes from another process (the CLI); C waits on the running step
    # in this process and gets the event that process printed.
    feeder = asyncio.create_task(run_cli("continue", sid, "from-cli", "--redis", redis_url,
                                         "--namespace", namespace, "--timeout", str(WAIT_S)))

    async def running() -> bool:
        if feeder.done():
            raise AssertionError(f"the CLI feed ended early: {feeder.result()}")
        return (await reg_a.status(sid))["phase"] == "running"

    try:
        await assert_eventually(running, timeout=WAIT_S, interval=0.01,
                                message="the CLI's feed never made the session run")
        final = await reg_c.wait_event(sid, timeout=WAIT_S)
        out = await feeder
    finally:
        if not feeder.done():
            feeder.cancel()  # run_cli kills its subprocess when cancelled
            with contextlib.suppress(asyncio.CancelledError):
                await feeder
    assert out.code == 0, str(out)
    assert isinstance(final, Finished) and final.state is Phase.COMPLETED, final
    assert final.result == {"tag": "t", "first": ["B0", "B1"], "second": "from-cli"}
    assert out.json() == {"session_id": sid, **final.to_json(sid)}
    assert await reg_a.wait_event(sid, timeout=WAIT_S) == final
    status = await reg_b.status(sid)
    assert status["state"] == "terminal" and status["result"] == final.result


async def test_many_fresh_hosts_attach_to_a_session_at_once(
    redis_url: str, namespace: str, worker_pool: WorkerPool
) -> None:
    """Hosts that come up and immediately wait on sessions concurrently (a web server
    handling a burst of re-attach requests) must all get the event, not a WaitTimeout
    about an unconfirmed subscription."""
    await worker_pool.start(concurrency=2)
    async with SessionRegistry.from_url(redis_url, namespace=namespace,
                                        **FAST_SETTINGS) as starter:
        sid, first = await starter.start_execution(
            "mp-rounds", {"tag": "fresh", "rounds": 1, "width": 2}, timeout=WAIT_S)
        assert isinstance(first, Paused)
        hosts = [SessionRegistry.from_url(redis_url, namespace=namespace, **FAST_SETTINGS)
                 for _ in range(10)]
        try:
            seen = await asyncio.gather(*(
                host.wait_event(sid, timeout=WAIT_S) for host in hosts for _ in range(4)
            ), return_exceptions=True)
        finally:
            for host in hosts:
                await host.aclose()
    failures = [e for e in seen if isinstance(e, BaseException)]
    assert not failures, (
        f"{len(failures)} of {len(seen)} concurrent first waits failed: {failures[0]!r}"
    )
    assert all(ev == first for ev in seen)


# -- 3. the CLI: run (embedded and real), start / continue / status / cancel ---------------


async def test_cli_run_embedded_without_redis_url() -> None:
    out = await run_cli("run", "reflect", "--task", "x", "--responder", "echo")
    assert out.code == 0, str(out)
    body = out.json()
    assert body["status"] == "completed", str(out)
    assert body["session_id"].startswith("s-")
    draft = "Task: x\n\nProvide a thorough response."
    assert body["result"]["output"] == draft  # echo: the answer is the prompt
    # ... so the critique repeats "output: NO_MAJOR_ISSUES" and reflect stops at round 1
    assert len(body["result"]["rounds"]) == 1 and body["result"]["converged"] is True
    assert body["stats"]["auto"]["llm_calls"] == 2 and body["stats"]["auto"]["rounds"] == 2
    assert "embedded" in out.stderr


async def test_cli_whose_reader_went_away_exits_quietly() -> None:
    """``coordinator ... | head``: the reader closing the pipe early is no crash. The command
    exits as a shell reports a SIGPIPE (141), with nothing on stderr but its own notes."""
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before the first write
    try:
        proc = await asyncio.create_subprocess_exec(
            *cli_argv("run", "reflect", "--task", "x", "--responder", "echo"),
            cwd=ROOT, env=clean_env(), stdin=asyncio.subprocess.DEVNULL, stdout=write_end,
            stderr=asyncio.subprocess.PIPE)
    finally:
        os.close(write_end)
    _, err = await asyncio.wait_for(proc.communicate(), WAIT_S)
    assert proc.returncode == 141, err.decode()
    assert b"Traceback" not in err and b"BrokenPipe" not in err, err.decode()


async def test_cli_run_against_real_server_with_a_worker_process(
    redis_url: str, namespace: str, worker_pool: WorkerPool
) -> None:
    await worker_pool.start()
    real = await run_cli("run", "reflect", "--task", "x", "--responder", "echo",
                         "--redis", redis_url, "--namespace", namespace, "--timeout", "30")
    assert real.code == 0, f"{real}\n{worker_pool.logs()}"
    body = real.json()
    assert body["status"] == "completed"
    assert "embedded" not in real.stderr
    # The same strategy with the same (echo) answers gives the same result either way.
    embedded = (await run_cli("run", "reflect", "--task", "x", "--responder", "echo",
                              "--json")).json()
    assert body["result"] == embedded["result"]
    assert body["stats"]["auto"]["rounds"] == embedded["stats"]["auto"]["rounds"] == 2


async def test_cli_start_continue_status_cancel_round_trip(
    redis_url: str, namespace: str, worker_pool: WorkerPool
) -> None:
    await worker_pool.start()
    conn = ("--redis", redis_url, "--namespace", namespace)

    async def cli(*args: str, code: int = 0) -> Any:
        out = await run_cli(*args, *conn)
        assert out.code == code, f"{args}: {out}\n{worker_pool.logs()}"
        assert "Traceback" not in out.stderr, str(out)
        return out.json()

    started = await cli("start", "reflect", "--input", '{"task": "x", "max_rounds": 1}')
    sid = started["session_id"]
    assert started == {
        "session_id": sid, "status": "needs_response", "query_id": "q-0",
        "prompt": "Task: x\n\nProvide a thorough response.",
        "system": "You are an expert. Produce a high-quality, detailed response.",
        "max_tokens": 500,
    }

    snap = await cli("status", sid, "--pending", "full")
    assert snap["session_id"] == sid
    assert (snap["state"], snap["phase"], snap["strategy"]) == ("paused", "paused", "reflect")
    assert snap["pending_queries"] == 1
    assert [p["query_id"] for p in snap["pending"]] == ["q-0"]
    assert snap["pending"][0]["prompt"] == started["prompt"]
    assert {"elapsed_ms", "llm_calls", "rounds", "tokens", "recent_logs"} <= set(snap["metrics"])
    listing = await cli("status", "--json")
    assert set(listing) == {sid} and listing[sid]["phase"] == "paused"
    table = await run_cli("status", *conn)
    assert table.code == 0 and sid in table.stdout and "workers: 1" in table.stdout, str(table)
    assert re.search(r"busy \d+/\d+, live \d+; steps \d+ \(replays \d+", table.stdout), table

    crit = await cli("continue", sid, "my draft")
    assert crit["status"] == "needs_response" and crit["session_id"] == sid
    assert crit["query_id"] == "q-0" and "my draft" in crit["prompt"]
    assert (await cli("continue", sid, "my critique", "--query-id", "q-0"))["status"] == (
        "needs_response")
    done = await cli("continue", sid, "final text")
    assert done["status"] == "completed"
    assert done["result"] == {"output": "final text", "total_rounds": 1, "converged": False,
                              "rounds": [{"round": 1, "critique": "my critique",
                                          "converged": False}]}
    assert done["stats"]["auto"]["rounds"] == 3 and done["stats"]["auto"]["llm_calls"] == 3
    finished = await cli("status", sid)
    assert (finished["state"], finished["phase"]) == ("terminal", "completed")
    assert finished["result"] == done["result"]
    assert await cli("status", "--json") == {}  # finished sessions leave the registry

    # A second session, cancelled while paused.
    other = (await cli("start", "cot", "--task", "y"))["session_id"]
    cancelled = await cli("cancel", other)
    assert cancelled["status"] == "cancelled" and "stats" in cancelled
    after = await cli("status", other)
    assert (after["state"], after["phase"]) == ("terminal", "cancelled")
    # Feeding or cancelling it again is a clean JSON error with exit code 2.
    late = await cli("continue", other, "too late", "--query-id", "q-0", code=2)
    assert late["status"] == "error" and late["type"] == "invalid_transition", late
    again = await cli("cancel", other, code=2)
    assert again["status"] == "error" and again["type"] == "invalid_transition", again
    missing = await cli("status", "s-0-doesnotexist", code=3)  # not_found
    assert missing["status"] == "error" and missing["type"] == "not_found", missing


@pytest.mark.parametrize("args", [
    ("start", "reflect", "--task", "x"),
    ("continue", "s-0-abc", "answer"),
    ("status",),
    ("cancel", "s-0-abc"),
])
async def test_cli_host_commands_without_redis_url_fail_cleanly(args: tuple[str, ...]) -> None:
    out = await run_cli(*args)
    assert out.code != 0, str(out)
    assert "Traceback" not in out.stderr, str(out)
    body = out.json()
    assert body["status"] == "error" and body["type"] == "invalid_input", body
    assert "Redis URL" in body["error"] and "REDIS_URL" in body["error"], body


# -- 4. run with a command responder --------------------------------------------------------


async def test_cli_run_with_command_responder_uppercases() -> None:
    out = await run_cli("run", "mp-rounds", "--input",
                        json.dumps({"tag": "cmd", "rounds": 2, "width": 3}),
                        "--import", STRATEGIES, "--responder", "cmd:tr a-z A-Z", "--json")
    assert out.code == 0, str(out)
    body = out.json()
    assert body["status"] == "completed", body
    assert body["result"] == {"tag": "cmd",
                              "rounds": expected_rounds("cmd", 2, 3, str.upper)}


async def test_cli_run_with_command_responder_sees_query_env_against_real_server(
    redis_url: str, namespace: str, worker_pool: WorkerPool
) -> None:
    await worker_pool.start()
    out = await run_cli("run", "mp-rounds", "--input",
                        json.dumps({"tag": "wc", "rounds": 2, "width": 3}),
                        "--responder", "cmd:printf '%s:' \"$ALC_QUERY_ID\"; wc -c",
                        "--redis", redis_url, "--namespace", namespace, "--json")
    assert out.code == 0, f"{out}\n{worker_pool.logs()}"
    body = out.json()
    assert body["status"] == "completed", body
    expected = [[f"q-{i}:{len(prompt_for('wc', r, i).encode())}" for i in range(3)]
                for r in range(2)]
    assert [[a.replace(" ", "") for a in row] for row in body["result"]["rounds"]] == expected


async def test_cli_run_with_failing_command_responder_reports_error() -> None:
    out = await run_cli("run", "reflect", "--task", "x", "--responder",
                        "cmd:echo broken >&2; exit 3")
    assert out.code == 1, str(out)  # the session is cancelled: run ends as for a failure
    assert "Traceback" not in out.stderr, str(out)
    error = json.loads(out.stderr.strip().splitlines()[-1])
    assert error["status"] == "error"
    assert "exited with 3" in error["error"] and "broken" in error["error"], error
