"""Redis faults (issue 3, item 3): the server restarted under load, crashed, or losing a reply.

Everything runs against a real ``redis-server`` the test owns (``redis_server_factory``) with
real worker processes (``coordinator worker``) and registries in this process:

- **restart under load**: ``appendonly yes``; while 10 sessions are being driven from two
  registries, and two callers are blocked (one in ``feed_response``, one in ``wait_event``) on
  a session whose step is still running, the server is stopped (SIGTERM, or SIGKILL) and
  started again on the same port and directory. Every fact a host saw acknowledged before the
  stop (a created session, an ``Accepted``, a pause, a result) is checked against what the
  server holds right after the restart; then every session must finish with the exact result.
  ``appendfsync always`` must lose nothing, whatever the signal, and neither may a graceful
  stop (SIGTERM flushes the AOF) under ``everysec``. ``everysec`` + SIGKILL is measured:
  anything lost must have been acknowledged within the last seconds before the kill (see
  docs/guarantees.md for what was observed).
- **power loss under everysec**, simulated exactly: the AOF tail written after a checkpoint is
  cut off (what an OS crash does to writes not yet fsynced), and the test shows what a host
  sees then: sessions rolled back to an earlier pause, a new session gone (``NotFound``), a
  finished session paused again; re-attaching with ``wait_event`` and answering what it shows
  finishes every session correctly; a host that goes on from its stale view is refused
  (``StaleRound``) instead of answering an earlier round's question.
- **a reply lost on the wire** (a proxy drops the reply to one command and closes the
  connection, as a restart or a network cut does): the transport sends the command again,
  and every script recognises its own repetition.
- **an outage longer than a call's budget** (``Settings.redis_timeout_s``): the caller gets
  ``Unavailable`` within it, and a worker keeps all its loops running.

No sleeps synchronise anything: waits are events, task completions, or ``assert_eventually``
on Redis state. Servers, proxies and worker processes are torn down whatever the outcome.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import re
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from coordinator.codec import unpack
from coordinator.errors import (
    AlreadyResponded,
    InvalidTransition,
    NotFound,
    StaleRound,
    Unavailable,
)
from coordinator.keys import JOB_GROUP, Keys
from coordinator.models import Accepted, Finished, Paused
from coordinator.registry import SessionRegistry
from coordinator.settings import Settings
from coordinator.states import Phase
from coordinator.transport import RESYNC, Transport
from tests.conftest import RedisServerFactory
from tests.helpers import assert_eventually
from tests.procs import FAST_SETTINGS, WorkerPool, answer_for
from tests.redis_proc import RedisProcess
from tests.strategies_mp import expected_rounds, prompt_for

pytestmark = [pytest.mark.redis]

#: Generous bound on every single wait (typical waits are milliseconds).
WAIT_S = 40.0
SESSIONS = 10
ROUNDS = 4
WIDTH = 2
#: Stop the server once this many rounds (of SESSIONS * ROUNDS) are done: mid-run.
STOP_AFTER_ROUNDS = 8
#: mp-slow sleeps this long in each live step: the blocked callers wait across the restart.
SLOW_DELAY_S = 2.5
#: everysec + SIGKILL: a lost write must have been acknowledged at most this long before the
#: kill (Redis postpones an AOF write for up to 2 s while a background fsync is slow).
EVERYSEC_LOSS_WINDOW_S = 3.0

_ROUND = re.compile(r"^session (?P<tag>\S+): round (?P<round>\d+), item (?P<item>\d+)$")


def round_of(prompt: str) -> int:
    """The round an mp-rounds prompt belongs to (prompts name their round and item)."""
    m = _ROUND.match(prompt)
    assert m is not None, f"not an mp-rounds prompt: {prompt!r}"
    return int(m["round"])


def new_namespace() -> str:
    return f"fr{secrets.token_hex(4)}"


def observer_client(url: str) -> Redis:
    """A plain redis-py client for reading what the server holds, which rides out the
    test's own restarts (capped backoff, ~25 s): the observer is not what is under test."""
    return Redis.from_url(
        url, retry=Retry(ExponentialBackoff(cap=1.0, base=0.02), retries=30),
        retry_on_error=[RedisConnectionError, RedisTimeoutError, ConnectionResetError],
        socket_connect_timeout=5)


# -- what the host saw, and what the server holds ---------------------------------------------


@dataclass(frozen=True)
class Fact:
    """One thing a host saw acknowledged, at monotonic time ``t``."""

    t: float
    kind: str  # "created" | "feed" | "paused" | "finished"
    sid: str
    round: int = -1  # feed: the round (0-based) of the query; paused: rounds asked so far
    qid: str = ""
    answer: str = ""

    def __str__(self) -> str:
        what = {"created": "", "finished": "",
                "feed": f" round {self.round} {self.qid}={self.answer[:24]!r}",
                "paused": f" asked={self.round}"}[self.kind]
        return f"{self.kind} {self.sid[-8:]}{what}"


