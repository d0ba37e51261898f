"""Where a worker's steps come from, and how many it runs at once.

Four sources, each covering what the others can miss:

- the **stream** ``ns:jobs`` (consumer group ``workers``) is the truth: every start and every
  completed round is a job there, acknowledged only by the commit that applies it
  (``commit_step.lua`` XACKs the session's current job). The read never blocks, so it can
  share the connection with the scripts; the jobs-wake channel says when to read again, and
  a bounded wait covers a lost wake-up.
- **claims** (XAUTOCLAIM): a job whose worker died or stalled stays pending, and is taken
  over once idle for ``claim_idle_ms``.
- **rescues**: a worker whose connection to Redis is gone (killed, crashed, cut off) need not
  be waited out. Every worker keeps its process channel subscribed from start to exit, so
  every ``RESCUE_EVERY_S`` each worker asks Redis which of the workers it knows of (the
  registered ones, the consumers holding jobs, the holders of rounds it left to them) have
  no subscriber there, and takes their work over at once: the jobs pending on their
  consumers (XCLAIM), the rounds it left to them, and (a wake-up to every worker) their
  rounds nobody read yet. Lock A held in a gone worker's name is taken over by the step
  itself (``coordinator.locks``), so a crash costs its sessions a fraction of a second, not
  a lease. A worker that is only slow or frozen keeps its connection and is left to the
  claims and the lease.
- **nudges** on this worker's channel: the feed that completes a round of a session this
  worker holds live tells it at once, usually with a handoff (lock A taken in this worker's
  name, the round's answers included), so the live path needs no hop through the stream.
  The round's job is in the stream too, marked with the holder (field ``h``): others leave
  it pending for the holder, and if the holder dies it is claimed like any other job. Nudges
  lost while the pub/sub connection was down are made up for by a claim on RESYNC.

The heartbeat lives here too: it is what tells the others (and their GC) that this
consumer is alive and its pending jobs are not to be retired.

Every loop re-checks the stop flag on each turn: a cancel swallowed inside a Redis call must
not keep a worker from shutting down.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from coordinator.errors import SessionError
from coordinator.events import parse_handoff
from coordinator.keys import JOB_GROUP, Keys
from coordinator.logs import about
from coordinator.records import as_hash, now_ms
from coordinator.services import Services
from coordinator.transport import Subscription, checked

from .step import StepRequest, WorkerStats

log = logging.getLogger(__name__)

#: How often a worker looks for workers whose connection to Redis is gone (``rescue_once``):
#: it bounds how long their sessions wait, at the cost of two small commands per period.
RESCUE_EVERY_S = 0.25
#: Most jobs taken over from one gone consumer per look (the next look takes more).
RESCUE_BATCH = 100
#: Most rounds remembered as left to their holder (the oldest are the claims' anyway).
LEFT_CAP = 100_000
#: Most claimed jobs remembered, so a job claimed again (it waits its turn to run alone:
#: quarantine.py) is logged once, not at every claim.
CLAIMED_CAP = 10_000


async def every(
    interval_s: float, fn: Callable[[], Awaitable[object]], stop: asyncio.Event, what: str
) -> None:
    """Call ``fn`` every ``interval_s`` seconds until ``stop`` is set, logging its failures
    (``what`` names it) instead of dying of them."""
    while not stop.is_set():  # re-checked: a cancel may be swallowed below
        await asyncio.sleep(interval_s)
        try:
            await fn()
        except Exception as exc:
            log.warning("%s failed: %s", what, exc)


class Pool:
    """The steps in flight: at most ``concurrency`` run at once, and the job read takes only
    as many jobs as there is room for, so the rest stay in the stream for other workers."""

    def __init__(self, concurrency: int) -> None:
        self.concurrency = concurrency
        self.tasks: set[asyncio.Task[None]] = set()
        self._slots = asyncio.Semaphore(concurrency)

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(self._slotted(coro))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _slotted(self, coro: Coroutine[Any, Any, None]) -> None:
        async with self._slots:
            try:
                await coro
            except Exception:
                log.exception("step failed unexpectedly; its job stays pending for a retry")

    async def room(self) -> int:
        """How many more tasks fit, once at least one does."""
        while len(self.tasks) >= self.concurrency:
            await asyncio.wait(set(self.tasks), return_when=asyncio.FIRST_COMPLETED)
        return self.concurrency - len(self.tasks)

    async def drain(self, grace_s: float, cancel_wait_s: float) -> None:
        """Let the tasks finish within ``grace_s``, then cancel the rest (their jobs stay
        pending, for another worker to claim) and give them ``cancel_wait_s`` to unwind."""
        if not self.tasks:
            return
        _, late = await asyncio.wait(set(self.tasks), timeout=grace_s)
        for task in late:
            task.cancel()
        if late:
            await asyncio.wait(late, timeout=cancel_wait_s)


@dataclass(slots=True)
class _Left:
    """A round this worker read but left to the live holder it was handed to (field ``h``)."""

    sid: str
    holder: str
    fields: dict[bytes, bytes]
    at: float  # loop time it was read


class Intake:
    """Turns jobs, claims, rescues and nudges into ``StepRequest``s handed to ``submit``."""

    def __init__(
        self,
        services: Services,
        *,
        worker_id: str,
        stats: WorkerStats,
        pool: Pool,
        submit: Callable[[StepRequest], None],
        stop: asyncio.Event,
        shard: Keys | None = None,
    ) -> None:
        self.id = worker_id
        self.settings = services.settings
        self.redis = services.transport
        #: The shard whose stream, wake-ups and nudges this intake serves (a worker has one
        #: intake per shard it serves); its keys name the namespace's global keys too.
        self.keys = shard or services.shards.all[0]
        self.mux = services.mux
        self.locks = services.locks
        self.stats = stats
        self.nudge_channel = self.keys.worker_nudge(worker_id)
        self._pool = pool
        self._submit = submit
        self._stop = stop
        #: Rounds read and left to their live holder, by entry id, oldest first.
        self._left: OrderedDict[str, _Left] = OrderedDict()
        #: Workers whose process channel had no subscriber at the last look.
        self._gone: set[str] = set()
        #: Jobs this intake claimed, oldest first (``_log_takeover``).
        self._claimed: OrderedDict[str, None] = OrderedDict()

    async def start(self, beat: Callable[[], Awaitable[None]] | None
                    ) -> list[asyncio.Task[None]]:
        """Subscribe, then run the loops (and ``beat``, the heartbeat, when given: one
        intake of a worker's runs it); returns their tasks.
        The multiplexer is running once subscribed, its home channel (this worker's process
        channel: ``Services`` is made with the worker id as process id) heard for as long as
        it runs, so from then on lock A names this worker (``LockFactory.name_owner``)."""
        settings = self.settings
        # This worker's liveness channel in this shard (where the scripts look for it),
        # subscribed from now until it exits. Unsharded it is the multiplexer's home
        # channel, subscribed already (and dropped with it, when a test cuts a worker off).
        if self.keys.tag:
            await self.mux.subscribe(self.keys.process_channel(self.id))
        wake = await self.mux.subscribe(self.keys.jobs_wake)
        nudge = await self.mux.subscribe(self.nudge_channel, on_message=self.on_nudge)
        self.locks.name_owner(self.id)
        k = self.keys.index
        loops = [
            asyncio.create_task(self._job_loop(wake), name=f"jobs-{k}"),
            asyncio.create_task(self._nudge_loop(nudge), name=f"nudges-{k}"),
            asyncio.create_task(every(settings.claim_idle_ms / 2000, self.claim_once,
                                      self._stop, "autoclaim"), name=f"autoclaim-{k}"),
            asyncio.create_task(every(RESCUE_EVERY_S, self.rescue_once, self._stop, "rescue"),
                                name=f"rescue-{k}"),
        ]
        if beat is not None:
            loops.append(asyncio.create_task(every(settings.heartbeat_ttl_ms / 3000, beat,
                                                   self._stop, "heartbeat"), name="heartbeat"))
        return loops

    async def ensure_group(self) -> None:
        (reply,) = await self.redis.execute_many(
            [("XGROUP", "CREATE", self.keys.jobs, JOB_GROUP, "0", "MKSTREAM")])
        if isinstance(reply, Exception) and "BUSYGROUP" not in str(reply):
            raise SessionError(f"cannot create the job group: {reply}")

    # -- the stream ----------------------------------------------------------------------

    async def _job_loop(self, wake: Subscription) -> None:
        """Read new jobs while there are free slots; otherwise await a wake-up (bounded)."""
        while not self._stop.is_set():
            try:
                got = await self.run_once()
            except Exception as exc:
                log.warning("reading jobs failed (%s); retrying", exc)
                got = 0
                await asyncio.sleep(0.1)
            if got == 0:
                await wake.get(self.settings.wait_slice_s)

    async def run_once(self) -> int:
        """Read the jobs this worker has room for and start them; returns how many."""
        free = await self._pool.room()
        # Never blocking (the wake-up channel says when to read), so it can share the Wire
        # with the scripts: redis-py would spend ~200 µs of CPU on each of these reads.
        (reply,) = await self.redis.execute_many([
            ("XREADGROUP", "GROUP", JOB_GROUP, self.id, "COUNT", max(1, free), "STREAMS",
             self.keys.jobs, ">")])
        if isinstance(reply, Exception) and "NOGROUP" in str(reply):
            await self.ensure_group()
            return 0
        entries = _stream_entries(checked([reply])[0])
        for raw_id, fields in entries:
            entry_id, holder = raw_id.decode(), fields.get(b"h")
            if holder and fields.get(b"k") == b"resume":
                name = holder.decode(errors="replace")
                if name not in self._gone:
                    # A live holder heard of this round (and usually holds its lock already):
                    # it steps it, and its commit acknowledges this entry. Should it die, the
                    # next rescue takes the entry over; the claims, once it is idle.
                    self.stats.deferred += 1
                    if name != self.id:
                        self._leave(entry_id, name, fields)
                    continue
                self.stats.rescued += 1  # handed to a worker gone since
                self._log_takeover(entry_id, fields, f"rescued: its holder {name} is gone")
            self._take(entry_id, fields, suspect=bool(holder) and fields.get(b"k") == b"resume")
        return len(entries)

    async def claim_once(self) -> int:
        """Take over jobs left pending too long by a dead or stalled worker."""
        reply: Any = await self.redis.execute(
            "XAUTOCLAIM", self.keys.jobs, JOB_GROUP, self.id, self.settings.claim_idle_ms,
            "0-0", "COUNT", 100)
        entries = [(e[0], as_hash(e[1])) for e in reply[1] if e and e[1]]
        for raw_id, fields in entries:
            entry_id = raw_id.decode()
            self.stats.claimed += 1
            again = entry_id in self._claimed
            self._claimed[entry_id] = None
            self._claimed.move_to_end(entry_id)
            if len(self._claimed) > CLAIMED_CAP:
                self._claimed.popitem(last=False)
            self._log_takeover(entry_id, fields, f"claimed: idle over "
                               f"{self.settings.claim_idle_ms} ms", again=again)
            self._take(entry_id, fields, suspect=True)
        return len(entries)

    def _log_takeover(self, entry_id: str, fields: dict[bytes, bytes], why: str, *,
                      again: bool = False) -> None:
        """One line per job taken from another worker (a claim or a rescue): which session,
        and why, so an operator can follow a session across workers. A job claimed again
        while it waits its turn is said at DEBUG only."""
        sid = fields.get(b"sid", b"").decode(errors="replace")
        log.log(logging.DEBUG if again else logging.INFO, "session %s: job %s taken over (%s)",
                sid or "?", entry_id, why, extra=about(sid or None, self.id))

    # -- rescues -------------------------------------------------------------------------

    async def rescue_once(self) -> int:
        """Take over at once the work of the workers whose connection to Redis is gone (no
        subscriber on their process channel); returns how many jobs it started. Two commands
        when nobody is gone: who might hold work (the registered workers, the consumers
        holding jobs, the holders of rounds this worker left to them), then which of them
        Redis still hears."""
        self._forget_old_left()
        summary, members = await self.redis.execute_many([
            ("XPENDING", self.keys.jobs, JOB_GROUP), ("ZRANGE", self.keys.workers, 0, -1)])
        holding = set() if isinstance(summary, Exception) else _consumers(summary)  # NOGROUP
        names = sorted((holding | {_text(m) for m in checked([members])[0]}
                        | {left.holder for left in self._left.values()}) - {self.id})
        if not names:
            self._gone = set()
            return 0
        heard = await self.redis.execute(
            "PUBSUB", "SHARDNUMSUB", *[self.keys.process_channel(n) for n in names])
        gone = {n for n, count in zip(names, heard[1::2], strict=True) if int(count) == 0}
        newly, self._gone = gone - self._gone, gone
        started = 0
        for name in sorted(gone & holding):
            started += await self._claim_from(name)
        left = [(entry_id, x) for entry_id, x in self._left.items() if x.holder in gone]
        for entry_id, _ in left:
            del self._left[entry_id]
        started += await self._adopt([(entry_id, x.fields) for entry_id, x in left])
        if newly:
            # Rounds handed to them that nobody read yet (field ``h``; no wake-up was sent
            # for those): every worker reads them now, and whoever knows the holder gone
            # steps them (the others at their next look).
            await self.redis.execute("SPUBLISH", self.keys.jobs_wake, "rescue")
        return started

    async def _claim_from(self, consumer: str) -> int:
        """Move the jobs pending on a gone worker's consumer to this one, and adopt them.
        XCLAIM's minimum idle time is the least the look saw, so a job another worker took
        over meanwhile (its idle time reset) stays with that worker."""
        rows: Any = await self.redis.execute(
            "XPENDING", self.keys.jobs, JOB_GROUP, "-", "+", RESCUE_BATCH, consumer)
        if not rows:
            return 0
        reply: Any = await self.redis.execute(
            "XCLAIM", self.keys.jobs, JOB_GROUP, self.id, min(int(r[2]) for r in rows),
            *[r[0] for r in rows])
        entries = [(e[0].decode(), as_hash(e[1])) for e in reply if e and e[1]]
        log.warning("worker %s is gone (its connection to redis closed): taking over its %d "
                    "pending job(s)", consumer, len(entries), extra=about(worker_id=self.id))
        return await self._adopt(entries)

    async def _adopt(self, entries: list[tuple[str, dict[bytes, bytes]]]) -> int:
        """Jobs now pending on this worker, taken over from gone workers: step those that are
        still their session's current job, leave to their holder those handed to a live one,
        and drop the rest (applied already: stepping them would only cost an attempt)."""
        jobs = [(entry_id, fields, fields.get(b"sid", b"").decode(errors="replace"))
                for entry_id, fields in entries]
        current = checked(await self.redis.execute_many(
            [("HGET", self.keys.session(sid).session, "job") for _, _, sid in jobs]))
        started, stale = 0, []
        for (entry_id, fields, sid), job in zip(jobs, current, strict=True):
            kind = fields.get(b"k")
            if kind in (b"start", b"resume") and sid and _text(job or b"") != entry_id:
                stale.append(entry_id)
                continue
            holder = _text(fields.get(b"h") or b"")
            if holder and kind == b"resume" and holder not in self._gone:
                self.stats.deferred += 1
                if holder != self.id:
                    self._leave(entry_id, holder, fields)
                continue
            self.stats.rescued += 1
            self._log_takeover(entry_id, fields, "rescued: its worker is gone")
            self._take(entry_id, fields, suspect=True)
            started += 1
        if stale:
            checked(await self.redis.execute_many([
                ("XACK", self.keys.jobs, JOB_GROUP, *stale), ("XDEL", self.keys.jobs, *stale)]))
        return started

    def _leave(self, entry_id: str, holder: str, fields: dict[bytes, bytes]) -> None:
        sid = fields.get(b"sid", b"").decode(errors="replace")
        self._left[entry_id] = _Left(sid, holder, fields, asyncio.get_running_loop().time())
        if len(self._left) > LEFT_CAP:
            self._left.popitem(last=False)

    def _forget_old_left(self) -> None:
        """Rounds left longer than ``claim_idle_ms`` are the claims' (XAUTOCLAIM) from now on:
        this keeps the map to the last few seconds of rounds."""
        oldest = asyncio.get_running_loop().time() - self.settings.claim_idle_ms / 1000
        while self._left:
            entry_id, left = next(iter(self._left.items()))
            if left.at > oldest:
                break
            del self._left[entry_id]

    def _take(self, entry_id: str, fields: dict[bytes, bytes], *, suspect: bool = False) -> None:
        kind = fields.get(b"k", b"").decode(errors="replace")
        sid = fields.get(b"sid", b"").decode(errors="replace")
        if kind in ("start", "resume") and sid:
            # A suspect (taken over from a worker that died or stalled) runs alone: see
            # quarantine.py.
            self._submit(StepRequest(sid, entry_id=entry_id, suspect=suspect))
        else:
            self._pool.spawn(self._dead_letter(entry_id, sid, kind))

    async def _dead_letter(self, entry_id: str, sid: str, kind: str) -> None:
        log.error("job %s of session %s has unknown kind %r; moving it to the dead letters",
                  entry_id, sid or "?", kind, extra=about(sid or None, self.id))
        self.stats.dead_letters += 1
        checked(await self.redis.execute_many([
            ("XADD", self.keys.dead_letters, "MAXLEN", "~", 10_000, "*", "sid", sid,
             "job", entry_id, "reason", f"unknown job kind {kind!r}", "error", "",
             "at", now_ms()),
            ("XACK", self.keys.jobs, JOB_GROUP, entry_id),
            ("XDEL", self.keys.jobs, entry_id)]))

    # -- nudges --------------------------------------------------------------------------

    def on_nudge(self, msg: bytes) -> None:
        """Straight from the pub/sub connection's parser: start the step at once."""
        try:
            handoff = parse_handoff(msg)
            sid = handoff.sid if handoff is not None else msg.decode()
        except (ValueError, UnicodeDecodeError) as exc:
            # Its lease runs out and the round's job is claimed from the stream.
            log.error("unreadable nudge ignored (%s): %r", exc, msg[:80])
            return
        self._submit(StepRequest(sid, handoff=handoff))

    async def _nudge_loop(self, nudge: Subscription) -> None:
        """Nudges themselves go to ``on_nudge``; this loop hears RESYNC: nudges may have
        been lost while the connection was down, and the stream has their jobs."""
        while not self._stop.is_set():  # re-checked: a cancel may be swallowed below
            if await nudge.get(self.settings.wait_slice_s) is not None:
                try:
                    await self.claim_once()
                except Exception as exc:  # Redis still away: the claim loop retries later
                    log.warning("autoclaim after a pub/sub reconnect failed: %s", exc)


def _consumers(summary: Any) -> set[str]:
    """The consumers holding pending jobs, from the summary form of XPENDING."""
    rows = summary[3] if isinstance(summary, list) and len(summary) > 3 else None
    return {_text(row[0]) for row in rows or ()}


def _text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def _stream_entries(reply: Any) -> list[tuple[bytes, dict[bytes, bytes]]]:
    """XREADGROUP of one stream, as the Wire (flat field lists) or a redis-py pipeline (field
    dicts; a dict keyed by stream under RESP3) gives it: its entries, fields as a dict."""
    if not reply:
        return []
    stream = next(iter(reply.values())) if isinstance(reply, dict) else reply[0][1]
    return [(entry_id, as_hash(fields)) for entry_id, fields in stream]
