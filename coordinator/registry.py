"""``SessionRegistry``: the host's side. Start sessions, feed answers, wait, observe, cancel.

The registry never runs strategies; workers do (``workers.worker``). It talks to them only
through Redis: a start or the last answer of a round queues a job on the stream, and the
worker's commit publishes on the session's channel, which the registry awaits.

Locks: a feed never waits for one. ``feed.lua`` is atomic, so feeds to different sessions
never wait on each other and a feed never waits on an observer; lock A exists for the
workers' steps (the feed completing a round takes it, only if free, for the live worker it
hands the step to) and lock C for registry-wide sweeps (``coordinator.gc``).
"""

from __future__ import annotations

import contextlib
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from . import fleet, listing, snapshot
from .codec import check_json_able, check_text, estimate_tokens, pack, text, unpack
from .errors import (
    CorruptState,
    IdempotencyConflict,
    InvalidInput,
    InvalidTransition,
    NoPendingQuery,
    NotFound,
    NoWorker,
    SessionError,
    UnknownStrategy,
    WaitTimeout,
)
from .events import ACCEPTED, parse_pause
from .models import (
    Accepted,
    FeedResult,
    Finished,
    LlmQuery,
    Paused,
    PendingFilter,
    PendingView,
    QueryId,
    SessionPage,
    Submitted,
)
from .records import SessionRecord, as_hash, normalise_budget, server_now_ms, settled_event
from .scripts import raise_for
from .services import Services
from .settings import MAX_TTL_S, Settings
from .shards import Shards
from .states import Phase
from .transport import Subscription, Transport, checked


def new_session_id() -> str:
    """An id in the unsharded layout (``Shards.new_session_id``: 128 random bits)."""
    return Shards.single("alc").new_session_id()