@dataclass
class Truth:
    """One session as the server holds it, read atomically (MULTI)."""

    exists: bool
    phase: Phase | None = None
    asked: int = 0
    answers: dict[str, str] = field(default_factory=dict)  # the open round's answers
    journal: list[dict[str, str]] = field(default_factory=list)  # applied rounds: qid -> answer

    def holds(self, fact: Fact) -> bool:
        if fact.kind == "created":
            return self.exists
        if not self.exists or self.phase is None:
            return False
        if fact.kind == "finished":
            return self.phase.terminal
        if fact.kind == "paused":
            return self.phase.terminal or self.asked >= fact.round
        # a feed: applied with its round (journal), or recorded in the open round
        if len(self.journal) > fact.round:
            return self.journal[fact.round].get(fact.qid) == fact.answer
        return self.asked == fact.round + 1 and self.answers.get(fact.qid) == fact.answer


async def read_truth(client: Redis, keys: Keys, sid: str) -> Truth:
    sk = keys.session(sid)
    pipe = client.pipeline(transaction=True)
    pipe.hgetall(sk.session)
    pipe.hgetall(sk.answers)
    pipe.lrange(sk.journal, 0, -1)
    raw, answers, journal = await pipe.execute()
    if not raw:
        return Truth(exists=False)
    rounds = []
    for entry in journal:
        _digest, triples = unpack(entry)
        rounds.append({row[0]: row[2] for row in triples})  # (id, prompt, answer, facts)
    return Truth(
        exists=True,
        phase=Phase(raw[b"phase"].decode()),
        asked=int(raw.get(b"asked", b"0")),
        answers={k.decode(): unpack(v)["r"] for k, v in answers.items()},
        journal=rounds,
    )


async def lost_facts(client: Redis, keys: Keys, facts: list[Fact]) -> list[Fact]:
    """The facts the server no longer holds."""
    truths = {sid: await read_truth(client, keys, sid) for sid in {f.sid for f in facts}}
    return [f for f in facts if not truths[f.sid].holds(f)]


# -- hosts ------------------------------------------------------------------------------------


@dataclass
class Hosts:
    """Drives mp-rounds sessions from two registries like a careful host: it answers the
    prompts it is shown, and when a feed's outcome does not follow the rules (``Accepted``
    where the round should have completed) or a feed comes back as a duplicate / wrong-state
    error, it re-attaches with ``wait_event`` and answers whatever that shows.

    Every acknowledgement is logged as a ``Fact`` with its time; every re-attach is logged
    with the call's start and end times, so a test can tell which calls spanned the restart.
    """

    regs: list[SessionRegistry]
    rng: random.Random
    facts: list[Fact] = field(default_factory=list)
    #: (start, end, description) of calls that needed a re-attach
    reattaches: list[tuple[float, float, str]] = field(default_factory=list)
    rounds_done: int = 0
    trigger_at: int = 0
    trigger: asyncio.Event = field(default_factory=asyncio.Event)

    def note(self, kind: str, sid: str, **kw: Any) -> None:
        self.facts.append(Fact(time.monotonic(), kind, sid, **kw))

    def note_event(self, sid: str, ev: Any) -> None:
        if isinstance(ev, Paused):
            self.note("paused", sid, round=round_of(ev.queries[0].prompt) + 1)
        elif isinstance(ev, Finished):
            self.note("finished", sid)

    async def create(self, n: int) -> str:
        sid = await self.regs[n % 2].submit(
            "mp-rounds", {"tag": f"s{n}", "rounds": ROUNDS, "width": WIDTH})
        self.note("created", sid)
        return sid

    async def drive(self, n: int, sid: str) -> Any:
        reg, other = self.regs[n % 2], self.regs[(n + 1) % 2]
        ev = await other.wait_event(sid, timeout=WAIT_S)
        self.note_event(sid, ev)
        while isinstance(ev, Paused):
            ev = await self._answer(n, sid, ev, reg)
            if ev is None:  # re-attach
                ev = await other.wait_event(sid, timeout=WAIT_S)
            self.note_event(sid, ev)
        return ev

    async def _answer(self, n: int, sid: str, ev: Paused, reg: SessionRegistry) -> Any:
        queries = list(ev.queries)
        self.rng.shuffle(queries)
        for i, q in enumerate(queries):
            started = time.monotonic()
            answer = answer_for(q.prompt)
            try:
                res = await reg.feed_response(sid, q.id, answer, timeout=WAIT_S)
            except (AlreadyResponded, InvalidTransition) as exc:
                self.reattaches.append((started, time.monotonic(),
                                        f"{sid[-8:]} {q.id}: {type(exc).__name__} {exc}"))
                return None
            self.note("feed", sid, round=round_of(q.prompt), qid=q.id, answer=answer)
            if isinstance(res, Accepted):
                if res.remaining != len(queries) - i - 1:  # an earlier answer is not there
                    self.reattaches.append((started, time.monotonic(),
                                            f"{sid[-8:]} {q.id}: {res} after {i} answers"))
                    return None
                continue
            self.rounds_done += 1
            if self.rounds_done == self.trigger_at:
                self.trigger.set()
            return res
        # every answer came back Accepted: the round did not complete as the rules say
        self.reattaches.append((time.monotonic(), time.monotonic(), f"{sid[-8:]} incomplete"))
        return None


# -- fixtures ---------------------------------------------------------------------------------


