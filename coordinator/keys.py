"""Every Redis key and channel name, built here and nowhere else. This docstring is the schema.

``ns`` is the namespace (default ``alc``); ``sid`` a session id. All keys of one session carry
the Redis Cluster hash tag ``{sid}`` so they live in one slot and one script may touch them all.
Values in hashes and lists are msgpack unless marked *plain* (plain values are read by Lua).

Per session (tag ``{sid}``). TTL while live: the backstop, idle ttl + retention (+ lease) past
the last refresh, only for keys nothing else ends (GC ends idle sessions, workers running
ones). Once ended (completed, failed, cancelled, expired): every key below, the feed tokens
included, expires after the retention period; lock A after its lease.

=============================  ======  =======================================================
key                            type    holds
=============================  ======  =======================================================
``ns:{sid}``                   hash    the session: plain ``phase`` ``asked`` (rounds asked)
                                       ``remaining`` ``fence`` ``holder`` ``holder_ch`` ``job``
                                       ``started_at`` ``last_activity_at`` ``finished_at``
                                       ``ttl_ms`` ``expected`` ``m:*`` counters; msgpack
                                       ``strategy`` ``input`` ``budget`` ``qids`` ``result``
                                       ``error`` ``progress``
``ns:{sid}:pending``           hash    query id -> query of the current round
``ns:{sid}:answers``           hash    query id -> answer of the current round
``ns:{sid}:journal``           list    one entry per applied round: digest of its queries and
                                       ``[query id, prompt, response]`` triples (replay source)
``ns:{sid}:logs``              list    the last 20 strategy log entries
``ns:{sid}:lock``              string  lock A: owner token, PX lease
``ns:{sid}:fed``               hash    query id -> token of the feed call that answered it,
                                       this round (``:fed:prev``: the round before), so a
                                       feed retried after a lost reply is recognised
=============================  ======  =======================================================

Per shard (no TTL; small). A namespace has S shards (``coordinator.shards``, S stored in
``ns:shards``). Unsharded (S = 1 on one Redis) the names are as below; sharded, shard k's
names carry its tag ``T`` (5 hex digits whose Cluster slot is the shard's): ``ns:{T}:registry``
and so on, and a session's id is chosen to hash to that slot, so each script touches one slot.

=============================  ======  =======================================================
``ns:registry``                zset    sessions held in the registry (paused), score = last
                                       activity (ms)
``ns:running``                 zset    running sessions (queued for a worker, or mid-step),
                                       score = when they began running (ms); with the
                                       registry and the three below, every session is in
                                       exactly one phase index, which ``list_sessions`` pages
                                       and ``counts`` counts
``ns:done:<phase>``            zset    finished sessions by phase (completed, failed,
                                       cancelled), score = finished at (ms); entries past
                                       the retention are trimmed as new ones come (readers
                                       ignore them till then)
``ns:deadlines``               zset    paused sessions, score = idle deadline (ms): last
                                       activity + ttl; GC reads it. Only paused ones: a
                                       running session (queued for a worker or mid-step) is
                                       owed a step, not idle, so that time never counts
``ns:jobs``                    stream  start / resume jobs, consumer group ``workers``
``ns:dead``                    stream  dead letters: jobs that failed ``max_attempts`` times in a
                                       row, or that no worker understands (capped ~10 000)
``ns:lock:registry``           string  lock C of the shard: owner token, PX lease
``ns:lock:registry:fence``     string  lock C fencing token (server clock in µs, see
                                       ``_prelude.lua``'s ``next_fence``)
=============================  ======  =======================================================

Per namespace (no TTL; small; one key each, so any slot)

=============================  ======  =======================================================
``ns:shards``                  string  the shard table (msgpack: version, shard slots),
                                       written once when the namespace is first used
``ns:strategies``              set     strategy names some worker registered (start checks it)
``ns:catalog``                 hash    strategy name -> msgpack {description, params}: what
                                       workers offer, as their code describes it
``ns:state:{<key>}``           string  a ``ctx.state`` value (its own slot), with its op
                                       markers ``ns:state:{<key>}:op:<op id>`` (PX retention)
                                       and the namespace's index of state keys; built in
                                       ``workers/kv.py``, whose docstring has the details
``ns:workers``                 zset    worker id -> last heartbeat (ms), for status output
``ns:worker:<id>``             string  worker heartbeat, PX = heartbeat ttl (alive while set)
=============================  ======  =======================================================

Channels (sharded pub/sub: SPUBLISH / SSUBSCRIBE; they only wake, the keys hold the truth;
each is in the slot of the script that publishes on it)

- ``ns:{sid}:events``: a session settled (paused / finished) or became ready to resume.
- ``ns:{sid}:sync``: nobody listens; with durability on (``wait_replicas``) a host publishes
  on it just before ``WAIT``, so the ``WAIT`` covers every write before it on that primary
  (the step it is about to report included), whichever connection made them.
- ``ns:activity`` (per shard): a session of the shard changed phase; payload
  ``<sid> <phase>`` (``create.lua``: running; ``commit_step.lua``: paused, completed or
  failed; ``feed.lua``'s last answer of a round: running; ``terminate.lua``: cancelled or
  failed, an expiry included). The namespace-wide event stream (``coordinator.http_activity``)
  listens on every shard's; nothing else does, so a session's own waiters never hear it.
- ``ns:worker:<id>:nudge`` (per shard): "a session you hold is ready / cancelled" (payload:
  sid), or a handoff: "it is ready, lock A is taken for you, here are the answers"
  (``coordinator.events.Handoff``, written by ``feed.lua``).
- ``ns:jobs:wake`` (per shard): a job was added to that shard's ``ns:jobs``.
- ``<lock key>:released``: a lock (C or A) was released; waiters try again.
- ``ns:proc:<id>`` (per shard): a worker's liveness channel, subscribed while it runs; the
  scripts count its subscribers (``PUBSUB SHARDNUMSUB``) to tell a gone holder from a slow
  one, so it lives in the shard's slot.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

JOB_GROUP = "workers"

#: A session's other keys are its hash key plus these.
SUFFIX = {
    "pending": ":pending",
    "answers": ":answers",
    "journal": ":journal",
    "logs": ":logs",
    "lock": ":lock",
    "channel": ":events",
    "fed": ":fed",
    "fed_prev": ":fed:prev",
    "sync": ":sync",
}


@dataclass(frozen=True, slots=True)
class SessionKeys:
    session: str
    pending: str
    answers: str
    journal: str
    logs: str
    lock: str
    channel: str
    fed: str
    fed_prev: str
    sync: str

    def all_data(self) -> list[str]:
        """The data keys, in the order the Lua scripts expect them as KEYS[1..5]."""
        return [self.session, self.pending, self.answers, self.journal, self.logs]


@dataclass(frozen=True, slots=True)
class Keys:
    """The keys of one shard of a namespace (``coordinator.shards``), and the namespace's
    global keys. ``tag`` "" is the unsharded layout (one shard, the names above); a tag
    ``T`` puts the shard's keys in Redis Cluster slot of ``T``: ``ns:{T}:registry``, ..."""

    namespace: str = "alc"
    tag: str = ""
    #: This shard's number in its namespace (0 for the unsharded layout).
    index: int = 0
    _prefix: str = field(init=False, repr=False, compare=False, default="")

    def __post_init__(self) -> None:
        if not self.namespace or any(c in self.namespace for c in "{}: \t\n"):
            raise ValueError(
                f"namespace {self.namespace!r} must be non-empty and free of '{{', '}}', ':' "
                "and whitespace"
            )
        # the shard's prefix, computed once: every per-shard name starts with it
        object.__setattr__(self, "_prefix", f"{self.namespace}:{{{self.tag}}}" if self.tag
                           else self.namespace)

    def session(self, sid: str) -> SessionKeys:
        return _session_keys(self.namespace, sid)

    def session_template(self) -> tuple[str, str]:
        """(head, tail) with ``head + sid + tail`` the session hash key (and ``SUFFIX`` the
        rest), for listings that build thousands of sessions' keys at once
        (``coordinator.snapshot``) without a ``SessionKeys`` object each."""
        return f"{self.namespace}:{{", "}"

    @property
    def registry(self) -> str:
        return f"{self._prefix}:registry"

    @property
    def running(self) -> str:
        return f"{self._prefix}:running"

    def done(self, phase: str) -> str:
        """The index of sessions that finished ``phase`` (completed, failed, cancelled)."""
        return f"{self._prefix}:done:{phase}"

    @property
    def deadlines(self) -> str:
        return f"{self._prefix}:deadlines"

    @property
    def jobs(self) -> str:
        return f"{self._prefix}:jobs"

    @property
    def jobs_wake(self) -> str:
        return f"{self._prefix}:jobs:wake"

    @property
    def registry_lock(self) -> str:
        return f"{self._prefix}:lock:registry"

    @property
    def registry_fence(self) -> str:
        return f"{self._prefix}:lock:registry:fence"

    @property
    def shard_table(self) -> str:
        return f"{self.namespace}:shards"

    @property
    def strategies(self) -> str:
        return f"{self.namespace}:strategies"

    @property
    def catalog(self) -> str:
        return f"{self.namespace}:catalog"

    @property
    def workers(self) -> str:
        return f"{self.namespace}:workers"

    def worker(self, worker_id: str) -> str:
        return f"{self.namespace}:worker:{worker_id}"

    def worker_nudge(self, worker_id: str) -> str:
        return f"{self._prefix}:worker:{worker_id}:nudge"

    @staticmethod
    def lock_released(lock_key: str) -> str:
        return f"{lock_key}:released"

    def process_channel(self, proc_id: str) -> str:
        return f"{self._prefix}:proc:{proc_id}"

    @property
    def dead_letters(self) -> str:
        return f"{self._prefix}:dead"

    @property
    def activity(self) -> str:
        """The shard's phase-change channel (in the shard's slot, so every session script
        of the shard may publish on it)."""
        return f"{self._prefix}:activity"


@functools.lru_cache(maxsize=16384)
def _session_keys(namespace: str, sid: str) -> SessionKeys:
    """Cached: a host and a worker name the same few thousand sessions' keys every step."""
    base = f"{namespace}:{{{sid}}}"
    return SessionKeys(
        session=base,
        pending=base + SUFFIX["pending"],
        answers=base + SUFFIX["answers"],
        journal=base + SUFFIX["journal"],
        logs=base + SUFFIX["logs"],
        lock=base + SUFFIX["lock"],
        channel=base + SUFFIX["channel"],
        fed=base + SUFFIX["fed"],
        fed_prev=base + SUFFIX["fed_prev"],
        sync=base + SUFFIX["sync"],
    )
