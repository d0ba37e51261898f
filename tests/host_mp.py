"""A host process for the fault tests: ``python -m tests.host_mp --redis URL --namespace NS
--sessions FILE --host-index H --hosts N --report FILE [...]``.

It plays one of N separate hosts (its own ``SessionRegistry``, its own Redis connections)
answering a shared set of sessions: of every round it answers the queries that
``owner_of(sid, prompt, N)`` gives to it, with ``answer_for(prompt)`` (a pure function, so
the test knows every result exactly), in a random order and after a random "thinking" delay
(simulated LLM latency: it spreads the run over time so that worker kills land mid-run; it
orders nothing). Queries of one round owned by other hosts are answered concurrently by them.

When a round has nothing left for this host it waits for the session's next event on the
session's channel (subscribe, re-check, bounded wait), never by sleeping. Every wait is
bounded by ``--deadline``; a session not finished by then is reported as stuck.

The report (JSON) has, per session: the final event (``to_json``), how many answers this
host fed, how many feeds returned ``Accepted`` and how many the next event; and ``errors``
(session -> repr of what went wrong). Exit code 0 when every session finished cleanly.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from typing import Any

from coordinator.models import Accepted, Finished, LlmQuery, Paused
from coordinator.registry import SessionRegistry
from tests.procs import FAST_SETTINGS, answer_for, owner_of


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tests.host_mp")
    p.add_argument("--redis", required=True)
    p.add_argument("--namespace", required=True)
    p.add_argument("--sessions", required=True, help="JSON file: list of session ids")
    p.add_argument("--host-index", type=int, required=True)
    p.add_argument("--hosts", type=int, default=3)
    p.add_argument("--report", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--think-min", type=float, default=0.0)
    p.add_argument("--think-max", type=float, default=0.0)
    p.add_argument("--deadline", type=float, default=120.0, help="seconds for everything")
    return p


class Host:
    def __init__(self, reg: SessionRegistry, args: argparse.Namespace) -> None:
        self.reg = reg
        self.index = args.host_index
        self.hosts = args.hosts
        self.rng = random.Random(args.seed * 1000 + args.host_index)
        self.think = (args.think_min, max(args.think_min, args.think_max))
        self.deadline = time.monotonic() + args.deadline

    def left(self) -> float:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("deadline passed: the session is stuck")
        return left

    def mine(self, sid: str, queries: tuple[LlmQuery, ...]) -> list[LlmQuery]:
        return [q for q in queries if owner_of(sid, q.prompt, self.hosts) == self.index]

    async def drive(self, sid: str) -> dict[str, Any]:
        """Answer this host's share of ``sid`` until the session finishes."""
        stats: dict[str, Any] = {"feeds": 0, "accepted": 0, "settled": 0}
        while True:
            event = await self.reg.wait_event(sid, timeout=self.left())
            if isinstance(event, Finished):
                stats["final"] = event.to_json(sid)
                return stats
            assert isinstance(event, Paused), event
            mine = self.mine(sid, event.queries)
            if not mine:
                await self.wait_for_change(sid, event)
                continue
            self.rng.shuffle(mine)
            results = await asyncio.gather(*(self.feed(sid, q) for q in mine))
            stats["feeds"] += len(mine)
            stats["accepted"] += sum(isinstance(r, Accepted) for r in results)
            stats["settled"] += sum(not isinstance(r, Accepted) for r in results)

    async def feed(self, sid: str, q: LlmQuery) -> Any:
        low, high = self.think
        if high > 0:
            await asyncio.sleep(self.rng.uniform(low, high))  # simulated LLM latency
        return await self.reg.feed_response(sid, q.id, answer_for(q.prompt),
                                            timeout=self.left())

    async def wait_for_change(self, sid: str, seen: Paused) -> None:
        """Return once the session's event differs from ``seen`` (other hosts answered, or a
        worker committed the next round), or after one wait slice (then the caller
        re-checks)."""
        channel = self.reg.keys.session(sid).channel
        async with await self.reg.mux.subscribe(channel) as sub:
            now = await self.reg.wait_event(sid, timeout=self.left())
            if now != seen:
                return
            await sub.get(min(self.left(), self.reg.settings.wait_slice_s))


async def run(args: argparse.Namespace, sids: list[str]) -> dict[str, Any]:
    reg = SessionRegistry.from_url(args.redis, namespace=args.namespace, **FAST_SETTINGS)
    host = Host(reg, args)
    started = time.monotonic()
    report: dict[str, Any] = {"host": args.host_index, "sessions": {}, "errors": {}}
    try:
        results = await asyncio.gather(*(host.drive(sid) for sid in sids),
                                       return_exceptions=True)
    finally:
        await reg.aclose()
    for sid, res in zip(sids, results, strict=True):
        if isinstance(res, BaseException):
            report["errors"][sid] = repr(res)
        else:
            report["sessions"][sid] = res
    report["elapsed_s"] = round(time.monotonic() - started, 3)
    report["feeds"] = sum(s["feeds"] for s in report["sessions"].values())
    return report


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    with open(args.sessions) as f:
        sids: list[str] = json.load(f)
    report = asyncio.run(run(args, sids))
    with open(args.report, "w") as f:
        json.dump(report, f)
    print(f"host {args.host_index}: {len(report['sessions'])} sessions finished, "
          f"{len(report['errors'])} errors, {report['feeds']} feeds in "
          f"{report['elapsed_s']} s", file=sys.stderr)
    return 1 if report["errors"] else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