@dataclass
class Rig:
    server: RedisProcess
    namespace: str
    pool: WorkerPool
    regs: list[SessionRegistry]
    observer: Redis

    @property
    def keys(self) -> Keys:
        return Keys(self.namespace)


@contextlib.asynccontextmanager
async def rig(server: RedisProcess, tmp_path: Path, workers: int = 2) -> AsyncIterator[Rig]:
    namespace = new_namespace()
    pool = WorkerPool(server.url, namespace, tmp_path)
    regs: list[SessionRegistry] = []
    observer = observer_client(server.url)
    try:
        for _ in range(workers):
            await pool.start(concurrency=4)
        regs = [SessionRegistry.from_url(server.url, namespace=namespace, **FAST_SETTINGS)
                for _ in range(2)]
        yield Rig(server, namespace, pool, regs, observer)
    finally:
        for reg in regs:
            with contextlib.suppress(Exception):
                await reg.aclose()
        with contextlib.suppress(Exception):
            await observer.aclose()
        pool.close()


async def numsub(client: Redis, channel: str) -> int:
    [(_, n)] = await client.pubsub_shardnumsub(channel)
    return int(n)


# -- 1. restart under load ----------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    ("appendfsync", "signal_name"),
    [("always", "SIGTERM"), ("always", "SIGKILL"), ("everysec", "SIGTERM"),
     ("everysec", "SIGKILL")],
)
async def test_redis_restart_mid_run_every_session_finishes(
    redis_server_factory: RedisServerFactory, tmp_path: Path, appendfsync: str, signal_name: str
) -> None:
    server = redis_server_factory(appendonly=True, appendfsync=appendfsync)
    seed = random.randrange(2**32)
    ctx = f"(seed {seed}, appendfsync {appendfsync}, {signal_name})"
    async with rig(server, tmp_path) as r:
        reg_a, reg_b = r.regs
        hosts = Hosts(r.regs, random.Random(seed), trigger_at=STOP_AFTER_ROUNDS)

        # Two callers blocked on a session whose step runs (sleeps) across the restart: one
        # in feed_response (it sent the round's last answer), one in wait_event.
        slow_sid, first = await reg_a.start_execution(
            "mp-slow", {"tag": "slow", "delay": SLOW_DELAY_S}, timeout=WAIT_S)
        assert isinstance(first, Paused) and len(first.queries) == 2, first
        assert await reg_a.feed_response(slow_sid, "q-0", "slow-a") == Accepted(1)
        feed_waiter = asyncio.create_task(
            reg_a.feed_response(slow_sid, "q-1", "slow-b", timeout=WAIT_S))
        slow_key = r.keys.session(slow_sid).session

        async def slow_running() -> bool:
            return await r.observer.hget(slow_key, "phase") == b"running"

        await assert_eventually(slow_running, timeout=WAIT_S, message="slow step never ran")
        wait_waiter = asyncio.create_task(reg_b.wait_event(slow_sid, timeout=WAIT_S))
        channel = r.keys.session(slow_sid).channel

        async def both_subscribed() -> bool:
            return await numsub(r.observer, channel) >= 2

        await assert_eventually(both_subscribed, timeout=WAIT_S,
                                message="the two callers never subscribed")

        sids = [await hosts.create(n) for n in range(SESSIONS)]
        drivers = [asyncio.create_task(hosts.drive(n, sid)) for n, sid in enumerate(sids)]
        try:
            await asyncio.wait_for(hosts.trigger.wait(), WAIT_S)
            assert not feed_waiter.done() and not wait_waiter.done(), (
                f"the blocked callers returned before the stop: the test's premise failed {ctx}")
            assert hosts.rounds_done < SESSIONS * ROUNDS, f"not mid-run {ctx}"

            before = list(hosts.facts)
            stopped_at = time.monotonic()
            if signal_name == "SIGTERM":
                await asyncio.to_thread(server.stop)
            else:
                await asyncio.to_thread(server.kill)
            await asyncio.to_thread(server.start)
            restarted_at = time.monotonic()

            # What the hosts saw acknowledged before the stop, checked against the server.
            lost = await lost_facts(r.observer, r.keys, before)
            if appendfsync == "always" or signal_name == "SIGTERM":
                # fsynced before the reply, or flushed by a graceful shutdown
                assert not lost, (
                    f"{len(lost)} acknowledged facts lost {ctx}: "
                    + ", ".join(map(str, lost[:10])))
            else:
                early = [f for f in lost if f.t < stopped_at - EVERYSEC_LOSS_WINDOW_S]
                assert not early, (
                    f"writes acknowledged more than {EVERYSEC_LOSS_WINDOW_S} s before the kill "
                    f"were lost {ctx}: " + ", ".join(map(str, early[:10])))

            down_s = restarted_at - stopped_at
            events = await asyncio.wait_for(asyncio.gather(*drivers), WAIT_S * 2)
            await asyncio.wait_for(asyncio.gather(feed_waiter, wait_waiter), WAIT_S)
        finally:
            for task in (*drivers, feed_waiter, wait_waiter):
                task.cancel()
            await asyncio.gather(*drivers, feed_waiter, wait_waiter, return_exceptions=True)

        # The blocked callers got the event of the step that ran across the restart.
        second = feed_waiter.result()
        assert isinstance(second, Paused), f"{second} {ctx}\n{r.pool.logs()}"
        assert [q.prompt for q in second.queries] == ["slow second"], second
        assert wait_waiter.result() == second
        done = await reg_b.feed_response(slow_sid, "q-0", "slow-c", timeout=WAIT_S)
        assert isinstance(done, Finished) and done.state is Phase.COMPLETED, done
        assert done.result == {"tag": "slow", "first": ["slow-a", "slow-b"],
                               "second": "slow-c"}

        # Every session finished with the exact result, each round applied exactly once.
        lost_now = {f.sid for f in lost}
        for n, (sid, ev) in enumerate(zip(sids, events, strict=True)):
            assert isinstance(ev, Finished), f"{sid}: {ev} {ctx}"
            expected = {"tag": f"s{n}", "rounds": expected_rounds(f"s{n}", ROUNDS, WIDTH,
                                                                   answer_for)}
            if sid not in lost_now:
                assert ev.state is Phase.COMPLETED, f"{sid}: {ev.error} {ctx}"
                assert ev.result == expected, f"{sid}: wrong result {ev.result} {ctx}"
                auto = ev.metrics["auto"]
                assert auto["rounds"] == ROUNDS and auto["pauses"] == ROUNDS, (
                    sid, ev.metrics, ctx)
                assert await r.observer.llen(r.keys.session(sid).journal) == ROUNDS

        # What a host saw, for docs/guarantees.md (shown with -s, or when the test fails).
        print(f"\nrestart {ctx}: down {down_s:.2f} s; {len(before)} facts acknowledged before "
              f"the stop, {len(lost)} lost ({', '.join(map(str, lost[:5]))}); "
              f"{len(hosts.reattaches)} re-attaches: "
              + "; ".join(w for _, _, w in hosts.reattaches[:5]))

        # Re-attaches happen only for calls that were in flight across the restart (a reply
        # lost with the connection: see test_feed_whose_reply_was_lost_*), or, everysec,
        # for sessions that lost acknowledged writes.
        for start, end, what in hosts.reattaches:
            in_flight = start <= restarted_at and end >= stopped_at
            assert in_flight or lost, f"re-attach outside the restart window: {what} {ctx}"

        # Workers and registries reconnected: heartbeats are back, every process's pub/sub
        # connection is subscribed again, no job is left pending, no worker process exited.
        assert all(w.proc.poll() is None for w in r.pool.procs), r.pool.logs()
        ids = {w.worker_id for w in r.pool.procs}

        async def reconnected() -> bool:
            homes = [await numsub(r.observer, reg.mux._home) for reg in r.regs]
            nudges = [await numsub(r.observer, r.keys.worker_nudge(w)) for w in ids]
            return (set(await reg_a.workers()) >= ids
                    and all([await r.observer.exists(r.keys.worker(w)) for w in ids])
                    and await numsub(r.observer, r.keys.jobs_wake) >= len(ids)
                    and min(homes + nudges) >= 1)

        await assert_eventually(reconnected, timeout=WAIT_S,
                                message=f"heartbeats / subscriptions did not come back {ctx}")

        async def no_pending_jobs() -> bool:
            info = await r.observer.xpending(r.keys.jobs, JOB_GROUP)
            return int(info["pending"]) == 0

        await assert_eventually(no_pending_jobs, timeout=WAIT_S,
                                message=f"jobs left pending {ctx}")