class SessionRegistry:
    """The host's API. Every call is bounded (``Settings.redis_timeout_s`` per Redis call,
    plus the call's own ``timeout`` where it waits on a session) and raises only
    ``SessionError`` subclasses: ``Unavailable`` when Redis cannot be reached in time."""

    def __init__(
        self,
        transport: Transport,
        *,
        namespace: str | None = None,
        settings: Settings | None = None,
    ) -> None:
        base = settings or Settings()
        self.settings = base if namespace is None else base.with_(namespace=namespace)
        self.services = Services(transport, self.settings, process_id=secrets.token_hex(8))
        self.redis = transport
        self.keys = self.services.keys
        self.scripts = self.services.scripts
        self.mux = self.services.mux
        self.locks = self.services.locks
        self.terminate = self.services.terminate
        self.sweeper = self.services.sweeper
        self._known_strategies: set[str] = set()
        #: Live workers per strategy they offer, and when that was read (monotonic s).
        self._offers: tuple[float, dict[str, int] | None] = (-1e9, {})
        #: The round of the last pause this registry showed for each session (most recent
        #: ``_ROUNDS_KEPT``): a feed names it, so an answer is never applied to another
        #: round (``StaleRound``), e.g. after a failover took the session back a round.
        self._rounds: OrderedDict[str, int] = OrderedDict()

    @classmethod
    def from_url(cls, url: str, namespace: str = "alc", **overrides: Any) -> SessionRegistry:
        """A registry on the Redis ``url`` names (checked at once: ``InvalidInput``); it
        connects on first use and owns its connections (``aclose``)."""
        settings = Settings.from_url(url, namespace=namespace, **overrides)
        return cls(Transport.from_url(url, timeout_s=settings.redis_timeout_s,
                                      allow_eviction=settings.allow_eviction),
                   settings=settings)

    @property
    def client(self) -> Any:
        """A plain redis-py client on the same server, for tools and tests that inspect
        keys; the registry's own calls never use it."""
        return self.redis.client

    # -- starting -------------------------------------------------------------------------

    async def start_execution(
        self,
        strategy: str,
        input: dict[str, Any] | None = None,
        *,
        budget: dict[str, int] | None = None,
        ttl: float | None = None,
        timeout: float | None = None,
        on_created: Callable[[str], object] | None = None,
        idempotency_key: str | None = None,
    ) -> tuple[str, FeedResult]:
        """Queue the session and return its first event (pause or finish). ``NoWorker`` at
        once, before anything is written, when no live worker offers the strategy: the wait
        could only time out. ``on_created`` hears the session id as soon as it is queued
        (a CLI prints it, so an interrupted wait can be picked up again).
        ``idempotency_key``: a start repeated with the same key (and the same strategy and
        input) within the retention gets the same session and its current event, not a new
        one; another request under a used key is ``IdempotencyConflict``."""
        _check_timeout(timeout)  # before the session exists, not after it was queued
        sid = await self._submit(strategy, input, budget, ttl, need_worker=True,
                                 idempotency_key=idempotency_key)
        if on_created is not None:
            on_created(sid)
        return sid, await self.wait_event(sid, timeout=timeout)

    async def submit(
        self,
        strategy: str,
        input: dict[str, Any] | None = None,
        *,
        budget: dict[str, int] | None = None,
        ttl: float | None = None,
        idempotency_key: str | None = None,
    ) -> Submitted:
        """Create the session and queue its start job without waiting for it. The id
        returned also says how many live workers offer the strategy (``live_workers``): 0
        means none can run it yet, and it waits in the queue for one that can."""
        return await self._submit(strategy, input, budget, ttl, need_worker=False,
                                  idempotency_key=idempotency_key)

    async def _submit(self, strategy: str, input: dict[str, Any] | None,
                      budget: dict[str, int] | None, ttl: float | None, *,
                      need_worker: bool, idempotency_key: str | None = None) -> Submitted:
        if not isinstance(strategy, str) or not strategy:
            raise InvalidInput("strategy must be a non-empty string naming a registered strategy")
        _check_id(strategy, "strategy")
        input = {} if input is None else input
        if not isinstance(input, dict):
            raise InvalidInput(f"input must be a JSON object (dict), not {type(input).__name__}")
        check_json_able(input, what="input", limit=self.settings.max_input_bytes)
        if budget is None and isinstance(input.get("budget"), dict):
            budget = input["budget"]  # algocline's ctx.budget: the limits ride in the input
        if budget is not None:
            budget = _check_budget(budget) or None
        ttl_ms = _ttl_ms(self.settings.session_ttl_s if ttl is None else ttl)
        shards = await self.services.ready()
        await self._check_strategy(strategy)
        live = await self._live_offering(strategy)
        if need_worker and live == 0:
            raise NoWorker(
                f"no live worker offers strategy {strategy!r}, so the session would only "
                "wait: start one (coordinator worker --redis URL, with --import MODULE for "
                "your own strategies); `coordinator strategies` lists what live workers "
                "offer")
        if idempotency_key is not None:
            _check_id(idempotency_key, "idempotency_key")
            sid = shards.session_id_for(idempotency_key)
        else:
            sid = shards.new_session_id()
        reply = await self.scripts.create(
            sid, strategy=strategy, input=pack(input), budget=pack(budget) if budget else b"",
            ttl_ms=ttl_ms, backstop_ms=self.settings.backstop_ms + ttl_ms)
        if reply.code == "CONFLICT":
            raise IdempotencyConflict(
                f"idempotency key {idempotency_key!r:.80} already started session {sid} with "
                "another strategy or input; repeat that request exactly, or use a new key",
                session_id=sid)
        raise_for(reply, session_id=sid)
        return Submitted(sid, live)

    async def _check_strategy(self, strategy: str) -> None:
        if strategy in self._known_strategies:
            return  # names are only ever added, so a positive answer stays true
        known = await self.redis.execute("SMEMBERS", self.keys.strategies)
        names = sorted(text(x) for x in known)
        self._known_strategies.update(names)
        if names and strategy not in names:
            raise UnknownStrategy(
                f"strategy {strategy!r} is not registered by any worker; known: "
                f"{', '.join(names)} (start workers with --import MODULE to add more)"
            )

    async def _live_offering(self, strategy: str) -> int:
        """Live workers offering ``strategy``, from their heartbeats, read at most every
        ``_OFFERS_FRESH_S`` (again at once when the answer was none: a worker may just have
        started). Workers whose report names no strategies (older ones) count as offering
        every registered strategy."""
        at, offers = self._offers
        if time.monotonic() - at >= _OFFERS_FRESH_S or (offers is not None
                                                         and not offers.get(strategy)):
            offers = _offer_counts(await self.worker_stats())
            self._offers = (time.monotonic(), offers)
        if offers is None:  # a worker that does not say: assume the old, uniform fleet
            return len(await self.worker_stats()) or 0
        return offers.get(strategy, 0)

    # -- feeding --------------------------------------------------------------------------

    async def feed_response(
        self,
        session_id: str,
        query_id: str,
        response: str,
        usage: dict[str, int] | None = None,
        *,
        round: int | None = None,
        timeout: float | None = None,
    ) -> FeedResult:
        """Record one answer. ``Accepted(remaining)`` while the round is incomplete, else the
        session's next event once a worker has applied the round.

        ``round`` (a ``Paused.round``) names the round the answer is for: a session at
        another round refuses it with ``StaleRound`` and nothing is written. Without it, a
        session *behind* the last pause this registry showed for it (a failover took it
        back) refuses it the same way; one ahead of it is answered (the host may have seen
        the later round through another process). With neither, the answer is taken for
        the current round."""
        response = check_text(response, what="response", limit=self.settings.max_response_bytes)
        if not isinstance(query_id, str) or not query_id:
            raise InvalidInput("query_id must be a non-empty string such as 'q-0'")
        _check_id(query_id, "query_id")
        _check_id(session_id, "session_id")
        _check_timeout(timeout, session_id=session_id)
        if round is not None and (isinstance(round, bool) or not isinstance(round, int)
                                  or not 0 < round < 2**48):
            raise InvalidInput(f"round must be a positive integer (a Paused.round), got "
                               f"{_short(round)}", session_id=session_id)
        expected = self._rounds.get(session_id, 0) if round is None else round
        await self.services.ready()
        tokens = estimate_tokens(response)
        # "t": when it was answered (Redis's clock), for the conversation history
        record: dict[str, Any] = {"r": response, "t": server_now_ms()}
        prompt_delta, provided = 0, ""
        if usage is not None:
            check_json_able(usage, what="usage", limit=64 * 1024)
            completion, prompt = _usage_counts(usage)
            if completion is not None:
                tokens, provided = completion, "c"
            if prompt is not None:
                # the host's count replaces the estimate made when the query was asked
                prompt_delta = prompt - await self._prompt_estimate(session_id, query_id)
                provided = "p" + provided
            record["u"] = usage
        sk = self.keys.session(session_id)
        async with await self.mux.subscribe(sk.channel) as sub:
            reply = await self.scripts.feed(
                session_id, query_id, answer=pack(record), response_chars=len(response),
                response_tokens=tokens, backstop_ms=self.settings.backstop_ms,
                token=secrets.token_hex(16), lease_ms=self.settings.lease_ms, round=expected,
                exact=round is not None, prompt_delta=prompt_delta, provided=provided,
                timeout=timeout)
            if not reply.ready:
                return Accepted(reply.remaining)
            return await self._await_settled(session_id, sub, timeout,
                                             after_asked=reply.asked)

    async def _prompt_estimate(self, sid: str, query_id: str) -> int:
        """The prompt tokens estimated for ``query_id`` when it was asked (prompt and system
        text): what a host's own ``prompt_tokens`` replaces. 0 for a query not pending (the
        feed then refuses it anyway)."""
        raw = await self.redis.execute("HGET", self.keys.session(sid).pending, query_id)
        if raw is None:
            return 0
        q = LlmQuery.from_record(unpack(raw, what="query", session_id=sid))
        return estimate_tokens(q.prompt) + (estimate_tokens(q.system) if q.system else 0)

    async def resolve_sole_pending_id(self, session_id: str) -> QueryId:
        _check_id(session_id, "session_id")
        await self.services.ready()
        event, _ = await self._read_event(session_id)
        if isinstance(event, Finished):
            # as a feed naming its query is refused: the session takes no more answers
            raise InvalidTransition(
                f"session {session_id} is {event.state.value}: it takes no more answers",
                session_id=session_id, state=event.state.value)
        queries = event.queries if isinstance(event, Paused) else ()
        if len(queries) == 1:
            return QueryId(queries[0].id)
        if not queries:
            raise NoPendingQuery(
                f"session {session_id} is running: its next questions are not asked yet "
                "(wait for its next event, then answer)", session_id=session_id, state="running"
            )
        raise NoPendingQuery(
            f"{len(queries)} queries are pending ({', '.join(q.id for q in queries)}): name "
            "the one you answer (query_id)",
            session_id=session_id, state="paused",
        )

    # -- waiting --------------------------------------------------------------------------

    async def wait_event(self, session_id: str, timeout: float | None = None) -> FeedResult:
        """The session's current settled event: Paused with its unanswered queries, or
        Finished; waits (at most ``timeout``) while it runs."""
        _check_id(session_id, "session_id")
        _check_timeout(timeout, session_id=session_id)
        await self.services.ready()
        async with await self.mux.subscribe(self.keys.session(session_id).channel) as sub:
            return await self._await_settled(session_id, sub, timeout, after_asked=None)

    def _shown(self, sid: str, event: FeedResult | None) -> None:
        """Remember the round of a pause shown for ``sid`` (forget it once finished)."""
        if isinstance(event, Paused):
            self._rounds[sid] = event.round
            self._rounds.move_to_end(sid)
            if len(self._rounds) > _ROUNDS_KEPT:
                self._rounds.popitem(last=False)
        elif isinstance(event, Finished):
            self._rounds.pop(sid, None)

    async def _await_settled(
        self, sid: str, sub: Subscription, timeout: float | None, *, after_asked: int | None
    ) -> FeedResult:
        """Wait for the session to pause after round ``after_asked`` or to finish.
        ``after_asked`` None: first read the state (and take its round from it)."""
        _check_timeout(timeout, session_id=sid)
        bound = self.settings.wait_timeout_s if timeout is None else timeout  # both checked
        deadline = time.monotonic() + bound
        check = after_asked is None
        while True:
            if check:
                event, after_asked = await self._read_event(sid)
                if event is not None:
                    return await self._durable(sid, event)
            left = deadline - time.monotonic()
            if left <= 0:
                raise WaitTimeout(
                    f"session {sid} did not reach its next event within {bound:g} s; it "
                    f"carries on: call wait_event again to re-attach (CLI: coordinator wait "
                    f"{sid})",
                    session_id=sid, state="running",
                )
            msg = await sub.get(min(left, self.settings.wait_slice_s))
            if msg == ACCEPTED:
                check = False  # an answer of the round it waits on: nothing settled
                continue
            if isinstance(msg, bytes):
                paused = parse_pause(msg, after_asked or 0)
                if paused is not None:
                    self._shown(sid, paused)
                    return await self._durable(sid, paused)
            check = True

    async def _durable(self, sid: str, event: FeedResult) -> FeedResult:
        """``event``, once it can no longer be lost: with durability on (``wait_replicas``)
        a host is told a pause or an end only after enough replicas hold it. The step that
        made it waited for them too, but it published first (inside its script), so without
        this a host could be told "completed" and find it paused after a failover."""
        if self.settings.wait_replicas > 0:
            await self.redis.confirm_replicated(
                self.keys.session(sid).sync, replicas=self.settings.wait_replicas,
                wait_ms=self.settings.wait_replicas_timeout_ms)
        return event

    async def _read_event(self, sid: str) -> tuple[FeedResult | None, int]:
        """The settled event now (None while running) and the round the session is in."""
        event, rec = await self._read_settled(sid)
        return event, rec.asked

    async def _read_settled(self, sid: str) -> tuple[FeedResult | None, SessionRecord]:
        """The settled event now (None while running) and the session's record it came from."""
        sk = self.keys.session(sid)
        for _ in range(_READ_TRIES):
            # The session's phase and round are read again after the round: the reads are one
            # write but not one transaction (a least-privilege user has no MULTI), and a round
            # read half before and half after a commit (its queries gone, the next round's in
            # their place) would look corrupt. A commit or an end always moves phase or round
            # (``asked`` only grows), so when both reads agree, the round read is that round.
            replies = checked(await self.redis.execute_many([
                ("HGETALL", sk.session), ("HGETALL", sk.pending), ("HKEYS", sk.answers),
                ("HMGET", sk.session, "phase", "asked")]))
            raw, pending, answered = as_hash(replies[0]), as_hash(replies[1]), replies[2]
            if not raw:
                raise NotFound(
                    f"session {sid} not found: it never existed, or it finished and its "
                    "retention period ran out",
                    session_id=sid,
                )
            stable = [raw.get(b"phase"), raw.get(b"asked")] == list(replies[3])
            if stable:
                break
        rec = SessionRecord.from_hash(sid, raw)
        try:
            event = settled_event(rec, pending, set(answered))
            self._shown(sid, event)
            return event, rec
        except CorruptState as exc:
            if not stable:
                return None, rec  # still moving: its next event will tell
            # A pause whose questions cannot all be read can never be answered (a feed is
            # refused as an unknown query) and no worker will ever look at it: fail it, as a
            # worker would, so every caller from now on sees a failed session, not a stuck one.
            with contextlib.suppress(SessionError):  # this caller hears of it either way
                await self.terminate.fail(sid, exc.message, error_type="corrupt_state",
                                          dead_letter="corrupt state")
            raise exc from None

    # -- observing and ending -------------------------------------------------------------

    async def list_snapshots(
        self,
        pending_filter: FilterSpec = None,
        include_history: bool = False,
    ) -> dict[str, dict[str, Any]]:
        """Snapshots of the sessions held in the registry (paused). Takes no lock."""
        pf = _filter(pending_filter, self.settings.prompt_preview_chars)
        shards = await self.services.ready()
        sids = [text(s) for reply in checked(await self.redis.execute_many(
                    [("ZRANGE", shard.registry, 0, -1) for shard in shards.keys]))
                for s in reply]
        return await snapshot.read_many(
            self.redis.execute_many, self.keys, sids, pending_filter=pf,
            include_history=include_history)

    async def status(
        self,
        session_id: str,
        pending_filter: FilterSpec = None,
        include_history: bool = False,
    ) -> dict[str, Any]:
        """One session's snapshot, live or finished (within retention), with its result, the
        ``input`` it was started with and, while paused, ``round_query_ids``: every query id
        of the round, answered or not (``pending`` lists only the unanswered), so a host can
        say "2 of 3 still missing". Only here: a listing of thousands stays as small as it
        was."""
        _check_id(session_id, "session_id")
        (await self.services.ready()).of(session_id)  # NotFound for an id of no shard
        snaps = await snapshot.read_many(
            self.redis.execute_many, self.keys, [session_id],
            pending_filter=_filter(pending_filter, self.settings.prompt_preview_chars),
            include_history=include_history,
        )
        if session_id not in snaps:
            raise NotFound(f"session {session_id} not found", session_id=session_id)
        snap = {"session_id": session_id, **snaps[session_id]}
        if snap["phase"] == "corrupt":
            return snap  # its error says why; nothing more of it can be read
        if snap["phase"] != "paused" and snap["state"] != "terminal":  # running
            snap["input"] = await self._started_with(session_id)
            return snap
        # A pause or an end: read it whole, which also fails a paused session whose questions
        # are lost (``CorruptState``) rather than show the host a pause it can never feed.
        event, rec = await self._read_settled(session_id)
        snap["input"] = rec.input
        if snap["phase"] == "paused" and rec.phase is Phase.PAUSED \
                and rec.asked == snap["round"]:  # not a later round, read in between
            snap["round_query_ids"] = list(rec.qids)
        if snap["state"] == "terminal" and isinstance(event, Finished):
            snap["result"] = event.result
            if event.error is not None:
                snap["error"] = event.error
                snap["error_type"] = event.error_type or "strategy_error"
                snap["traceback"] = event.traceback
        return snap

    async def _started_with(self, sid: str) -> Any:
        """A running session's input (null when it cannot be decoded: shown, not failed)."""
        raw = await self.redis.execute("HGET", self.keys.session(sid).session, "input")
        try:
            return None if raw is None else unpack(raw, what="input", session_id=sid)
        except CorruptState:
            return None

    async def list_sessions(
        self,
        phase: str | None = None,
        strategy: str | None = None,
        limit: int = 100,
        cursor: str | None = None,
        *,
        pending_filter: FilterSpec = None,
        include_history: bool = False,
    ) -> SessionPage:
        """A page of sessions in any phase, newest activity first, each snapshot with its
        ``session_id`` (running ones say whether they wait for a worker: no step holds
        them). ``next_cursor`` continues (None after the last page). Filtered by
        ``strategy``, a page may hold fewer than ``limit`` (at most ``listing.SCAN_CAP``
        sessions are looked at per call); follow ``next_cursor`` till None. Takes no lock."""
        phases = listing.check_phase(phase)
        listing.check_limit(limit)
        if strategy is not None:
            _check_id(strategy, "strategy")
        after = None if cursor is None else listing.Position.decode(cursor)
        pf = _filter(pending_filter, self.settings.prompt_preview_chars)
        shards = await self.services.ready()
        srcs = listing.sources(shards.keys, phases, server_now_ms(),
                               self.settings.retention_ms)
        if strategy is None:
            page, more = await listing.positions(self.redis.execute_many, srcs, after, limit)
            last = page[-1] if more and page else None
        else:
            page, last = await self._scan_strategy(srcs, after, limit, strategy)
        snaps = await snapshot.read_many(self.redis.execute_many, self.keys,
                                         [p.sid for p in page], pending_filter=pf,
                                         include_history=include_history)
        sessions = [{"session_id": p.sid, **snaps[p.sid]} for p in page if p.sid in snaps]
        await self._mark_waiting(sessions)
        return SessionPage(sessions, None if last is None else last.encode())

    async def _scan_strategy(self, srcs: list[listing.Source], after: listing.Position | None,
                             limit: int, strategy: str
                             ) -> tuple[list[listing.Position], listing.Position | None]:
        """Positions of ``strategy``'s sessions after ``after``: read in chunks, each
        session's strategy field checked, until ``limit`` match or ``SCAN_CAP`` were seen;
        and where the next page starts (None: nothing is left)."""
        found: list[listing.Position] = []
        seen, more, want = 0, True, strategy.encode()
        while more and len(found) < limit and seen < listing.SCAN_CAP:
            chunk, more = await listing.positions(self.redis.execute_many, srcs, after,
                                                  min(max(limit * 2, 200), listing.SCAN_CAP))
            if not chunk:
                break
            names = checked(await self.redis.execute_many(
                [("HGET", self.keys.session(p.sid).session, "strategy") for p in chunk]))
            for pos, name in zip(chunk, names, strict=True):
                after, seen = pos, seen + 1
                if name == want:
                    found.append(pos)
                    if len(found) == limit:
                        break
        # a full page ends at its last match; a short one at the last session looked at
        if len(found) == limit:
            return found, found[-1]
        return found, after if more else None

    async def _mark_waiting(self, sessions: list[dict[str, Any]]) -> None:
        """``waiting_for_worker`` on running sessions: no step holds lock A, so the session
        waits in the queue (for a worker, or for a free slot of one)."""
        running = [s for s in sessions if s.get("phase") == "running"]
        if not running:
            return
        held = checked(await self.redis.execute_many(
            [("EXISTS", self.keys.session(s["session_id"]).lock) for s in running]))
        for snap, lock in zip(running, held, strict=True):
            snap["waiting_for_worker"] = not lock

    async def counts(self) -> dict[str, int]:
        """Sessions per phase (running, paused, completed, failed, cancelled; finished ones
        while retained): one count per index, whatever the number of sessions."""
        shards = await self.services.ready()
        return await listing.counts(self.redis.execute_many, shards.keys, server_now_ms(),
                                    self.settings.retention_ms)

    async def strategies(self) -> dict[str, dict[str, Any]]:
        """The strategies live workers offer: name -> ``name``, ``description`` and
        ``params`` (from the strategy function's docstring and signature, as the workers
        registered them) and ``workers`` (how many live ones offer it)."""
        offers = _offer_counts(await self.worker_stats()) or {}
        self._offers = (time.monotonic(), offers)
        if not offers:
            return {}
        names = sorted(offers)
        blobs = checked(await self.redis.execute_many(
            [("HGET", self.keys.catalog, name) for name in names]))
        out: dict[str, dict[str, Any]] = {}
        for name, blob in zip(names, blobs, strict=True):
            about: Any = None
            if blob is not None:
                with contextlib.suppress(CorruptState):
                    about = unpack(blob, what="strategy description")
            about = about if isinstance(about, dict) else {}
            out[name] = {"name": name, "description": str(about.get("description") or ""),
                         "params": list(about.get("params") or []), "workers": offers[name]}
        return out

    async def cancel(self, session_id: str) -> Finished:
        _check_id(session_id, "session_id")
        await self.services.ready()
        raise_for(await self.terminate.cancel(session_id), session_id=session_id)
        event, _ = await self._read_event(session_id)
        assert isinstance(event, Finished)
        return event

    async def workers(self) -> dict[str, int]:
        """Worker id -> last heartbeat (Unix ms), from the heartbeat index."""
        rows: list[Any] = await self.redis.execute("ZRANGE", self.keys.workers, 0, -1,
                                                   "WITHSCORES")
        # flat from a server, [member, score] pairs from fakeredis
        pairs = rows if rows and isinstance(rows[0], list) else zip(rows[::2], rows[1::2],
                                                                    strict=True)
        return {text(k): int(float(v)) for k, v in pairs}

    async def worker_stats(self) -> dict[str, dict[str, Any]]:
        """Live workers (heartbeat key present) -> their last heartbeat's report: ``at`` (Unix
        ms), ``concurrency``, ``busy`` (steps in flight), ``live`` (executions held in
        memory) and counters since the worker started (``steps``, ``replays``,
        ``fenced_rejections``, ``dead_letters``, ...). As fresh as the last heartbeat (every
        third of ``heartbeat_ttl_ms``); a report that does not decode shows as ``{}``."""
        return await fleet.live_reports(self.redis, self.keys)

    async def dead_letters(self, count: int = 20) -> tuple[int, list[dict[str, str]]]:
        """How many jobs were dead-lettered, and the newest ``count`` of them (over every
        shard, newest first)."""
        if isinstance(count, bool) or not isinstance(count, int) or not 0 < count <= 10_000:
            raise InvalidInput(f"count must be an integer from 1 to 10000, got {count!r}")
        shards = await self.services.ready()
        replies = checked(await self.redis.execute_many([
            command for shard in shards.keys for command in (
                ("XLEN", shard.dead_letters),
                ("XREVRANGE", shard.dead_letters, "+", "-", "COUNT", count))]))
        total = sum(int(n) for n in replies[0::2])
        rows = [row for reply in replies[1::2] for row in reply]
        entries = [{"id": text(i), **{text(k): text(v) for k, v in as_hash(f).items()}}
                   for i, f in rows]
        entries.sort(key=lambda e: tuple(int(p) for p in e["id"].split("-")), reverse=True)
        return total, entries[:count]

    async def gc_sweep(self, now_ms: int | None = None) -> list[str]:
        """Expire idle sessions now (workers also do this every ``gc_interval_s``)."""
        if now_ms is not None and (isinstance(now_ms, bool) or not isinstance(now_ms, int)
                                   or not 0 <= now_ms < 2**53):  # Lua counts in doubles
            raise InvalidInput(f"now_ms must be a Unix time in ms (an integer), got {now_ms!r}")
        await self.services.ready()
        return await self.sweeper.sweep(now_ms=now_ms)

    async def aclose(self) -> None:
        await self.services.aclose()

    async def __aenter__(self) -> SessionRegistry:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


