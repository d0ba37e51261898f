"""The worker process: takes start and resume jobs from the stream and steps strategies.

Where a step's work comes from:

- the **stream** ``ns:jobs`` (consumer group ``workers``): every start and every completed
  round is a job there, acknowledged by the commit that applies it (``commit_step.lua`` XACKs
  the session's current job), so a job whose worker died stays pending and is claimed by
  another worker after ``claim_idle_ms`` (XAUTOCLAIM).
- a **nudge** on this worker's channel: the feed that completes a round of a session this
  worker holds live tells it at once, so the live path needs no hop through the stream.
  Usually the nudge is a **handoff**: ``feed.lua`` took lock A in this worker's name and
  sent the round's answers along, so the step reads nothing and costs one command (its
  commit). The round's job is in the stream too, marked with the holder that heard of it
  (field ``h``); whoever reads it leaves it pending for that holder, and if the holder dies
  it is claimed (XAUTOCLAIM) like any other job.

A step runs under the session's lock A, and its commit carries the lock's fencing token and
the round it started from, so it applies at most once and never over newer state.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import socket
import uuid
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from typing import Any

from coordinator.codec import estimate_tokens, pack, unpack
from coordinator.errors import CorruptState, LockTimeout, NotFound, SessionError
from coordinator.events import Handoff, parse_handoff, pause_event
from coordinator.keys import JOB_GROUP
from coordinator.locks import FencedLock
from coordinator.models import LlmQuery
from coordinator.records import SessionRecord, as_hash, decode_queries, now_ms
from coordinator.scripts import Lease
from coordinator.services import Services
from coordinator.settings import Settings
from coordinator.states import Phase
from coordinator.transport import Transport, checked

from . import catalog
from .runtime import Ask, Crash, Done, Execution, JournalRound, Outcome, digest, journal_entry

log = logging.getLogger(__name__)


@dataclass(slots=True)
class WorkerStats:
    steps: int = 0
    live_resumes: int = 0
    replays: int = 0
    deferred: int = 0
    claimed: int = 0
    fenced_rejections: int = 0
    stale_skips: int = 0
    dead_letters: int = 0
    step_errors: int = 0


@dataclass(slots=True)
class _Loaded:
    rec: SessionRecord
    pending: dict[bytes, bytes]
    answers: dict[bytes, bytes]
    journal: list[bytes] | None = field(default=None)


class Worker:
    def __init__(
        self,
        transport: Transport,
        settings: Settings | None = None,
        *,
        concurrency: int = 8,
        worker_id: str | None = None,
    ) -> None:
        self.settings = settings or Settings()
        self.concurrency = max(1, concurrency)
        self.id = worker_id or f"{socket.gethostname()}-{secrets.token_hex(4)}"
        self.services = Services(transport, self.settings, process_id=self.id)
        self.redis = transport
        self.keys = self.services.keys
        self.scripts = self.services.scripts
        self.mux = self.services.mux
        self.locks = self.services.locks
        self.terminate = self.services.terminate
        self.sweeper = self.services.sweeper
        self.stats = WorkerStats()
        self._nudge_channel = self.keys.worker_nudge(self.id)
        self._live: OrderedDict[str, Execution] = OrderedDict()
        self._busy: set[str] = set()
        # Handoffs that came while this worker was still finishing the session's last step.
        self._queued: dict[str, Handoff] = {}
        self._slots = asyncio.Semaphore(self.concurrency)
        self._tasks: set[asyncio.Task[None]] = set()
        self._loops: list[asyncio.Task[None]] = []
        self._stop = asyncio.Event()

    # -- lifecycle -----------------------------------------------------------------------

    @property
    def client(self) -> Any:
        """A plain redis-py client on the same server, for tools and tests."""
        return self.redis.client

    async def start(self) -> None:
        await self._ensure_group()
        await self.redis.execute("SADD", self.keys.strategies, *catalog.names())
        await self._beat()
        await self.mux.start()
        wake = await self.mux.subscribe(self.keys.jobs_wake)
        nudge = await self.mux.subscribe(self._nudge_channel, on_message=self._on_nudge)
        self._loops = [
            asyncio.create_task(self._job_loop(wake), name="jobs"),
            asyncio.create_task(self._nudge_loop(nudge), name="nudges"),
            asyncio.create_task(self._heartbeat_loop(), name="heartbeat"),
            asyncio.create_task(self._claim_loop(), name="autoclaim"),
            asyncio.create_task(self.sweeper.run(self._stop), name="gc"),
        ]
        log.info("worker %s started (concurrency %d, strategies: %s)",
                 self.id, self.concurrency, ", ".join(catalog.names()))

    async def run(self) -> None:
        """Start, then serve until ``stop()`` (or a signal handler that calls it). A stop
        asked while still starting (Redis unreachable, say) is not kept waiting on it."""
        starting = asyncio.ensure_future(self.start())
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
                 self.settings.shutdown_grace_s)
        await self.shutdown(self.settings.shutdown_grace_s)
        log.info("worker %s stopped", self.id)

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
        await _best_effort(self.mux.drop(self._nudge_channel))
        for task in self._loops:
            task.cancel()
        # Bounded, and never swallowing a cancel of our own: a loop whose cancel was eaten
        # inside a Redis call leaves at its next turn anyway (the loops watch _stop).
        if self._loops:
            await asyncio.wait(self._loops, timeout=GOODBYE_S)
        if self._tasks:
            _, late = await asyncio.wait(set(self._tasks), timeout=grace_s)
            for task in late:
                task.cancel()
            if late:
                await asyncio.wait(late, timeout=GOODBYE_S)
        for ex in self._live.values():
            ex.close()
        self._live.clear()
        await _best_effort(self.redis.execute_many([
            ("DEL", self.keys.worker(self.id)), ("ZREM", self.keys.workers, self.id)]))
        # Leave the job group too, unless a step cut short still holds a job (then another
        # worker claims it, and a later GC sweep retires this consumer).
        await _best_effort(self.scripts.retire_consumers([self.id]))
        await _best_effort(self.mux.aclose())
        await self.services.aclose()

    async def _ensure_group(self) -> None:
        (reply,) = await self.redis.execute_many(
            [("XGROUP", "CREATE", self.keys.jobs, JOB_GROUP, "0", "MKSTREAM")])
        if isinstance(reply, Exception) and "BUSYGROUP" not in str(reply):
            raise SessionError(f"cannot create the job group: {reply}")

    def report(self) -> dict[str, Any]:
        """What the heartbeat publishes (``SessionRegistry.worker_stats``): load and counters,
        so an operator sees from any process which worker is busy, replaying or fenced."""
        return {"at": now_ms(), "concurrency": self.concurrency, "busy": len(self._tasks),
                "live": len(self._live), **asdict(self.stats)}

    async def _beat(self) -> None:
        checked(await self.redis.execute_many([
            ("SET", self.keys.worker(self.id), pack(self.report()), "PX",
             self.settings.heartbeat_ttl_ms),
            ("ZADD", self.keys.workers, now_ms(), self.id)]))

    async def _heartbeat_loop(self) -> None:
        while not self._stop.is_set():  # re-checked: a cancel may be swallowed below
            await asyncio.sleep(self.settings.heartbeat_ttl_ms / 3000)
            try:
                await self._beat()
            except Exception as exc:
                log.warning("heartbeat failed: %s", exc)

    # -- where work comes from -----------------------------------------------------------

    async def _job_loop(self, wake: Any) -> None:
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
        while len(self._tasks) >= self.concurrency:
            await asyncio.wait(set(self._tasks), return_when=asyncio.FIRST_COMPLETED)
        free = self.concurrency - len(self._tasks)
        # Never blocking (the wake-up channel says when to read), so it can share the Wire
        # with the scripts: redis-py would spend ~200 µs of CPU on each of these reads.
        (reply,) = await self.redis.execute_many([
            ("XREADGROUP", "GROUP", JOB_GROUP, self.id, "COUNT", max(1, free), "STREAMS",
             self.keys.jobs, ">")])
        if isinstance(reply, Exception) and "NOGROUP" in str(reply):
            await self._ensure_group()
            return 0
        entries = _stream_entries(checked([reply])[0])
        for entry_id, fields in entries:
            if fields.get(b"h") and fields.get(b"k") == b"resume":
                # A live holder heard of this round (and usually holds its lock already): it
                # steps it, and its commit acknowledges this entry. Should it die, the entry
                # is claimed from this worker's pending list once idle (XAUTOCLAIM).
                self.stats.deferred += 1
                continue
            self._spawn(self._job(entry_id.decode(), fields))
        return len(entries)

    async def _claim_loop(self) -> None:
        """Take over jobs left pending too long by a dead or stalled worker."""
        while not self._stop.is_set():  # re-checked: a cancel may be swallowed below
            await asyncio.sleep(self.settings.claim_idle_ms / 2000)
            try:
                await self.claim_once()
            except Exception as exc:
                log.warning("autoclaim failed: %s", exc)

    async def claim_once(self) -> int:
        reply: Any = await self.redis.execute(
            "XAUTOCLAIM", self.keys.jobs, JOB_GROUP, self.id, self.settings.claim_idle_ms,
            "0-0", "COUNT", 100)
        entries = [(e[0], as_hash(e[1])) for e in reply[1] if e and e[1]]
        for entry_id, fields in entries:
            self.stats.claimed += 1
            self._spawn(self._job(entry_id.decode(), fields))
        return len(entries)

    def _on_nudge(self, msg: bytes) -> None:
        """Straight from the pub/sub connection's parser: start the step at once."""
        try:
            handoff = parse_handoff(msg)
            sid = handoff.sid if handoff is not None else msg.decode()
        except (ValueError, UnicodeDecodeError) as exc:
            # Its lease runs out and the round's job is claimed from the stream.
            log.error("unreadable nudge ignored (%s): %r", exc, msg[:80])
            return
        self._spawn(self._step(sid, entry_id=None, handoff=handoff))

    async def _nudge_loop(self, nudge: Any) -> None:
        """Nudges themselves go to ``_on_nudge``; this loop hears RESYNC: nudges may have
        been lost while the connection was down, and the stream has their jobs."""
        while not self._stop.is_set():  # re-checked: a cancel may be swallowed below
            if await nudge.get(self.settings.wait_slice_s) is not None:
                try:
                    await self.claim_once()
                except Exception as exc:  # Redis still away: the claim loop retries later
                    log.warning("autoclaim after a pub/sub reconnect failed: %s", exc)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(self._slotted(coro))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _slotted(self, coro: Any) -> None:
        async with self._slots:
            try:
                await coro
            except Exception:
                log.exception("step failed unexpectedly; its job stays pending for a retry")

    async def _job(self, entry_id: str, fields: dict[bytes, bytes]) -> None:
        kind = fields.get(b"k", b"").decode(errors="replace")
        sid = fields.get(b"sid", b"").decode(errors="replace")
        if kind not in ("start", "resume") or not sid:
            log.error("job %s has unknown kind %r; moving it to the dead letters", entry_id, kind)
            self.stats.dead_letters += 1
            checked(await self.redis.execute_many([
                ("XADD", self.keys.dead_letters, "MAXLEN", "~", 10_000, "*", "sid", sid,
                 "job", entry_id, "reason", f"unknown job kind {kind!r}", "error", "",
                 "at", now_ms()),
                ("XACK", self.keys.jobs, JOB_GROUP, entry_id),
                ("XDEL", self.keys.jobs, entry_id)]))
            return
        await self._step(sid, entry_id=entry_id)

    async def _drop_entry(self, entry_id: str) -> None:
        checked(await self.redis.execute_many([
            ("XACK", self.keys.jobs, JOB_GROUP, entry_id), ("XDEL", self.keys.jobs, entry_id)]))

    # -- one step ------------------------------------------------------------------------

    async def _step(
        self, sid: str, *, entry_id: str | None, handoff: Handoff | None = None
    ) -> None:
        """Step ``sid`` once: for a job from the stream (``entry_id``), a nudge, or a handoff
        (lock A already taken for this worker, answers included)."""
        if sid in self._busy:
            if handoff is not None:
                # The last step of this session is still unwinding (its commit is what let
                # the host answer): run the handoff right after it.
                self._queued[sid] = handoff
            return  # otherwise this worker is on it already; that step's commit acks the job
        self._busy.add(sid)
        try:
            await self._locked_step(sid, entry_id, handoff)
        except Exception as exc:
            # Left pending, the job is retried (claimed again) until max_attempts; keep the
            # error so the dead letter can say what kept failing.
            self.stats.step_errors += 1
            log.exception("step of session %s failed; it will be retried", sid)
            with contextlib.suppress(Exception):
                await self.redis.execute("HSET", self.keys.session(sid).session, "last_error",
                                         f"{type(exc).__name__}: {exc}"[:2000])
        finally:
            self._busy.discard(sid)
            queued = self._queued.pop(sid, None)
            if queued is not None:
                self._spawn(self._step(sid, entry_id=None, handoff=queued))

    async def _locked_step(
        self, sid: str, entry_id: str | None, handoff: Handoff | None
    ) -> None:
        lock = self.locks.session(sid)
        if handoff is not None:
            lock.took(Lease(handoff.fence, 0), handoff.token)
            await self._run_locked(sid, lock, entry_id, None, handoff)
            return
        token = uuid.uuid4().hex
        # Take the lock and read the session in one command (step_begin.lua); only when the
        # lock is busy do we fall back to the lock's own bounded wait, then read.
        prefetched: list[Any] | None = None
        try:
            begun = await self.scripts.step_begin(sid, token=token, lease_ms=lock.lease_ms,
                                                  with_journal=sid not in self._live)
            if lock.took(begun.lease, token):
                # the journal: None when not asked for, [] when empty (a start)
                prefetched = [begun.session, begun.pending, begun.answers, begun.journal]
            else:
                await lock.acquire()
        except LockTimeout:
            return  # someone is stepping it; the job stays pending if it still matters
        except CorruptState as exc:
            await self._fail_corrupt(sid, exc)
            return
        except NotFound:
            self._forget(sid)
            if entry_id:
                await self._drop_entry(entry_id)
            return
        await self._run_locked(sid, lock, entry_id, prefetched, None)

    async def _run_locked(
        self, sid: str, lock: FencedLock, entry_id: str | None, prefetched: list[Any] | None,
        handoff: Handoff | None,
    ) -> None:
        released = False
        try:
            async with lock.kept_alive():
                handed = None if handoff is None else await self._handed_step(sid, lock, handoff)
                if handed is not None:
                    released = handed
                else:
                    released = await self._step_under_lock(sid, lock, entry_id, prefetched)
        finally:
            if not released:
                with contextlib.suppress(Exception):
                    await lock.release()

    async def _handed_step(self, sid: str, lock: FencedLock, h: Handoff) -> bool | None:
        """The live path proper: resume the execution in memory with the handed answers and
        commit. None when this one needs the reading path instead (see ``_handed_round``)."""
        live = self._live.get(sid)
        fast = None if live is None else self._handed_round(live, h)
        if live is None or fast is None:
            return None
        self.stats.live_resumes += 1
        outcome = await live.step(fast[0], self.settings.step_timeout_s)
        if not isinstance(outcome, Ask):
            self._forget(sid)
        return await self._commit(sid, lock, asked_from=h.asked, outcome=outcome,
                                  journal_entry=fast[1], ex=live)

    async def _step_under_lock(
        self, sid: str, lock: FencedLock, entry_id: str | None, prefetched: list[Any] | None
    ) -> bool:
        """One step; True when its commit applied and released the lock in the same call."""
        live = self._live.get(sid)
        try:
            if prefetched is not None and (live is not None or prefetched[3] is not None):
                data = self._parse_load(sid, prefetched)
            else:
                data = await self._load(sid, with_journal=live is None)
        except CorruptState as exc:
            await self._fail_corrupt(sid, exc)
            return False
        rec = data.rec
        if entry_id is not None and rec.job != entry_id:
            await self._drop_entry(entry_id)  # an old job of this session: applied already
            self.stats.stale_skips += 1
            return False
        if rec.phase is not Phase.RUNNING:
            self._forget(sid)
            if entry_id:
                await self._drop_entry(entry_id)  # applied already (or ended): nothing to do
            self.stats.stale_skips += 1
            return False
        # Each acquisition of lock A bumps the fence and each commit records it, so the gap
        # counts the attempts at this step since it last succeeded (crashes included).
        attempts = (lock.fence or 0) - rec.cfence
        if attempts > self.settings.max_attempts:
            self.stats.dead_letters += 1
            reason = f"failed {attempts - 1} times in a row"
            log.error("session %s: step %s; dead-lettering it", sid, reason)
            await self._fail(sid, f"job {reason} (max_attempts {self.settings.max_attempts}); "
                             f"last error: {rec.last_error or 'the worker died mid-step'}",
                             dead_letter=reason)
            return False
        if live is not None and live.asked != rec.asked:
            self._forget(sid)
            live = None
        if live is None and data.journal is None:
            data = await self._load(sid, with_journal=True)
        try:
            answers, entry = self._round_answers(data)
        except CorruptState as exc:
            await self._fail_corrupt(sid, exc)
            return False
        ex: Execution | None
        if live is not None:
            self.stats.live_resumes += 1
            ex, outcome = live, await live.step(answers, self.settings.step_timeout_s)
        else:
            ex, outcome = await self._rebuild(data, answers)
        if not isinstance(outcome, Ask):
            self._forget(sid)
        return await self._commit(sid, lock, asked_from=rec.asked, outcome=outcome,
                                  journal_entry=entry, ex=ex)

    async def _load(self, sid: str, *, with_journal: bool) -> _Loaded:
        sk = self.keys.session(sid)
        commands: list[tuple[Any, ...]] = [
            ("HGETALL", sk.session), ("HGETALL", sk.pending), ("HGETALL", sk.answers)]
        if with_journal:
            commands.append(("LRANGE", sk.journal, 0, -1))
        replies = checked(await self.redis.execute_many(commands))
        return self._parse_load(sid, [*map(as_hash, replies[:3]), *replies[3:]])

    def _parse_load(self, sid: str, replies: list[Any]) -> _Loaded:
        if not replies[0]:
            raise NotFound(f"session {sid} vanished", session_id=sid)
        rec = SessionRecord.from_hash(sid, replies[0])
        return _Loaded(rec, replies[1], replies[2], replies[3] if len(replies) > 3 else None)

    def _handed_round(self, live: Execution, h: Handoff) -> tuple[list[str], bytes] | None:
        """The answers and journal entry of a handed-off round, straight from the handoff;
        None sends the step down the reading path, which checks everything against Redis
        (a live execution out of step, a step failing again and again, odd answers)."""
        if live.asked != h.asked or h.fence - h.cfence > self.settings.max_attempts:
            return None
        queries = live.last_queries
        try:
            answers = [str(unpack(h.answers[q.id], what="answer", session_id=h.sid)["r"])
                       for q in queries]
        except (KeyError, TypeError, SessionError):
            return None
        return answers, journal_entry(queries, answers)

    def _round_answers(self, data: _Loaded) -> tuple[list[str] | None, bytes]:
        """The answered round in query order, and its journal entry (none for a start)."""
        rec = data.rec
        if rec.asked == 0:
            return None, b""
        queries = decode_queries(rec, data.pending)
        answers = []
        for q in queries:
            raw = data.answers.get(q.id.encode())
            if raw is None:
                raise CorruptState(f"session {rec.sid} is running round {rec.asked} but "
                                   f"query {q.id} has no answer", session_id=rec.sid)
            answers.append(str(unpack(raw, what="answer", session_id=rec.sid)["r"]))
        return answers, journal_entry(queries, answers)

    async def _rebuild(
        self, data: _Loaded, answers: list[str] | None
    ) -> tuple[Execution | None, Outcome]:
        rec = data.rec
        try:
            fn = catalog.get(rec.strategy)
        except SessionError as exc:
            return None, Crash(exc.message)
        ex = Execution(fn, rec.input or {}, budget=rec.budget, started_at_ms=rec.started_at,
                       max_result_bytes=self.settings.max_input_bytes)
        if rec.asked == 0:
            return ex, await ex.step(None, self.settings.step_timeout_s)
        self.stats.replays += 1
        journal = []
        for raw in data.journal or []:
            d, triples = unpack(raw, what="journal entry", session_id=rec.sid)
            journal.append(JournalRound(d, [t[2] for t in triples]))
        try:
            out = await ex.replay(journal, self.settings.step_timeout_s)
            current = decode_queries(rec, data.pending)
            if not isinstance(out, Ask) or digest(out.queries) != digest(current):
                ex.close()
                return None, Crash(
                    f"non-determinism: on replay, round {rec.asked} did not ask the questions "
                    "that were answered; strategies must ask the same questions given the "
                    "same answers"
                )
            return ex, await ex.step(answers, self.settings.step_timeout_s)
        except SessionError as exc:
            ex.close()
            return None, Crash(exc.message)

    async def _commit(
        self,
        sid: str,
        lock: FencedLock,
        *,
        asked_from: int,
        outcome: Outcome,
        journal_entry: bytes,
        ex: Execution | None,
    ) -> bool:
        ctx = ex.ctx if ex is not None else None
        logs = [pack(x) for x in ctx.logs] if ctx else []
        progress = pack(ctx.last_progress) if ctx and ctx.last_progress else b""
        queries: list[LlmQuery] = outcome.queries if isinstance(outcome, Ask) else []
        rest: list[Any] = [len(logs), *logs]
        if isinstance(outcome, Ask):
            records = [q.to_record() for q in queries]
            kind, event = "pause", pause_event(asked_from + 1, records)
            rest += [pack([q.id for q in queries]), len(queries)]
            for q, rec in zip(queries, records, strict=True):
                rest += [q.id, pack(rec)]
        elif isinstance(outcome, Done):
            kind, event = "complete", b"complete"
            rest.append(pack(outcome.result))
        else:
            kind, event = "fail", b"fail"
            rest.append(outcome.error)
        assert lock.fence is not None and lock.local.token is not None
        reply = await self.scripts.commit_step(
            sid, fence=lock.fence, asked=asked_from, token=lock.local.token, holder=self.id,
            holder_channel=self._nudge_channel, backstop_ms=self.settings.backstop_ms,
            retention_ms=self.settings.retention_ms, journal_entry=journal_entry,
            progress=progress, llm_calls=len(queries),
            prompt_chars=sum(len(q.prompt) for q in queries),
            prompt_tokens=sum(estimate_tokens(len(q.prompt)) for q in queries),
            outcome=kind, event=event, rest=rest)
        if ctx is not None:
            ctx.logs.clear()
            ctx.last_progress = None
        self.stats.steps += 1
        if reply.code == "OK":
            lock.mark_released()
            if isinstance(outcome, Ask) and ex is not None:
                self._keep_live(sid, ex)
            return True
        self._forget(sid)
        if reply.code == "FENCED":
            self.stats.fenced_rejections += 1
            log.warning(
                "stale write rejected for session %s: this worker's lease (fence %s) was "
                "taken over (fence now %s) while it was stalled; dropping its step",
                sid, lock.fence, reply.args[0].decode() if reply.args else "?",
            )
        else:
            log.info("commit for session %s skipped: %s", sid, reply.code)
        return False

    async def _fail_corrupt(self, sid: str, exc: CorruptState) -> None:
        """Fail one unreadable session clearly; the worker goes on serving the others."""
        log.error("%s; failing the session", exc.message)
        await self._fail(sid, exc.message, dead_letter="corrupt state")

    async def _fail(self, sid: str, error: str, *, dead_letter: str) -> None:
        self._forget(sid)
        await self.terminate.fail(sid, error, dead_letter=dead_letter)

    def _keep_live(self, sid: str, ex: Execution) -> None:
        self._live[sid] = ex
        self._live.move_to_end(sid)
        while len(self._live) > self.settings.max_live_executions:
            _, old = self._live.popitem(last=False)
            old.close()

    def _forget(self, sid: str) -> None:
        ex = self._live.pop(sid, None)
        if ex is not None:
            ex.close()


#: Longest a goodbye to Redis may take when a worker leaves.
GOODBYE_S = 2.0


async def _best_effort(aw: Any) -> None:
    with contextlib.suppress(Exception, asyncio.TimeoutError):
        await asyncio.wait_for(aw, GOODBYE_S)


def _stream_entries(reply: Any) -> list[tuple[bytes, dict[bytes, bytes]]]:
    """XREADGROUP of one stream, as the Wire (flat field lists) or a redis-py pipeline (field
    dicts; a dict keyed by stream under RESP3) gives it: its entries, fields as a dict."""
    if not reply:
        return []
    stream = next(iter(reply.values())) if isinstance(reply, dict) else reply[0][1]
    return [(entry_id, as_hash(fields)) for entry_id, fields in stream]