# -- 2. everysec: the tail of the AOF lost (power loss), exactly --------------------------------


def incr_aof(server: RedisProcess) -> Path:
    """The AOF file Redis 7 appends to: the last ``type i`` file in the manifest."""
    aof_dir = server.dir / "appendonlydir"
    manifest = (aof_dir / "appendonly.aof.manifest").read_text()
    names = [line.split()[1] for line in manifest.splitlines() if line.split()[-1:] == ["i"]]
    assert names, f"no incremental AOF in the manifest:\n{manifest}"
    return aof_dir / names[-1]


async def aof_checkpoint(server: RedisProcess, client: Redis) -> int:
    """Wait until everything acknowledged is written to the AOF, and return its size."""

    async def flushed() -> bool:
        info = await client.info("persistence")
        return int(info["aof_buffer_length"]) == 0 and int(info["aof_pending_bio_fsync"]) == 0

    await assert_eventually(flushed, timeout=WAIT_S, message="the AOF never caught up")
    return incr_aof(server).stat().st_size


@pytest.mark.slow
async def test_everysec_power_loss_rolls_sessions_back_to_what_was_on_disk(
    redis_server_factory: RedisServerFactory, tmp_path: Path
) -> None:
    """With ``appendfsync everysec``, a crash of the machine (not just of redis-server) loses
    the writes of the last second that were not fsynced yet. Simulated exactly: the AOF is cut
    back to a checkpoint taken before the last operations, then Redis restarts from it."""
    server = redis_server_factory(appendonly=True, appendfsync="everysec")
    async with rig(server, tmp_path, workers=1) as r:
        reg, other = r.regs
        mp = {"rounds": 2, "width": 2}
        careful, first = await reg.start_execution("mp-rounds", {"tag": "careful", **mp},
                                                   timeout=WAIT_S)
        stale, _ = await reg.start_execution("mp-rounds", {"tag": "stale", **mp},
                                             timeout=WAIT_S)
        short, _ = await reg.start_execution("mp-rounds", {"tag": "short", "rounds": 1,
                                                           "width": 1}, timeout=WAIT_S)
        assert isinstance(first, Paused)
        for sid, tag in ((careful, "careful"), (stale, "stale")):
            ok = await reg.feed_response(sid, "q-0", answer_for(prompt_for(tag, 0, 0)))
            assert ok == Accepted(1)

        checkpoint = await aof_checkpoint(server, r.observer)

        # "The last second": acknowledged, then lost with the machine.
        for sid, tag in ((careful, "careful"), (stale, "stale")):
            ev = await reg.feed_response(sid, "q-1", answer_for(prompt_for(tag, 0, 1)),
                                         timeout=WAIT_S)
            assert isinstance(ev, Paused) and ev.queries[0].prompt == prompt_for(tag, 1, 0)
            ok = await reg.feed_response(sid, "q-0", answer_for(prompt_for(tag, 1, 0)))
            assert ok == Accepted(1)
        done = await reg.feed_response(short, "q-0", answer_for(prompt_for("short", 0, 0)),
                                       timeout=WAIT_S)
        assert isinstance(done, Finished) and done.state is Phase.COMPLETED
        newborn, born = await reg.start_execution("mp-rounds", {"tag": "new", **mp},
                                                  timeout=WAIT_S)
        assert isinstance(born, Paused)

        await asyncio.to_thread(server.kill)
        aof = incr_aof(server)
        assert aof.stat().st_size > checkpoint
        with aof.open("r+b") as fh:
            fh.truncate(checkpoint)
        await asyncio.to_thread(server.start)

        # A session created in the lost second is gone: NotFound everywhere, at once.
        for call in (lambda: other.wait_event(newborn, timeout=5),
                     lambda: other.status(newborn),
                     lambda: other.feed_response(newborn, "q-0", "x")):
            with pytest.raises(NotFound) as info:
                await asyncio.wait_for(call(), 10)
            assert info.value.session_id == newborn and "not found" in info.value.message

        # A session that finished in the lost second is paused again on its question.
        again = await other.wait_event(short, timeout=WAIT_S)
        assert isinstance(again, Paused)
        assert [q.prompt for q in again.queries] == [prompt_for("short", 0, 0)]
        assert (await other.status(short))["phase"] == "paused"

        # The others are back where they were at the checkpoint: round 0 with q-0 answered.
        # The pause of round 1 the host saw, and its Accepted(1) in round 1, are gone.
        for sid, tag in ((careful, "careful"), (stale, "stale")):
            back = await other.wait_event(sid, timeout=WAIT_S)
            assert isinstance(back, Paused)
            assert [(q.id, q.prompt) for q in back.queries] == [("q-1", prompt_for(tag, 0, 1))]
            snap = await other.status(sid)
            assert (snap["phase"], snap["metrics"]["rounds"]) == ("paused", 0)

        # A careful host re-attaches and answers what it is shown: exact result.
        async def finish(sid: str) -> Finished:
            ev = await other.wait_event(sid, timeout=WAIT_S)
            while isinstance(ev, Paused):
                for q in ev.queries:
                    ev = await other.feed_response(sid, q.id, answer_for(q.prompt),
                                                   timeout=WAIT_S)
            assert isinstance(ev, Finished)
            return ev

        final = await finish(careful)
        assert final.state is Phase.COMPLETED
        assert final.result == {"tag": "careful",
                             "rounds": expected_rounds("careful", 2, 2, answer_for)}
        redone = await finish(short)
        assert redone.result == done.result  # the same answers give the same result

        # A host that goes on from its stale view (it believes round 1 is open with q-0
        # answered) sends round 1's q-1 answer. Query ids restart each round, so taken, it
        # would answer round 0's q-1 with round 1's answer. The registry showed that host
        # round 1 and the session is back at round 0: refused, nothing written.
        wrong = answer_for(prompt_for("stale", 1, 1))
        with pytest.raises(StaleRound) as refused:
            await reg.feed_response(stale, "q-1", wrong, timeout=WAIT_S)
        assert refused.value.state == "round 1"  # the round the session is at (1-based)
        assert (await read_truth(r.observer, r.keys, stale)).journal == []
        # Re-attaching and answering what it is shown finishes it exactly.
        ev = await reg.wait_event(stale, timeout=WAIT_S)
        while isinstance(ev, Paused):
            for q in ev.queries:
                ev = await reg.feed_response(stale, q.id, answer_for(q.prompt),
                                             timeout=WAIT_S)
        assert isinstance(ev, Finished) and ev.result == {
            "tag": "stale", "rounds": expected_rounds("stale", 2, 2, answer_for)}

        # The worker process (whose live executions were ahead of Redis) followed the
        # rollback: it is alive, and no job is left pending.
        assert all(w.proc.poll() is None for w in r.pool.procs), r.pool.logs()

        async def no_pending_jobs() -> bool:
            info = await r.observer.xpending(r.keys.jobs, JOB_GROUP)
            return int(info["pending"]) == 0

        await assert_eventually(no_pending_jobs, timeout=WAIT_S, message="jobs left pending")