#: How long a registry trusts what it read of the workers' offers (``_live_offering``).
_OFFERS_FRESH_S = 2.0


def _offer_counts(reports: dict[str, dict[str, Any]]) -> dict[str, int] | None:
    """Live workers per offered strategy, from heartbeat reports; None when some live worker
    does not say what it offers (an older worker)."""
    counts: dict[str, int] = {}
    for report in reports.values():
        names = report.get("strategies")
        if not isinstance(names, list):
            return None
        for name in names:
            if isinstance(name, str):
                counts[name] = counts.get(name, 0) + 1
    return counts


#: Reads of a session that a commit landing in between sends round again (``_read_event``).
_READ_TRIES = 3
#: Sessions whose last shown round a registry remembers (a few MB at most).
_ROUNDS_KEPT = 100_000


#: What a pending filter may be: a preset name (or ``PendingFilter``), or algocline's object.
FilterSpec = PendingFilter | str | dict[str, Any] | None


def _filter(value: FilterSpec, preview_chars: int) -> PendingView | None:
    """The fields of pending queries to show, from a preset or algocline's object form."""
    if value is None:
        return None
    if isinstance(value, dict):
        try:
            return PendingView.parse(value, preview_chars)
        except ValueError as exc:
            raise InvalidInput(str(exc)) from None
    try:
        return PendingView.preset(PendingFilter(value), preview_chars)
    except ValueError:
        raise InvalidInput(
            f"pending filter {value!r:.80} is not one of: meta, preview, full, or an object "
            '{"query_id", "max_tokens", "system", "grounded", "underspecified": bool, '
            '"prompt": {"mode": "off" | "preview" | "full", "chars": n}}'
        ) from None


