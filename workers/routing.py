"""Routing by strategy: a session's step runs only on a worker that has its strategy.

Workers may be started with different ``--import`` lists, but they all read one job stream,
so a worker can be handed a session whose strategy it lacks. It does not fail it: it finds a
live worker that offers the strategy (each heartbeat's report lists the worker's
``strategies`` and served ``shards``) and passes the job on to it: XCLAIM of the session's
current job to that worker's consumer (minimum idle 0), the try this step counted given
back, lock A released, and a nudge on that worker's channel so it steps the session at once.
Should the nudge be lost, the job is pending on that worker like any other and the claims
(XAUTOCLAIM) or a rescue take it from there. Only when no live worker offers the strategy is
the session failed (``unknown_strategy``).

This costs nothing on the hot path: the step asks ``catalog.has`` first (a dict lookup), and
only a missing strategy reads the reports, cached for ``REPORTS_TTL_S``.
"""

from __future__ import annotations

import asyncio
import logging
import random
from typing import Any

from coordinator.fleet import live_reports
from coordinator.keys import JOB_GROUP, Keys
from coordinator.logs import about
from coordinator.services import Services
from coordinator.transport import checked

__all__ = ["REPORTS_TTL_S", "Router"]

log = logging.getLogger(__name__)

#: How long the live workers' reports are reused before they are read again.
REPORTS_TTL_S = 1.0


class Router:
    """Finds the live workers offering a strategy, and passes a session's job to one."""

    def __init__(self, services: Services, *, worker_id: str) -> None:
        self.id = worker_id
        self.redis = services.transport
        self.keys = services.keys
        self._reports: dict[str, dict[str, Any]] = {}
        self._read_at = -REPORTS_TTL_S

    async def offering(self, strategy: str, shard: Keys) -> list[str]:
        """Live workers other than this one that offer ``strategy`` and serve ``shard``.
        None in the cached reports: read again before saying so (a worker offering it may
        have started within the cache's second)."""
        reports, fresh = await self._live_reports()
        found = self._offering(strategy, shard, reports)
        if not found and not fresh:
            self.forget_reports()
            found = self._offering(strategy, shard, (await self._live_reports())[0])
        return found

    def _offering(self, strategy: str, shard: Keys,
                  reports: dict[str, dict[str, Any]]) -> list[str]:
        return sorted(
            wid for wid, r in reports.items()
            if wid != self.id and strategy in (r.get("strategies") or ())
            and (r.get("shards") is None or shard.index in r["shards"]))

    async def _live_reports(self) -> tuple[dict[str, dict[str, Any]], bool]:
        """The live workers' reports, and whether they were read just now."""
        now = asyncio.get_running_loop().time()
        if now - self._read_at < REPORTS_TTL_S:
            return self._reports, False
        reports = await live_reports(self.redis, self.keys)
        self._reports, self._read_at = reports, now
        return reports, True

    def forget_reports(self) -> None:
        """Read the reports again at the next look (a worker passed to proved gone)."""
        self._read_at = -REPORTS_TTL_S

    async def pass_on(self, sid: str, job: str | None, shard: Keys, strategy: str,
                      offering: list[str]) -> str:
        """Move session ``sid``'s ``job`` to one of the ``offering`` workers, chosen at
        random (reports are up to a second old, so a least-busy pick would send a burst to
        one worker), and give back the try this step counted. The caller releases lock A,
        then ``nudge``s the worker returned."""
        target = random.choice(offering)  # a spread, not a secret
        commands: list[tuple[Any, ...]] = [("HINCRBY", shard.session(sid).session, "tries", -1)]
        if job:  # no job: stepped for a nudge; the nudge below is all the target needs
            commands.append(("XCLAIM", shard.jobs, JOB_GROUP, target, 0, job))
        checked(await self.redis.execute_many(commands))
        log.info("session %s: strategy %r is not registered in worker %s; passing its job %s "
                 "to worker %s, which offers it", sid, strategy, self.id, job, target,
                 extra=about(sid, self.id))
        return target

    async def nudge(self, sid: str, shard: Keys, target: str) -> None:
        """Tell ``target`` to step ``sid`` now (its job is pending on it already)."""
        await self.redis.execute("SPUBLISH", shard.worker_nudge(target), sid)