# -- 3. a reply lost on the wire --------------------------------------------------------------


class DropReplyProxy:
    """A TCP proxy in front of Redis that, once armed with a marker, forwards the first
    client request containing it, then drops the server's reply and cuts the connection:
    the command was applied, the client never hears so (a restart or a network cut)."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.marker: bytes | None = None
        self.dropped = 0
        self.port = 0
        self._server: asyncio.Server | None = None
        self._conns: set[asyncio.Task[None]] = set()
        self._transports: set[asyncio.BaseTransport] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def arm(self, marker: bytes) -> None:
        self.marker = marker

    async def _handle(self, cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._conns.add(task)
        self._transports.add(cw.transport)
        try:
            ur, uw = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        except OSError:
            cw.transport.abort()
            self._conns.discard(task)
            return
        self._transports.add(uw.transport)
        armed = asyncio.Event()

        async def up() -> None:
            with contextlib.suppress(OSError, ConnectionError):
                while data := await cr.read(65536):
                    if self.marker is not None and self.marker in data:
                        self.marker = None
                        armed.set()
                    uw.write(data)
                    await uw.drain()
            uw.close()

        async def down() -> None:
            with contextlib.suppress(OSError, ConnectionError):
                while data := await ur.read(65536):
                    if armed.is_set():
                        self.dropped += 1
                        cw.transport.abort()
                        uw.transport.abort()
                        return
                    cw.write(data)
                    await cw.drain()
            cw.close()

        try:
            await asyncio.gather(up(), down())
        finally:
            cw.transport.abort()
            uw.transport.abort()
            self._transports.difference_update({cw.transport, uw.transport})
            self._conns.discard(task)

    async def aclose(self) -> None:
        """Cut every connection (its pumps then end on their own) and stop listening."""
        if self._server is not None:
            self._server.close()
        for transport in list(self._transports):
            transport.abort()  # type: ignore[attr-defined]
        await asyncio.gather(*self._conns, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()


@dataclass
class WireRig:
    reg: SessionRegistry  # talks to Redis through the proxy
    proxy: DropReplyProxy
    worker: Any
    observer: Redis  # straight to Redis, for reading what the server holds


@pytest.fixture
async def wire(redis_url: str) -> AsyncIterator[WireRig]:
    """A registry behind the proxy, an in-process worker connected directly."""
    from workers import catalog
    from workers.worker import Worker

    catalog.load(["tests.strategies_mp"])
    port = int(redis_url.rsplit(":", 1)[1].split("/")[0])
    proxy = DropReplyProxy(port)
    await proxy.start()
    settings = Settings(namespace=new_namespace(), wait_slice_s=0.1, wait_timeout_s=10.0)
    worker = Worker(Transport.from_url(redis_url), settings, concurrency=4)
    await worker.start()
    reg = SessionRegistry(Transport.from_url(proxy.url), settings=settings)
    observer = Redis.from_url(redis_url)
    try:
        # Warm the scripts up, so an armed drop hits the command itself, not a NOSCRIPT.
        sid, ev = await reg.start_execution("mp-rounds", {"tag": "warm", "rounds": 1,
                                                          "width": 2})
        assert isinstance(ev, Paused)
        await reg.feed_response(sid, "q-0", "warm")
        yield WireRig(reg, proxy, worker, observer)
    finally:
        await reg.aclose()
        await worker.shutdown(grace_s=1.0)
        await observer.aclose()
        await proxy.aclose()


async def test_feed_whose_reply_was_lost_is_not_reported_as_a_duplicate(wire: WireRig) -> None:
    """The transport re-sends a command whose reply was lost. ``feed.lua``'s second run must
    recognise its own answer (by the call's token), not say ALREADY_RESPONDED (which would
    tell the host its recorded answer was refused): the feed's real outcome, ``Accepted(1)``."""
    reg = wire.reg
    sid, _ = await reg.start_execution("mp-rounds", {"tag": "w1", "rounds": 1, "width": 2})
    wire.proxy.arm(b"LOST-REPLY-1")
    result: Any
    try:
        result = await reg.feed_response(sid, "q-0", "LOST-REPLY-1 answer")
    except AlreadyResponded as exc:
        result = exc
    assert wire.proxy.dropped == 1
    truth = await read_truth(wire.observer, reg.keys, sid)
    assert truth.answers == {"q-0": "LOST-REPLY-1 answer"}  # recorded once
    assert result == Accepted(1), (
        f"the feed was recorded, but the caller got {result!r}: a retried feed.lua call "
        "reports the caller's own answer as a duplicate")