#: Largest budget limit (calls, tokens or ms): far beyond any real budget, and exact in
#: the doubles Lua and JSON readers use; the HTTP API's schema says the same.
MAX_BUDGET = 10**15
#: Longest ids (session, query) and strategy names taken: ours are far shorter, and a
#: longer one would only be copied into every key and message.
MAX_ID_CHARS = 256
#: Longest wait a caller may ask for (``timeout``): longer is a mistake, not a wish.
MAX_TIMEOUT_S = 1e9


_BUDGET_ALLOWED = ("max_llm_calls", "max_tokens", "max_elapsed_ms",
                   "llm_calls", "tokens", "elapsed_ms")


def _check_budget(budget: dict[str, int]) -> dict[str, int]:
    """The budget in algocline's keys (``max_llm_calls``, ``max_tokens``,
    ``max_elapsed_ms``); our former keys (``llm_calls``, ...) are taken as aliases. A limit
    given as null is no limit (as a ``ctx.budget`` may say)."""
    if not isinstance(budget, dict) or not budget:
        raise InvalidInput(f"budget must be a non-empty object with keys from "
                           f"{', '.join(_BUDGET_ALLOWED[:3])}")
    for key, value in budget.items():
        if key not in _BUDGET_ALLOWED:
            raise InvalidInput(f"unknown budget key {key!r}; use {', '.join(_BUDGET_ALLOWED[:3])}"
                               f" (or our former {', '.join(_BUDGET_ALLOWED[3:])})")
        if value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or not 0 < value <= MAX_BUDGET:
            raise InvalidInput(f"budget {key} must be a positive integer up to 10**15, "
                               f"got {_short(value)}")
    normal = normalise_budget(budget)
    if len(normal) != sum(1 for v in budget.values() if v is not None):
        raise InvalidInput("budget names a limit twice (e.g. max_llm_calls and llm_calls)")
    return normal


