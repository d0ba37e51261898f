"""The worker process: steps strategies (``step.py``) fed by its intake (``intake.py``).

Kept apart because they change for different reasons: the intake is about never losing or
duplicating work (streams, claims, nudges, the heartbeat that keeps this consumer's jobs its
own), the step about running a strategy exactly once per round under a fenced lock. What is
left here is what neither owns: starting and stopping in an order that loses nothing, and
the report an operator reads.

A worker that stops takes no more work, lets its steps in flight finish within a grace
period, and leaves: a step cut short keeps its job pending, so another worker claims it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import socket
from collections.abc import Awaitable, Sequence
from dataclasses import asdict
from typing import Any

from coordinator.codec import pack
from coordinator.errors import InvalidInput, Unavailable
from coordinator.keys import Keys
from coordinator.logs import about
from coordinator.records import clock_lesson, now_ms
from coordinator.services import Services
from coordinator.settings import Settings
from coordinator.transport import Transport, checked

from . import catalog
from .intake import Intake, Pool
from .step import Stepper, StepRequest, WorkerStats

__all__ = ["GOODBYE_S", "Worker", "WorkerStats"]

log = logging.getLogger(__name__)

#: Longest a goodbye to Redis may take when a worker leaves.
GOODBYE_S = 2.0


class Worker(Stepper):
    """A worker process: the step machinery fed by its ``Intake``, its steps in flight in
    a ``Pool``. It *is* the ``Stepper``, so the executions kept live (``_live``) and the
    step's seams (``_load``, ``_commit``) are the worker's own, for tests to wrap."""

    def __init__(
        self,
        transport: Transport,
        settings: Settings | None = None,
        *,
        concurrency: int = 8,
        worker_id: str | None = None,
        serve_shards: Sequence[int] | None = None,
    ) -> None:
        """``serve_shards``: the shards of the namespace whose jobs this worker takes (None:
        all of them); checked against the namespace's shard count at ``start``."""
        settings = settings or Settings()
        worker_id = worker_id or f"{socket.gethostname()}-{secrets.token_hex(4)}"
        self.services = Services(transport, settings, process_id=worker_id)
        if isinstance(concurrency, bool) or not isinstance(concurrency, int) \
                or not 1 <= concurrency <= 10_000:
            raise InvalidInput(f"concurrency must be a whole number from 1 to 10000, got "
                               f"{concurrency!r}")
        self.concurrency = concurrency
        self.serve_shards = None if serve_shards is None else tuple(serve_shards)
        self._pool = Pool(self.concurrency)
        super().__init__(self.services, worker_id=worker_id)
        self.mux = self.services.mux
        self.sweeper = self.services.sweeper
        self._stop = asyncio.Event()
        #: One intake per shard served (made at start, once the shards are known); the
        #: first is ``intake``.
        self.intakes = [self._intake(None)]
        self._loops: list[asyncio.Task[None]] = []

    def _intake(self, shard: Keys | None) -> Intake:
        return Intake(self.services, worker_id=self.id, stats=self.stats, pool=self._pool,
                      submit=self._submit, stop=self._stop, shard=shard)

    @property
    def intake(self) -> Intake:
        return self.intakes[0]

    def _submit(self, req: StepRequest) -> None:
        self._pool.spawn(self._step(req))

    # -- lifecycle -----------------------------------------------------------------------

    @property
    def client(self) -> Any:
        """A plain redis-py client on the same server, for tools and tests."""
        return self.redis.client

    async def start(self) -> None:
        shards = await self.services.ready()
        served = range(len(shards)) if self.serve_shards is None else self.serve_shards
        if not served or any(not 0 <= k < len(shards) for k in served):
            raise InvalidInput(
                f"serve_shards {list(served)} must name shards of namespace "
                f"{self.settings.namespace!r}, which has {len(shards)} (0 to {len(shards) - 1})")
        self.intakes = [self._intake(shards.keys[k]) for k in served]
        for intake in self.intakes:
            await intake.ensure_group()
        await self._publish_catalog()
        await self._learn_clock()  # before the first heartbeat, which is stamped with it
        await self._beat()
        await self.mux.start()
        self._loops = [asyncio.create_task(self.sweeper.run(self._stop), name="gc")]
        for n, intake in enumerate(self.intakes):
            self._loops += await intake.start(beat=self._beat if n == 0 else None)
        log.info("worker %s started (concurrency %d, %d shard(s), strategies: %s)",
                 self.id, self.concurrency, len(self.intakes), ", ".join(catalog.names()),
                 extra=about(worker_id=self.id))

    async def _publish_catalog(self) -> None:
        """Say what this worker offers, for hosts (``SessionRegistry.strategies``) and for
        the start check: each strategy's description and parameters (``catalog.describe``).
        The heartbeat's report says which live worker offers which (``report``)."""
        described = catalog.describe()
        if not described:  # nothing loaded (catalog.load was not called): nothing to say
            return
        fields = [x for name, d in described.items() for x in (name, pack(d))]
        checked(await self.redis.execute_many([
            ("SADD", self.keys.strategies, *described),
            ("HSET", self.keys.catalog, *fields)]))

    async def run(self) -> None:
        """Start, then serve until ``stop()`` (or a signal handler that calls it). A stop
        asked while still starting (Redis unreachable, say) is not kept waiting on it."""
        starting = asyncio.ensure_future(self._start_when_reachable())
        stopping = asyncio.ensure_future(self._stop.wait())
        await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if not starting.done():
            starting.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await starting
        else:
            starting.result()  # a failed start is the caller's error to see
        await stopping
        log.info("worker %s stopping: finishing in-flight steps (grace %.1f s)", self.id,
                 self.settings.shutdown_grace_s, extra=about(worker_id=self.id))
        await self.shutdown(self.settings.shutdown_grace_s)
        log.info("worker %s stopped", self.id, extra=about(worker_id=self.id))

    async def _start_when_reachable(self) -> None:
        """``start``, retried with backoff while Redis is unavailable, saying so each time:
        a worker deployed before its Redis (or across a Redis restart) waits for it instead
        of dying; a Redis that refuses us (credentials, database) is fatal at once."""
        log.info("worker %s connecting to redis at %s", self.id, self.redis.safe_url)
        backoff = 0.5
        while True:
            try:
                await self.start()
                return
            except Unavailable as exc:
                log.warning("worker %s: redis at %s is unavailable (%s); retrying in %.1f s",
                            self.id, self.redis.safe_url, exc.cause or exc.message, backoff)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), backoff)
            if self._stop.is_set():
                return
            backoff = min(backoff * 2, 10.0)

    def stop(self) -> None:
        """Ask the worker to stop; safe to call from a signal handler."""
        self._stop.set()

    async def shutdown(self, grace_s: float | None = None) -> None:
        """Stop taking work, let in-flight steps finish within ``grace_s``, then leave.
        Steps cut short keep their jobs pending, so another worker claims them. Bounded even
        with Redis gone: the goodbyes (unsubscribe, heartbeat removal) are best effort, since
        the heartbeat expires by itself and a dead connection hears nothing."""
        grace_s = self.settings.shutdown_grace_s if grace_s is None else grace_s
        self._stop.set()
        # no more handoffs: the next rounds go elsewhere
        for intake in self.intakes:
            await _best_effort(self.mux.drop(intake.nudge_channel))
        for task in self._loops:
            task.cancel()
        # Bounded, and never swallowing a cancel of our own: a loop whose cancel was eaten
        # inside a Redis call leaves at its next turn anyway (the loops watch _stop).
        if self._loops:
            await asyncio.wait(self._loops, timeout=GOODBYE_S)
        await self._pool.drain(grace_s, GOODBYE_S)
        for ex in self._live.values():
            ex.close()
        self._live.clear()
        await _best_effort(self.redis.execute_many([
            ("DEL", self.keys.worker(self.id)), ("ZREM", self.keys.workers, self.id)]))
        # Leave the job group too, unless a step cut short still holds a job (then another
        # worker claims it, and a later GC sweep retires this consumer).
        for intake in self.intakes:
            await _best_effort(self.scripts.retire_consumers(intake.keys, [self.id]))
        await _best_effort(self.mux.aclose())
        await self.services.aclose()

    # -- where work comes from (see intake.py) ---------------------------------------------

    async def run_once(self) -> int:
        """Read the jobs this worker has room for and start them; returns how many."""
        return sum([await intake.run_once() for intake in self.intakes])

    async def claim_once(self) -> int:
        """Take over jobs left pending too long by a dead or stalled worker."""
        return sum([await intake.claim_once() for intake in self.intakes])

    # -- what others see of it -----------------------------------------------------------

    def in_flight(self) -> int:
        """Steps running now."""
        return len(self._pool.tasks)

    def live_executions(self) -> int:
        """Paused executions held in memory (the live path's)."""
        return len(self._live)

    def report(self) -> dict[str, Any]:
        """What the heartbeat publishes (``SessionRegistry.worker_stats``): load and counters,
        so an operator sees from any process which worker is busy, replaying or fenced."""
        return {"at": now_ms(), "concurrency": self.concurrency, "busy": len(self._pool.tasks),
                "live": len(self._live), **asdict(self.stats),
                # what it runs, and for which shards: routing reads these (routing.py)
                "strategies": catalog.names(),
                "shards": [intake.keys.index for intake in self.intakes]}

    async def _beat(self) -> None:
        """Say this worker is alive, and re-learn Redis's clock on the way: ``TIME`` rides
        in the same write, so keeping budgets on the server's clock costs no round trip."""
        learn = clock_lesson()
        replies = checked(await self.redis.execute_many([
            ("TIME",),
            ("SET", self.keys.worker(self.id), pack(self.report()), "PX",
             self.settings.heartbeat_ttl_ms),
            ("ZADD", self.keys.workers, now_ms(), self.id)]))
        learn(replies[0])

    async def _learn_clock(self) -> None:
        """Learn how far Redis's clock is from this host's: budgets, heartbeats and logs are
        measured on the server's clock (the scripts stamp sessions with ``TIME``), so a host
        whose clock is hours off still sees a session's budget as the session's Redis does."""
        learn = clock_lesson()
        learn(await self.redis.execute("TIME"))


async def _best_effort(aw: Awaitable[Any]) -> None:
    with contextlib.suppress(Exception, asyncio.TimeoutError):
        await asyncio.wait_for(aw, GOODBYE_S)