async def test_last_feed_whose_reply_was_lost_returns_the_next_event(wire: WireRig) -> None:
    """The round's last answer: the retried call finds the session running (or already at
    its next event); it must not raise InvalidTransition (the caller would lose the event it
    waits for). Expected: the next event (here the session's result)."""
    reg = wire.reg
    sid, _ = await reg.start_execution("mp-rounds", {"tag": "w2", "rounds": 1, "width": 1})
    wire.proxy.arm(b"LOST-REPLY-2")
    result: Any
    try:
        result = await reg.feed_response(sid, "q-0", "LOST-REPLY-2 answer")
    except InvalidTransition as exc:
        result = exc
    assert wire.proxy.dropped == 1
    final = await reg.wait_event(sid)  # the session itself went on fine
    assert isinstance(final, Finished) and final.result == {
        "tag": "w2", "rounds": [["LOST-REPLY-2 answer"]]}
    assert result == final, (
        f"the round completed, but the caller got {result!r} instead of its next event")


async def test_submit_whose_reply_was_lost_returns_the_session(wire: WireRig) -> None:
    """``create.lua`` re-sent finds its own session; ``submit`` must not turn that into an
    error (the session it created would run on, unknown to the caller). Expected: the
    session id."""
    reg = wire.reg

    async def sessions() -> int:  # session hashes, ``ns:{sid}`` (a session's other keys go on)
        return len(await wire.observer.keys(f"{reg.keys.namespace}:{{*}}"))

    before = await sessions()
    wire.proxy.arm(b"LOST-REPLY-3")
    result: Any
    try:
        result = await reg.submit("mp-rounds", {"tag": "LOST-REPLY-3", "rounds": 1,
                                                "width": 1})
    except Exception as exc:
        result = exc
    assert wire.proxy.dropped == 1
    assert await sessions() == before + 1  # created once
    assert isinstance(result, str), (
        f"the session was created, but submit raised {result!r}; the caller cannot reach it")
    ev = await reg.wait_event(result)
    assert isinstance(ev, Paused)


