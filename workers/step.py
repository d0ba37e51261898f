"""One step of one session: lock A, the session's state, the strategy, the commit.

A step is asked for by a stream job, a nudge or a handoff, but which of its four paths it
takes (see ``StepRequest``) depends on what this worker still holds, which only the step can
tell: hence one request type, and one way through lock A, the checks and the commit.

The commit (``commit_step.lua``) carries lock A's fencing token and the round the step began
from, so whatever crashed or stalled meanwhile, a step applies at most once and never over
newer state; the checks before it (an old job, an ended session, a step failing again and
again) keep a redelivered or poisoned job from running a strategy again. This is the hot
path: a handed-off step costs one command, so nothing here adds a read, task or wait.

A session whose strategy this worker lacks is never failed for that while a live worker
offers it: its job is passed on (``routing.py``), at the cost of a dict lookup for the others.
What a step does is logged with the session's id (``coordinator.logs``): each step at DEBUG,
replays and takeovers at INFO/WARNING, each failure at ERROR with the strategy's traceback.
"""

from __future__ import annotations

import contextlib
import logging
import time
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

from coordinator.codec import pack, unpack
from coordinator.errors import CorruptState, LockTimeout, NotFound, SessionError
from coordinator.events import Handoff, pause_event
from coordinator.keys import JOB_GROUP
from coordinator.locks import FencedLock
from coordinator.logs import about
from coordinator.models import LlmQuery
from coordinator.records import SessionRecord, as_hash, server_now_ms
from coordinator.scripts import Lease, StepBegin
from coordinator.services import Services
from coordinator.states import Phase
from coordinator.transport import checked

from . import catalog
from .context import query_tokens
from .effects import Durable
from .quarantine import Quarantine
from .routing import Router
from .runtime import Ask, Crash, Done, Execution, Outcome, exchange_facts, journal_entry
from .state import Loaded, new_execution, read_journal, replay, round_answers

log = logging.getLogger(__name__)


@dataclass(slots=True)
class WorkerStats:
    """A worker's counters, as its heartbeat publishes them (``Worker.report``)."""

    steps: int = 0
    live_resumes: int = 0
    replays: int = 0
    deferred: int = 0
    claimed: int = 0
    rescued: int = 0
    fenced_rejections: int = 0
    stale_skips: int = 0
    dead_letters: int = 0
    step_errors: int = 0
    #: Sessions whose strategy this worker lacks, passed on to a worker that has it.
    passed_on: int = 0


@dataclass(slots=True)  # not frozen: that would double the cost of making one, per step
class StepRequest:
    """Step session ``sid`` once, for the stream job ``entry_id``, a nudge (neither set) or
    a ``handoff`` (lock A taken in this worker's name by ``feed.lua``, answers included).
    Whatever asked for it, the step takes one of four paths:

    1. **handoff on a live execution**: the paused execution in memory is in step with the
       handoff and resumes with its answers; the commit is the only command.
    2. **live resume**: lock A taken and the session read in one command (``step_begin``);
       the execution in memory resumes with the answers read.
    3. **replay**: nothing in memory (another worker held it, or it was evicted): a new
       execution re-runs the journal, then resumes.
    4. **start**: round 0: a new execution runs to its first ask.

    A handoff that cannot take path 1 (nothing live, out of step, failing again and again,
    odd answers) reads the session under the lock it was handed and takes 2, 3 or 4.
    """

    sid: str
    entry_id: str | None = None
    handoff: Handoff | None = None
    #: Taken over from a worker that died or stalled: it runs alone (``quarantine.py``).
    suspect: bool = False


class _Handed(NamedTuple):
    ex: Execution
    asked: int
    answers: list[str]
    entry: bytes