def _check_id(value: str, what: str) -> None:
    """An id or name becomes part of Redis keys and messages: it must be a short string
    that encodes as UTF-8 (a lone surrogate would fail deep in the client instead)."""
    if not isinstance(value, str) or not value or len(value) > MAX_ID_CHARS:
        raise InvalidInput(f"{what} must be a non-empty string of at most {MAX_ID_CHARS} "
                           f"characters, got {_short(value)}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidInput(f"{what} holds a lone surrogate and is not valid Unicode: "
                           f"{ascii(value)[:80]}") from None


def _check_timeout(timeout: float | None, *, session_id: str | None = None) -> None:
    """None (the configured ``wait_timeout_s``) or a finite number of seconds >= 0: a NaN
    would compare false against every deadline and wait for ever."""
    if timeout is None:
        return
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) \
            or not 0 <= timeout < MAX_TIMEOUT_S:
        raise InvalidInput(f"timeout must be a number of seconds >= 0 and < 1e9, got "
                           f"{_short(timeout)}", session_id=session_id)


def _ttl_ms(ttl: float) -> int:
    """A session's idle ttl in ms: finite, positive, at most ``MAX_TTL_S`` (ten years),
    beyond which Redis expiries and Lua's doubles stop carrying it exactly."""
    if isinstance(ttl, bool) or not isinstance(ttl, int | float) or not 0 < ttl <= MAX_TTL_S:
        # (NaN fails the comparison too)
        raise InvalidInput(f"ttl must be a number of seconds > 0 and <= {MAX_TTL_S:.0f} "
                           f"(ten years), got {_short(ttl)}")
    ttl_ms = int(ttl * 1000)
    if ttl_ms <= 0:
        raise InvalidInput(f"ttl must be at least 1 ms, got {ttl!r}")
    return ttl_ms


def _short(value: object) -> str:
    """A caller's value for a message: its repr, cut short (a huge integer's repr is long,
    and past 4300 digits Python refuses to make it)."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > 10**30:
        return f"an integer of {value.bit_length()} bits"
    try:
        text = repr(value)
    except ValueError:  # an integer of over 4300 digits somewhere inside
        return f"a {type(value).__name__} too large to show"
    return text if len(text) <= 80 else text[:77] + "..."


def _usage_counts(usage: dict[str, int]) -> tuple[int | None, int | None]:
    """The host's (completion, prompt) token counts from ``usage`` (algocline's keys, and the
    usual aliases), each None when not given."""
    if not isinstance(usage, dict):
        raise InvalidInput("usage must be a dict such as {'prompt_tokens': 120, "
                           "'completion_tokens': 42}")

    def first(*keys: str) -> int | None:
        for key in keys:
            value = usage.get(key)
            if isinstance(value, int) and not isinstance(value, bool):
                if not 0 <= value < 2**31:
                    raise InvalidInput(f"usage {key} must be between 0 and 2**31, got {value}")
                return value
        return None

    return (first("completion_tokens", "response_tokens", "output_tokens"),
            first("prompt_tokens", "input_tokens"))