async def test_commit_whose_reply_was_lost_is_applied_once(
    redis_url: str, tmp_path: Path
) -> None:
    """The worker's ``commit_step`` re-sent after a lost reply is refused (the session moved
    on), the step counts once, and the session goes on correctly (replayed next round)."""
    from workers import catalog
    from workers.worker import Worker

    catalog.load(["tests.strategies_mp"])
    port = int(redis_url.rsplit(":", 1)[1].split("/")[0])
    proxy = DropReplyProxy(port)
    await proxy.start()
    settings = Settings(namespace=new_namespace(), wait_slice_s=0.1, wait_timeout_s=10.0)
    worker = Worker(Transport.from_url(proxy.url), settings, concurrency=2)
    reg = SessionRegistry(Transport.from_url(redis_url), settings=settings)
    observer = Redis.from_url(redis_url)
    try:
        await worker.start()
        # warm the worker's scripts up, so the drop hits the commit, not a NOSCRIPT reply
        _, warm = await reg.start_execution("mp-rounds", {"tag": "warm", "rounds": 1,
                                                          "width": 1})
        assert isinstance(warm, Paused)
        # the first commit whose arguments carry this tag (in its prompts) loses its reply
        proxy.arm(b"LOSTCOMMIT")
        sid, ev = await reg.start_execution("mp-rounds", {"tag": "LOSTCOMMIT", "rounds": 3,
                                                          "width": 2})
        assert proxy.dropped == 1
        while isinstance(ev, Paused):
            for q in ev.queries:
                ev = await reg.feed_response(sid, q.id, answer_for(q.prompt))
        assert isinstance(ev, Finished) and ev.state is Phase.COMPLETED, ev
        assert ev.result == {"tag": "LOSTCOMMIT",
                             "rounds": expected_rounds("LOSTCOMMIT", 3, 2, answer_for)}
        assert ev.metrics["auto"]["pauses"] == 3 and ev.metrics["auto"]["rounds"] == 3
        assert ev.metrics["auto"]["llm_calls"] == 6  # counted once, not twice
        assert await observer.llen(reg.keys.session(sid).journal) == 3
        assert worker.stats.replays >= 1  # the live execution was dropped with the reply
    finally:
        await reg.aclose()
        await worker.shutdown(grace_s=1.0)
        await observer.aclose()
        await proxy.aclose()


async def test_waiters_are_told_to_recheck_after_a_restart(
    redis_server_factory: RedisServerFactory,
) -> None:
    """``coordinator/transport/pubsub.py`` promises: "after a reconnect every subscription
    gets a RESYNC marker once its channel is confirmed again", because messages published
    while the connection was down are lost. The multiplexer owns its connection (nothing
    below it reconnects behind its back), so it sees the break, counts it and resyncs: a
    waiter does not have to wait out its slice (a worker's lost nudge: the next autoclaim)."""
    server = redis_server_factory(appendonly=True, appendfsync="always")
    transport = Transport.from_url(server.url)
    mux = transport.multiplexer("fr-home")
    client = observer_client(server.url)
    try:
        sub = await mux.subscribe("fr-chan")
        await asyncio.to_thread(server.stop)
        await asyncio.to_thread(server.start)

        async def subscribed_again() -> bool:
            return await numsub(client, "fr-chan") >= 1

        await assert_eventually(subscribed_again, timeout=WAIT_S,
                                message="the multiplexer never re-subscribed")
        # re-subscribed: whatever was published meanwhile is lost, so the waiter must have
        # been (or be about to be) told to re-check
        first = await sub.get(5.0)
        assert first is RESYNC, (
            f"after the restart the waiter got {first!r}, not RESYNC (mux.reconnects "
            f"{mux.reconnects}); messages published while it was away are lost unseen")
        assert mux.reconnects >= 1
        await client.spublish("fr-chan", "after")
        assert await sub.get(WAIT_S) == b"after"  # and the subscription works again
    finally:
        await transport.aclose()
        await client.aclose()