class Stepper(ABC):
    """The step machinery and the executions it keeps live; ``Worker`` is one, and runs its
    steps (``_submit``) in its pool."""

    def __init__(self, services: Services, *, worker_id: str) -> None:
        self.id = worker_id
        self.settings = services.settings
        self.redis = services.transport
        self.keys = services.keys
        self.scripts = services.scripts
        self.locks = services.locks
        self.terminate = services.terminate
        self.stats = WorkerStats()
        self._shards = services.shards
        #: Paused executions by session, least recently stepped first (path 1 and 2).
        self._live: OrderedDict[str, Execution] = OrderedDict()
        self._busy: set[str] = set()
        # Handoffs that came while this worker was still finishing the session's last step.
        self._queued: dict[str, StepRequest] = {}
        #: Suspect steps run alone, so one that takes the worker down takes only itself.
        self.quarantine = Quarantine()
        #: Where a session whose strategy this worker lacks goes (``routing.py``).
        self.router = Router(services, worker_id=worker_id)
        #: Called with each step's duration in seconds (the metrics' histogram), if set.
        self.step_observer: Callable[[float], None] | None = None
        #: What executions' side effects and ``ctx.state`` go through (``effects.py``).
        self.durable = Durable(services)

    @abstractmethod
    def _submit(self, req: StepRequest) -> None:
        """Run ``_step(req)`` soon, in a task of its own."""

    async def _step(self, req: StepRequest) -> None:
        """Run ``req``, one step per session at a time; a failure leaves its job pending."""
        sid = req.sid
        if sid in self._busy:
            if req.handoff is not None:
                # The last step of this session is still unwinding (its commit is what let
                # the host answer): run the handoff right after it.
                self._queued[sid] = req
            return  # otherwise this worker is on it already; that step's commit acks the job
        self._busy.add(sid)
        try:
            async with self.quarantine.step(req.suspect, handed=req.handoff is not None):
                await self._lock_and_step(req)
        except Exception as exc:
            # Left pending, the job is retried (claimed again) until max_attempts; keep the
            # error so the dead letter can say what kept failing.
            self.stats.step_errors += 1
            log.exception("step of session %s failed in the worker; its job stays pending and "
                          "is retried (up to max_attempts %d)", sid, self.settings.max_attempts,
                          extra=about(sid, self.id))
            key = self.keys.session(sid).session
            with contextlib.suppress(Exception):
                # PEXPIRE NX: a hash whose keys expired meanwhile is not left behind for ever
                # (an existing one keeps its own expiry).
                await self.redis.execute_many([
                    ("HSET", key, "last_error", f"{type(exc).__name__}: {exc}"[:2000]),
                    ("PEXPIRE", key, self.settings.backstop_ms, "NX")])
        finally:
            self._busy.discard(sid)
            queued = self._queued.pop(sid, None)
            if queued is not None:
                self._submit(queued)

    # -- lock A ------------------------------------------------------------------------------

    async def _lock_and_step(self, req: StepRequest) -> None:
        """Take lock A (or adopt the handed one), step under it, and let go of it unless the
        commit did."""
        sid, lock = req.sid, self.locks.session(req.sid)
        begun: StepBegin | None = None
        if req.handoff is not None:
            lock.took(Lease(req.handoff.fence, 0), req.handoff.token)
        else:
            token = lock.new_token()  # names this worker: see coordinator.locks
            # Take the lock and read the session in one command (step_begin.lua); only when
            # the lock is busy do we fall back to the lock's own bounded wait, then read.
            try:
                begun = await self.scripts.step_begin(sid, token=token, lease_ms=lock.lease_ms,
                                                      with_journal=sid not in self._live)
                if begun.lease.fence > 0 and begun.lease.pttl < 0:
                    log.warning("session %s: lock A taken over (fence %d) from a holder whose "
                                "connection to redis is gone", sid, begun.lease.fence,
                                extra=about(sid, self.id))
                if not lock.took(begun.lease, token):
                    begun = None
                    if req.entry_id is not None and not await self._current(sid, req.entry_id):
                        # A redelivered job applied meanwhile (say, by this worker's own
                        # handoff, waiting for this very step to end): no lock to wait for.
                        await self._drop_entry(sid, req.entry_id)
                        self.stats.stale_skips += 1
                        return
                    async with self.quarantine.aside():  # holding up no other step
                        await lock.acquire()
            except LockTimeout:
                log.info("session %s: lock A stayed busy (another worker is stepping it); "
                         "its job stays pending if it still matters", sid,
                         extra=about(sid, self.id))
                return
            except CorruptState as exc:
                await self._fail_corrupt(sid, exc)
                return
            except NotFound:
                self._forget(sid)
                if req.entry_id:
                    await self._drop_entry(sid, req.entry_id)
                return
        released = False
        try:
            async with lock.kept_alive():
                released = await self._step_under_lock(req, lock, begun)
        finally:
            if not released:
                with contextlib.suppress(Exception):
                    await lock.release()

    # -- the four paths -----------------------------------------------------------------------

    async def _step_under_lock(
        self, req: StepRequest, lock: FencedLock, begun: StepBegin | None
    ) -> bool:
        """Step under lock A; True when the commit applied, which released the lock."""
        sid = req.sid
        began = time.perf_counter()
        handed = self._handed_round(req.handoff)
        ex: Execution | None
        answers: list[str] | None
        if handed is not None:  # 1. a handoff on a live execution: nothing to read
            ex, asked, answers, entry = handed
            self.stats.live_resumes += 1
            path = "handoff"
            outcome = await ex.step(answers, self.settings.step_timeout_s)
        else:
            data = await self._checked_load(sid, lock, req.entry_id, begun)
            if data is None:
                return False
            asked, ex = data.rec.asked, self._live.get(sid)
            if ex is not None and ex.asked != asked:
                self._forget(sid)  # out of step with the session: replay instead
                ex = None
            if ex is None and not catalog.has(data.rec.strategy):
                return await self._route(sid, lock, data.rec)
            if ex is None and data.journal is None:
                data = await self._load(sid, with_journal=True)
            try:
                answers, entry = round_answers(data)
            except CorruptState as exc:
                await self._fail_corrupt(sid, exc)
                return False
            if ex is not None:  # 2. live resume
                self.stats.live_resumes += 1
                path = "live"
                outcome = await ex.step(answers, self.settings.step_timeout_s)
            elif answers is None:  # 4. start (round 0: nothing answered)
                path = "start"
                ex, outcome = await self._start(data.rec)
            else:  # 3. replay
                path = "replay"
                ex, outcome = await self._replay(data, answers)
        if not isinstance(outcome, Ask):
            self._forget(sid)
        applied = await self._commit(sid, lock, asked_from=asked, outcome=outcome,
                                     journal_entry=entry, ex=ex)
        self._stepped(sid, path, outcome, applied, time.perf_counter() - began)
        return applied

    def _stepped(self, sid: str, path: str, outcome: Outcome, applied: bool,
                 seconds: float) -> None:
        """The step's trace line (DEBUG) and its duration (the metrics' histogram)."""
        if self.step_observer is not None:
            self.step_observer(seconds)
        if log.isEnabledFor(logging.DEBUG):
            kind = "pause" if isinstance(outcome, Ask) else \
                "complete" if isinstance(outcome, Done) else "fail"
            log.debug("session %s: step by %s path, outcome %s%s, %.1f ms", sid, path, kind,
                      "" if applied else " (not applied)", seconds * 1000,
                      extra=about(sid, self.id))

    async def _route(self, sid: str, lock: FencedLock, rec: SessionRecord) -> bool:
        """This worker lacks the session's strategy: pass its job on to a live worker that
        offers it (``routing.py``), or, when none does, fail it (``unknown_strategy``).
        True when lock A was released (passed on, or the failure committed)."""
        shard = self._shards.of(sid)
        offering = await self.router.offering(rec.strategy, shard)
        if not offering:
            message = (f"strategy {rec.strategy!r} is not registered in worker {self.id} "
                       f"(it offers {', '.join(catalog.names())}), and no live worker offers "
                       f"it: start a worker with --import MODULE, the module that registers "
                       f"{rec.strategy!r}")
            return await self._commit(sid, lock, asked_from=rec.asked,
                                      outcome=Crash(message, "unknown_strategy"),
                                      journal_entry=b"", ex=None)
        target = await self.router.pass_on(sid, rec.job, shard, rec.strategy, offering)
        self.stats.passed_on += 1
        await lock.release()
        await self.router.nudge(sid, shard, target)
        return True

    def _handed_round(self, h: Handoff | None) -> _Handed | None:
        """Path 1's execution, round, answers and journal entry, straight from the handoff;
        None sends the step down the reading path, which checks everything against Redis
        (nothing live, a live execution out of step, a step failing again and again, odd
        answers)."""
        live = None if h is None else self._live.get(h.sid)
        if h is None or live is None or live.asked != h.asked \
                or h.tries > self.settings.max_attempts:
            return None
        queries = live.last_queries
        try:
            records = [unpack(h.answers[q.id], what="answer", session_id=h.sid)
                       for q in queries]
            answers = [str(rec["r"]) for rec in records]
        except (KeyError, TypeError, SessionError):
            return None
        facts = exchange_facts(queries, answers, records, live.paused_at)
        return _Handed(live, h.asked, answers, journal_entry(queries, answers, facts))

    # -- reading the session (paths 2 to 4) ---------------------------------------------------

    async def _checked_load(
        self, sid: str, lock: FencedLock, entry_id: str | None, begun: StepBegin | None
    ) -> Loaded | None:
        """The session, if this step is still to run: None when the job is old, the session
        no longer running, or the step failing too often (then the session is failed). The
        journal only when no execution is live (None when not read, [] when empty)."""
        live = self._live.get(sid)
        try:
            if begun is not None and (live is not None or begun.journal is not None):
                data = Loaded.parse(sid, begun.session, begun.pending, begun.answers,
                                    begun.journal)
            else:
                data = await self._load(sid, with_journal=live is None)
        except CorruptState as exc:
            await self._fail_corrupt(sid, exc)
            return None
        rec = data.rec
        if entry_id is not None and rec.job != entry_id:
            await self._drop_entry(sid, entry_id)  # an old job of this session: applied already
            self.stats.stale_skips += 1
            return None
        if rec.phase is not Phase.RUNNING:
            self._forget(sid)
            if entry_id:
                await self._drop_entry(sid, entry_id)  # applied already (or ended): nothing to do
            self.stats.stale_skips += 1
            return None
        # Each acquisition of lock A counts a try and each commit resets the count, so it
        # counts the attempts at this step since it last succeeded (crashes included).
        attempts = rec.tries
        if attempts > self.settings.max_attempts:
            self.stats.dead_letters += 1
            reason = f"failed {attempts - 1} times in a row"
            # No error recorded: no step got as far as failing, so each died with its worker.
            error_type = "worker_error" if rec.last_error else "worker_lost"
            log.error("session %s: step %s (%s); dead-lettering it; last error: %s", sid,
                      reason, error_type, rec.last_error or "the worker died mid-step",
                      extra=about(sid, self.id))
            await self._fail(sid, f"job {reason} (max_attempts {self.settings.max_attempts}); "
                             f"last error: {rec.last_error or 'the worker died mid-step'}",
                             error_type=error_type, dead_letter=reason)
            return None
        return data

    async def _load(self, sid: str, *, with_journal: bool) -> Loaded:
        sk = self.keys.session(sid)
        commands: list[tuple[Any, ...]] = [
            ("HGETALL", sk.session), ("HGETALL", sk.pending), ("HGETALL", sk.answers)]
        if with_journal:
            commands.append(("LRANGE", sk.journal, 0, -1))
        replies = checked(await self.redis.execute_many(commands))
        return Loaded.parse(sid, as_hash(replies[0]), as_hash(replies[1]),
                            as_hash(replies[2]), replies[3] if with_journal else None)

    async def _start(self, rec: SessionRecord) -> tuple[Execution | None, Outcome]:
        ex = new_execution(rec, max_result_bytes=self.settings.max_input_bytes,
                           durable=self.durable)
        if isinstance(ex, Crash):
            return None, ex
        return ex, await ex.step(None, self.settings.step_timeout_s)

    async def _replay(
        self, data: Loaded, answers: list[str]
    ) -> tuple[Execution | None, Outcome]:
        ex = new_execution(data.rec, max_result_bytes=self.settings.max_input_bytes,
                           durable=self.durable)
        if isinstance(ex, Crash):
            return None, ex
        self.stats.replays += 1
        journal = read_journal(data)
        log.info("session %s: replaying %d round(s) of %r", data.rec.sid, len(journal),
                 data.rec.strategy, extra=about(data.rec.sid, self.id))
        return await replay(ex, data, journal, answers, self.settings.step_timeout_s)

    # -- the end of every path ----------------------------------------------------------------

    async def _commit(
        self, sid: str, lock: FencedLock, *, asked_from: int, outcome: Outcome,
        journal_entry: bytes, ex: Execution | None,
    ) -> bool:
        """Apply the step (fenced, from round ``asked_from``); True when it applied, which
        released lock A in the same command. An execution that asked again stays live."""
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
            rest += [outcome.error, outcome.kind, outcome.traceback or ""]
        assert lock.fence is not None and lock.local.token is not None
        # The whole custom dict, each commit: a replay rebuilds it, so it is never merged.
        custom = pack(ctx.custom) if ctx is not None and ctx.custom else b""
        deadlines = [q.deadline_at for q in queries if q.deadline_at is not None]
        reply = await self.scripts.commit_step(
            sid, fence=lock.fence, asked=asked_from, token=lock.local.token, holder=self.id,
            holder_channel=self._shards.of(sid).worker_nudge(self.id),
            backstop_ms=self.settings.backstop_ms,
            retention_ms=self.settings.retention_ms, journal_entry=journal_entry,
            progress=progress, llm_calls=len(queries),
            # upstream counts the system text with the prompt, in characters and tokens
            prompt_chars=sum(len(q.prompt) + len(q.system or "") for q in queries),
            prompt_tokens=sum(query_tokens(q) for q in queries),
            outcome=kind, event=event, rest=rest, custom=custom,
            query_deadline=min(deadlines) if deadlines else None)
        if ctx is not None:
            ctx.logs.clear()
            ctx.last_progress = None
        self.stats.steps += 1
        if reply.code == "OK":
            lock.mark_released()
            if isinstance(outcome, Ask) and ex is not None:
                ex.paused_at = server_now_ms()
                self._keep_live(sid, ex)
            elif isinstance(outcome, Crash):
                self._log_failure(sid, outcome)
            return True
        self._forget(sid)
        if reply.code == "FENCED":
            self.stats.fenced_rejections += 1
            log.warning(
                "stale write rejected for session %s: this worker's lease (fence %s) was "
                "taken over (fence now %s) while it was stalled; dropping its step",
                sid, lock.fence, reply.args[0].decode() if reply.args else "?",
                extra=about(sid, self.id))
        else:
            log.info("commit for session %s skipped (%s): another step applied this round or "
                     "the session ended meanwhile", sid, reply.code, extra=about(sid, self.id))
        return False

    def _log_failure(self, sid: str, crash: Crash) -> None:
        """The session failed: said at ERROR, with the strategy's traceback when its own code
        raised, so an operator sees what the host sees, and where it came from."""
        exc = crash.exc
        log.error("session %s failed (%s): %s", sid, crash.kind, crash.error,
                  exc_info=(type(exc), exc, exc.__traceback__) if exc is not None else None,
                  extra=about(sid, self.id))

    async def _current(self, sid: str, entry_id: str) -> bool:
        """Whether ``entry_id`` is still the session's job (one read, on the busy-lock path
        only): a job no longer current was applied already."""
        job = await self.redis.execute("HGET", self.keys.session(sid).session, "job")
        return job is not None and (job.decode() if isinstance(job, bytes) else str(job)) \
            == entry_id

    async def _drop_entry(self, sid: str, entry_id: str) -> None:
        """Acknowledge and drop job ``entry_id`` of session ``sid`` (in its shard's stream)."""
        jobs = self._shards.of(sid).jobs
        checked(await self.redis.execute_many([
            ("XACK", jobs, JOB_GROUP, entry_id), ("XDEL", jobs, entry_id)]))

    async def _fail_corrupt(self, sid: str, exc: CorruptState) -> None:
        """Fail one unreadable session clearly; the worker goes on serving the others."""
        log.error("session %s failed (corrupt_state): %s", sid, exc.message,
                  extra=about(sid, self.id))
        await self._fail(sid, exc.message, error_type="corrupt_state",
                         dead_letter="corrupt state")

    async def _fail(self, sid: str, error: str, *, error_type: str, dead_letter: str) -> None:
        self._forget(sid)
        await self.terminate.fail(sid, error, error_type=error_type, dead_letter=dead_letter)

    # -- the live executions ----------------------------------------------------------------

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
