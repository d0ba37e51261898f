"""GC: expire sessions idle longer than their TTL, and forget dead workers (their entry in the
index and their consumer in the job group); one sweeper at a time across all processes.

Idle means nobody owes the session anything but its host. A paused session waits for its
host's answers, and that wait is what its TTL bounds; a running one is owed a step by the
workers (its job queued behind others, or its step in flight), and however long that takes
is the workers' doing, not the host's, so it never counts. Only paused sessions are in the
deadline index (``commit_step.lua`` files a session when it pauses, each answer that leaves
some missing moves it, the last answer takes it out), and ``terminate.lua`` refuses to expire
a running one (``BUSY``) whatever the index said, so the sweep reads candidates only.

The sweep is a change to the registry as a whole, so it runs under lock C (one per shard,
``coordinator.shards``: each shard is swept under its own, taken without waiting, so workers
spread the shards among themselves); for each candidate
it then takes that session's lock A (order C then A, as everywhere), and ``terminate.lua``
re-checks phase and deadline atomically, so an answer that just landed keeps the session.
Redis key expiry is only the backstop, for keys nothing else ends (a session whose every job
was lost): idle ttl + retention + lease past their last refresh.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from . import deadlines
from .codec import text
from .errors import CorruptState, LockTimeout, NotFound, SessionError
from .keys import JOB_GROUP, Keys
from .locks import LockFactory
from .records import as_hash, server_now_ms
from .scripts import Scripts, Terminate
from .settings import Settings
from .shards import ShardMap
from .transport import Transport, checked

log = logging.getLogger(__name__)

BATCH = 500


class Sweeper:
    def __init__(
        self, transport: Transport, keys: Keys, shards: ShardMap, locks: LockFactory,
        terminate: Terminate, scripts: Scripts, settings: Settings,
    ) -> None:
        self._scripts = scripts
        self._redis = transport
        self._keys = keys
        self._shards = shards
        self._terminate = terminate
        self._locks = locks
        self._settings = settings
        self.reaped_total = 0

    async def sweep(self, now_ms: int | None = None) -> list[str]:
        """Expire what is due in every shard; returns the ids expired. ``now_ms`` injects
        the clock (tests). A shard another process is sweeping is skipped at once."""
        if now_ms is None:
            sec, usec = await self._redis.execute("TIME")
            limit = int(sec) * 1000 + int(usec) // 1000
        else:
            limit = now_ms
        reaped: list[str] = []
        for shard in self._shards.all:
            reaped += await self._sweep_shard(shard, limit, now_ms)
        self.reaped_total += len(reaped)
        if reaped:
            log.info("gc expired %d idle session(s)", len(reaped))
        return reaped

    async def _sweep_shard(self, shard: Keys, limit: int, now_ms: int | None) -> list[str]:
        """Expire what is due by ``limit`` in ``shard``, under its lock C (skipped when
        another process holds it); ``now_ms``: the clock injected by a test, or None."""
        lock_c = self._locks.registry(shard)
        try:
            await lock_c.acquire(blocking=False)
        except LockTimeout:
            return []
        reaped: list[str] = []
        try:
            async with lock_c.kept_alive():
                due: list[Any] = await self._redis.execute(
                    "ZRANGEBYSCORE", shard.deadlines, "-inf", limit, "LIMIT", 0, BATCH)
                for raw in due:
                    sid = text(raw)
                    try:
                        if await self._expire_one(shard, sid, now_ms):
                            reaped.append(sid)
                    except Exception:  # one bad session must not stop the sweep
                        log.exception("gc could not expire session %s; skipping it", sid)
                if shard.index == 0:  # the namespace-wide index, once per sweep
                    await self._forget_dead_workers()
                await self._retire_dead_consumers(shard)
        finally:
            with contextlib.suppress(Exception):
                await lock_c.release()
        # After lock C, not under it: the trims are idempotent and never race a session's
        # own scripts (an id is never reused), so C is held no longer than the expiries need.
        try:
            await self._prune_indexes(shard, limit)
        except SessionError as exc:
            log.warning("gc could not trim the phase indexes of shard %d: %s", shard.index, exc)
        return reaped

    async def _prune_indexes(self, shard: Keys, now: int) -> None:
        """Keep the phase indexes (``coordinator.listing``) to live and retained sessions:
        finished ones past the retention leave their index, and a running entry older than
        the backstop expiry whose session hash is gone (it ran out of keys while nobody owed
        it a step: every job of it lost) is dropped, so listings and counts stay true."""
        cutoff = f"({now - self._settings.retention_ms}"
        checked(await self._redis.execute_many([
            ("ZREMRANGEBYSCORE", shard.done(phase), "-inf", cutoff)
            for phase in ("completed", "failed", "cancelled")]))
        old = [text(x) for x in await self._redis.execute(
            "ZRANGEBYSCORE", shard.running, "-inf", now - self._settings.backstop_ms,
            "LIMIT", 0, BATCH)]
        if not old:
            return
        exists = checked(await self._redis.execute_many(
            [("EXISTS", self._keys.session(sid).session) for sid in old]))
        gone = [sid for sid, there in zip(old, exists, strict=True) if not there]
        if gone:
            await self._redis.execute("ZREM", shard.running, *gone)
            log.warning("gc dropped %d running session(s) whose keys had expired from the "
                        "index", len(gone))

    async def _forget_dead_workers(self) -> None:
        """Membership sweep: drop workers whose heartbeat key has expired from the index."""
        ids = [text(x) for x in await self._redis.execute("ZRANGE", self._keys.workers, 0, -1)]
        dead = await self._dead(ids)
        if dead:
            await self._redis.execute("ZREM", self._keys.workers, *dead)

    async def _dead(self, worker_ids: list[str]) -> list[str]:
        """Those of ``worker_ids`` whose heartbeat key has expired (one round trip)."""
        if not worker_ids:
            return []
        alive = checked(await self._redis.execute_many(
            [("EXISTS", self._keys.worker(wid)) for wid in worker_ids]))
        return [wid for wid, ok in zip(worker_ids, alive, strict=True) if not ok]

    async def _retire_dead_consumers(self, shard: Keys) -> list[str]:
        """Drop the job group's consumers whose worker's heartbeat is gone and that hold no
        job (a killed worker's, once its jobs were claimed; a stopped one's that could not
        say goodbye). Returns the names dropped."""
        (consumers,) = await self._redis.execute_many(
            [("XINFO", "CONSUMERS", shard.jobs, JOB_GROUP)])
        if isinstance(consumers, Exception):
            if "NOGROUP" in str(consumers) or "no such key" in str(consumers):
                return []  # no stream or no group yet: nothing to retire
            raise SessionError(f"redis refused XINFO CONSUMERS: {consumers}")
        # a flat field list from a server, a dict with text keys from fakeredis
        names = [text(c["name"] if isinstance(c, dict) else as_hash(c)[b"name"])
                 for c in consumers]
        retired = await self._scripts.retire_consumers(shard, await self._dead(names))
        if retired:
            log.info("gc retired %d consumer(s) of dead workers from the job group",
                     len(retired))
        return retired

    async def _expire_one(self, shard: Keys, sid: str, now_ms: int | None) -> bool:
        lock_a = self._locks.session(sid, wait_s=min(self._settings.lock_wait_s, 2.0))
        try:
            await lock_a.acquire()
        except LockTimeout:
            return False  # mid-step: active by definition; the next sweep looks again
        except NotFound:
            await self._redis.execute("ZREM", shard.deadlines, sid)
            return False
        except CorruptState as exc:
            log.error("%s; failing the session", exc.message)
            await self._terminate.fail(sid, exc.message, error_type="corrupt_state",
                                       dead_letter="corrupt state")
            return False
        try:
            reply = await self._terminate.expire(
                sid, now_ms=now_ms, error="session expired: it was idle for longer than its ttl"
            )
            if reply.code == "DUE":  # a query's deadline passed: its default, or the end
                await deadlines.fire(self._redis, self._keys, self._scripts, self._terminate,
                                     self._settings, sid,
                                     server_now_ms() if now_ms is None else now_ms)
        except CorruptState as exc:
            # Its clock cannot be read, so it can never be judged idle: end it clearly rather
            # than trip over it on every sweep until the backstop expiry drops it silently.
            log.error("%s; failing the session", exc.message)
            await self._terminate.fail(sid, exc.message, error_type="corrupt_state",
                                       dead_letter="corrupt state")
            return False
        finally:
            with contextlib.suppress(Exception):
                await lock_a.release()
        return reply.code == "OK"

    async def run(self, stop: asyncio.Event) -> None:
        """Sweep every ``gc_interval_s`` until ``stop`` is set, the first an interval after
        start: workers of a fleet restarted together would otherwise all reach for every
        shard's lock C in the same instant (and a caller's own ``gc_sweep`` with them)."""
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self._settings.gc_interval_s)
            if stop.is_set():
                return
            try:
                await self.sweep()
            except Exception:
                log.exception("gc sweep failed; retrying next interval")