# -- 4. an outage longer than a call's budget ----------------------------------------------------

#: The budget of each Redis call in the outage test (``Settings.redis_timeout_s``).
OUTAGE_BUDGET_S = 1.0


async def test_outage_longer_than_the_call_budget(
    redis_server_factory: RedisServerFactory,
) -> None:
    """A call made while Redis is down past its budget raises ``Unavailable`` (a
    ``SessionError``, never redis-py's own errors) within that budget; once Redis is back the
    same registry and worker carry on, and every worker loop (jobs, nudges, heartbeat,
    autoclaim, gc) still runs, so a session held live by the worker resumes at once."""
    from workers import catalog
    from workers.worker import Worker

    server = redis_server_factory(appendonly=True, appendfsync="always")
    catalog.load(["tests.strategies_mp"])
    settings = Settings(namespace=new_namespace(), wait_slice_s=0.1, wait_timeout_s=10.0,
                        redis_timeout_s=OUTAGE_BUDGET_S)
    worker = Worker(Transport.from_url(server.url, timeout_s=OUTAGE_BUDGET_S), settings,
                    concurrency=2)
    reg = SessionRegistry(Transport.from_url(server.url, timeout_s=OUTAGE_BUDGET_S),
                          settings=settings)
    # Record which worker task saw a Redis call fail while Redis was down, and how (the
    # nudge loop claims on every RESYNC its subscription gets when the pub/sub connection
    # breaks). Spied on the worker's transport, whatever object of the worker makes the call.
    failed_in: list[str] = []
    other_errors: list[str] = []
    execute = worker.redis.execute

    async def spied_execute(*args: Any, **kwargs: Any) -> Any:
        try:
            return await execute(*args, **kwargs)
        except Exception as exc:
            task = asyncio.current_task()
            failed_in.append(task.get_name() if task else "?")
            if not isinstance(exc, Unavailable):
                other_errors.append(f"{args[0]}: {exc!r}")
            raise

    worker.redis.execute = spied_execute  # type: ignore[method-assign]
    try:
        await worker.start()
        sid, ev = await reg.start_execution("mp-rounds", {"tag": "o", "rounds": 2, "width": 1})
        assert isinstance(ev, Paused)

        await asyncio.to_thread(server.stop)
        started = time.monotonic()
        with pytest.raises(Unavailable) as info:
            await reg.feed_response(sid, "q-0", "during the outage")
        assert time.monotonic() - started < OUTAGE_BUDGET_S + 3.0  # bounded, not ~25 s
        assert info.value.url == server.url
        await assert_eventually(lambda: any(n.startswith("nudges") for n in failed_in),
                                timeout=WAIT_S,
                                message="the nudge loop never met the outage")
        await asyncio.to_thread(server.start)

        assert not other_errors, f"calls in the outage failed with more than Unavailable: " \
            f"{other_errors}"
        dead = {t.get_name(): repr(t.exception()) for t in worker._loops if t.done()}
        assert not dead, f"worker loops died in the outage and stay dead: {dead}"
        ev = await reg.feed_response(sid, "q-0", answer_for(prompt_for("o", 0, 0)))
        assert isinstance(ev, Paused)
        ev = await reg.feed_response(sid, "q-0", answer_for(prompt_for("o", 1, 0)))
        assert isinstance(ev, Finished) and ev.result == {
            "tag": "o", "rounds": expected_rounds("o", 2, 1, answer_for)}
    finally:
        await reg.aclose()
        await worker.shutdown(grace_s=1.0)


@pytest.mark.redis
@pytest.mark.slow
async def test_a_worker_asked_to_stop_leaves_promptly_with_redis_gone(
    redis_server: RedisProcess, namespace: str, tmp_path: Path
) -> None:
    """SIGTERM while Redis is down: the goodbyes (unsubscribe, heartbeat removal) are best
    effort and bounded, so the worker exits cleanly instead of retrying them for a minute."""
    import signal

    pool = WorkerPool(redis_server.url, namespace, tmp_path)
    try:
        worker = await pool.start(concurrency=2)
        await assert_eventually(lambda: f"worker {worker.worker_id} started" in
                                worker.log_text(), timeout=30, message="worker never started")
        redis_server.kill()
        worker.signal(signal.SIGTERM)
        # the bound: below the ~30 s the client would spend retrying each goodbye
        try:
            code = await asyncio.wait_for(worker.wait_exit(), 20)
        except TimeoutError:
            raise AssertionError(f"worker still running\n{worker.log_tail()}") from None
        assert code == 0, worker.log_tail()
        assert "stopped" in worker.log_text(), worker.log_tail()
    finally:
        pool.close()
