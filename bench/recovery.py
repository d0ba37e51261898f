"""Recovery after a worker crash: SIGKILL -> the next event of each session it was stepping.

Two real worker processes with the **default** settings (lease 10 s, claim idle time 5 s), one
host driving 20 sessions of 5 rounds of 3 queries (``mp-rounds``), thinking 10-40 ms a round.
Once 40 % of the rounds are done, the worker holding most unfinished sessions is stopped
(SIGSTOP), what it held is read (exact: it can do nothing more, and while it is still
connected nobody takes its work), and it is SIGKILLed. Two kinds of trial:

- ``kill``: killed at once. Whether any step is in flight on it then is chance (each step
  takes about a millisecond, the host's think time tens).
- ``freeze``: left stopped until at least three rounds were handed to it, then killed: some
  steps are certainly in flight on it when it dies (as when a worker dies with work queued).

The samples are, for each session whose step was the victim's (lock A in its name, or its
job pending on the victim's consumer), the time from the SIGKILL to that session's next
event; ``in_flight`` adds every session the host was waiting on at the kill. Without the
takeover of a gone worker's work these wait out the lease (~10 s).

``python -m bench.recovery [--trials N]`` runs it alone (on its own redis-server);
``python -m bench`` runs it as one of its rows.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import secrets
import signal
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from coordinator import Finished, Paused, SessionRegistry
from coordinator.codec import text
from coordinator.keys import Keys
from tests.procs import WorkerPool, WorkerProc, answer_for, steps_held_by
from tests.redis_proc import RedisProcess
from tests.strategies_mp import expected_rounds

from .stats import Latency

SESSIONS, ROUNDS, WIDTH = 20, 5, 3
THINK_S = (0.010, 0.040)
KILL_AFTER_ROUNDS = SESSIONS * ROUNDS * 2 // 5
WAIT_S = 60.0


@dataclass
class Trial:
    reg: SessionRegistry
    keys: Keys
    workers: dict[str, WorkerProc]
    freeze: bool
    rng: random.Random
    rounds_done: int = 0
    unfinished: set[str] = field(default_factory=set)
    waiting: set[str] = field(default_factory=set)
    returned: dict[str, list[float]] = field(default_factory=dict)
    killed_at: float = 0.0
    affected: set[str] = field(default_factory=set)
    in_flight: set[str] = field(default_factory=set)
    kill_task: asyncio.Task[None] | None = None
    run_s: float = 0.0  # the whole run: 20 sessions, start to end

    async def drive(self, n: int) -> None:
        tag = f"s{n}"
        sid = await self.reg.submit("mp-rounds", {"tag": tag, "rounds": ROUNDS, "width": WIDTH})
        self.unfinished.add(sid)
        self.waiting.add(sid)
        ev = await self.reg.wait_event(sid, timeout=WAIT_S)
        self._settled(sid)
        while isinstance(ev, Paused):
            await asyncio.sleep(self.rng.uniform(*THINK_S))  # the host thinking
            *first, last = ev.queries
            for q in first:
                await self.reg.feed_response(sid, q.id, answer_for(q.prompt), timeout=WAIT_S)
            self.waiting.add(sid)
            ev = await self.reg.feed_response(sid, last.id, answer_for(last.prompt),
                                              timeout=WAIT_S)
            self._settled(sid)
            self.rounds_done += 1
            if self.rounds_done == KILL_AFTER_ROUNDS:
                self.kill_task = asyncio.create_task(self._kill())
        self.unfinished.discard(sid)
        ok = isinstance(ev, Finished) and ev.result == {
            "tag": tag, "rounds": expected_rounds(tag, ROUNDS, WIDTH, answer_for)}
        if not ok:
            raise AssertionError(f"session {sid} ended wrong: {ev}")

    def _settled(self, sid: str) -> None:
        self.waiting.discard(sid)
        self.returned.setdefault(sid, []).append(time.perf_counter())

    async def _kill(self) -> None:
        pipe = self.reg.client.pipeline(transaction=False)
        for sid in sorted(self.unfinished):
            pipe.hget(self.keys.session(sid).session, "holder")
        counts = dict.fromkeys(self.workers, 0)
        for holder in await pipe.execute():
            if holder is not None and text(holder) in counts:
                counts[text(holder)] += 1
        victim_id = max(counts, key=lambda w: counts[w])
        victim = self.workers[victim_id]
        victim.signal(signal.SIGSTOP)
        if self.freeze:
            deadline = time.monotonic() + WAIT_S
            while len(await self._held_by(victim_id)) < min(3, counts[victim_id]):
                if time.monotonic() > deadline:
                    raise AssertionError("no rounds were handed to the stopped worker")
                await asyncio.sleep(0.005)  # polling Redis for the condition
        held = await self._held_by(victim_id)
        self.in_flight = set(self.waiting)
        self.killed_at = time.perf_counter()
        victim.signal(signal.SIGKILL)
        await asyncio.wait_for(victim.wait_exit(), WAIT_S)
        self.affected = held | (await self._held_by(victim_id) & self.in_flight)

    async def _held_by(self, worker_id: str) -> set[str]:
        return await steps_held_by(self.reg.client, self.keys, sorted(self.waiting), worker_id)

    def samples(self, sids: set[str]) -> list[float]:
        return [min(t for t in self.returned[sid] if t > self.killed_at) - self.killed_at
                for sid in sorted(sids)]


@dataclass
class Result:
    mode: str
    trials: int
    affected: Latency  # kill -> next event, sessions whose step was the victim's
    in_flight: Latency  # ... every session the host was waiting on at the kill
    run_s: list[float]  # each trial's whole run (20 sessions, start to end)


async def one_trial(url: str, log_dir: Path, freeze: bool, seed: int) -> Trial:
    ns = f"rc{secrets.token_hex(4)}"
    pool = WorkerPool(url, ns, log_dir, env={})  # the default settings: lease 10 s
    try:
        a, b = await pool.start(concurrency=4), await pool.start(concurrency=4)
        reg = SessionRegistry.from_url(url, namespace=ns)
        try:
            trial = Trial(reg, Keys(ns), {a.worker_id: a, b.worker_id: b}, freeze,
                          random.Random(seed))
            started = time.perf_counter()
            await asyncio.gather(*(trial.drive(n) for n in range(SESSIONS)))
            assert trial.kill_task is not None
            await trial.kill_task
            trial.run_s = time.perf_counter() - started
            return trial
        finally:
            await reg.aclose()
    finally:
        pool.close()


async def measure(url: str, trials: int = 5, seed: int | None = None) -> dict[str, Any]:
    """``trials`` trials of each kind; the samples pooled per kind."""
    rng = random.Random(seed)
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench-recovery-") as tmp:
        for mode in ("kill", "freeze"):
            affected: list[float] = []
            in_flight: list[float] = []
            runs: list[float] = []
            for _ in range(trials):
                trial = await one_trial(url, Path(tmp), mode == "freeze", rng.randrange(2**32))
                affected += trial.samples(trial.affected)
                in_flight += trial.samples(trial.in_flight)
                runs.append(trial.run_s)
            result = Result(mode, trials, Latency.of(affected), Latency.of(in_flight), runs)
            out[mode] = asdict(result)
            print(f"recovery {mode}: affected {_ms(result.affected)}, in flight "
                  f"{_ms(result.in_flight)}, runs {min(runs):.2f}-{max(runs):.2f} s",
                  file=sys.stderr)
    return out


def _ms(x: Latency) -> str:
    return f"n={x.n} p50 {x.p50_ms:.0f} ms, max {x.max_ms:.0f} ms"


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.recovery")
    p.add_argument("--trials", type=int, default=5, help="trials of each kind (default 5)")
    p.add_argument("--seed", type=int, default=None)
    args = p.parse_args()
    with RedisProcess() as server:
        print(json.dumps(asyncio.run(measure(server.url, args.trials, args.seed)), indent=2))


if __name__ == "__main__":
    main()
