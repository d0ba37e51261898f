"""The two locks of the original engine, made distributed.

**Lock C** guards the registry as a whole (the original's mutex on its session map): here it
is taken by registry-wide sweeps (GC). **Lock A** guards one session (the original's mutex per
session): here it is held by the worker stepping that session, so a session is stepped by one
worker at a time. The original always takes C before A, never A then C, and so do we.

Both are leases in redis-py ``Lock``'s layout (the key holds the owner token with a PX lease;
release is compare-and-delete; extend re-arms the lease), driven by our own scripts, with
three additions:

- a **fencing token**, handed out atomically with the lease (``lock_acquire.lua``): lock A's
  lives in the session hash (field ``fence``), lock C's in its own counter. Every state-changing
  write of a step carries it (``commit_step.lua``), so a holder whose lease ran out while it
  was stalled cannot overwrite what the next holder wrote.
- a **bounded wait without polling**: a waiter subscribes to the lock's "released" channel and
  sleeps at most until the current lease would expire, then tries again; it gives up with
  ``LockTimeout`` when its wait budget is spent.
- a **lock-order guard**: the original never takes A then C, which makes deadlock impossible.
  We keep the rule and enforce it: asking for C while this task holds any A raises
  ``LockOrderError``.

Lock A's lease is also **not waited out when its holder is gone**. A worker's token names it
(``<random>|<worker id>``: ``owner_token``), and a lease the feed took for a live holder
(the handoff) is named by the session's ``holder``. Every worker keeps its process channel
(``Keys.process_channel``) subscribed from start to exit, so when that channel has no
subscriber Redis has seen the worker's connection close: it died (SIGKILL, OOM, crash) or is
cut off from Redis. The acquiring script (``lock_acquire.lua``, ``step_begin.lua``) then
takes the lock at once instead of waiting out the lease, bumping the fence as every
acquisition does, so the gone holder's late commit, should it come back, is refused. A holder
that is only slow or frozen keeps its connection, and with it its lease: the lease stays the
bound there (and for a lost machine, whose connections Redis sees close only later). Lock C
and the locks a registry takes name no holder and are always waited out.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextvars import ContextVar
from enum import StrEnum
from types import SimpleNamespace
from typing import Any

from .errors import CorruptState, LockLost, LockOrderError, LockTimeout, NotFound
from .keys import Keys
from .scripts import Lease, Scripts
from .shards import ShardMap
from .transport import Multiplexer

log = logging.getLogger(__name__)

#: Between a lock token's random part and the worker it names (see ``owner_token``).
OWNER_SEP = "|"
#: Longest a lock waiter sleeps before trying again, whatever the lease left: a holder that
#: dies meanwhile is noticed by the next try (its lease is broken, see the module doc).
RECHECK_S = 0.5


def owner_token(owner: str | None) -> str:
    """A fresh lock token; naming ``owner`` (a worker id) lets others take the lock at once
    once that worker's connection is gone."""
    token = uuid.uuid4().hex
    return f"{token}{OWNER_SEP}{owner}" if owner else token


class LockKind(StrEnum):
    REGISTRY = "C"
    SESSION = "A"


#: Locks held by the current task (context), for the order guard.
_held: ContextVar[tuple[str, ...]] = ContextVar("alc_held_locks", default=())


def held_locks() -> tuple[str, ...]:
    return _held.get()


class FencedLock:
    """A lease whose acquisition also yields a fencing token."""

    def __init__(
        self,
        name: str,
        *,
        kind: LockKind,
        scripts: Scripts,
        mux: Multiplexer,
        released_channel: str,
        fence_key: str,
        fence_field: str = "",
        lease_ms: int,
        wait_s: float,
        session_id: str | None = None,
        owner: str | None = None,
        shard: Keys | None = None,
    ) -> None:
        self.name = name
        #: The shard the lock lives in (where its holders' liveness channels are).
        self.shard = shard
        #: The worker named in this lock's tokens (None: the lock names no holder).
        self.owner = owner
        #: ``local.token``: the owner token while held (as in redis-py's ``Lock``).
        self.local = SimpleNamespace(token=None)
        self.kind = kind
        self.fence: int | None = None
        self.lease_ms = lease_ms
        self.wait_s = wait_s
        self.session_id = session_id
        self._scripts = scripts
        self._mux = mux
        self._released_channel = released_channel
        self._fence_key = fence_key
        self._fence_field = fence_field
        self._last_pttl = 0
        self.label = name

    def _check_order(self) -> None:
        if self.kind is LockKind.REGISTRY and LockKind.SESSION.value in _held.get():
            raise LockOrderError(
                "lock order violated: registry lock C requested while this task holds a "
                "session lock A; always take C first, then A",
                session_id=self.session_id,
            )

    def new_token(self) -> str:
        """A fresh token for this lock, naming its owner if it has one."""
        return owner_token(self.owner)

    async def do_acquire(self, token: str | bytes) -> bool:
        return self._accept(await self._scripts.lock_acquire(
            self.name, self._fence_key, token=token, lease_ms=self.lease_ms,
            fence_field=self._fence_field, shard=self.shard))

    def took(self, lease: Lease, token: str) -> bool:
        """Adopt an acquisition made by a script that also did other work (``step_begin``,
        or ``feed.lua``'s handoff)."""
        self._check_order()
        if not self._accept(lease):
            return False
        self.local.token = token.encode()
        _held.set((*_held.get(), self.kind.value))
        return True

    def _accept(self, lease: Lease) -> bool:
        fence, pttl = lease.fence, lease.pttl
        if fence == -1:
            raise NotFound(f"session {self.session_id} not found", session_id=self.session_id)
        if fence == -2:
            raise CorruptState(
                f"lock {self.label}: its fencing counter is not a number; the "
                f"{'session' if self.session_id else 'registry'} state is corrupt",
                session_id=self.session_id,
            )
        if fence > 0:
            self.fence = int(fence)
            if pttl < 0:
                log.info("lock %s taken over (fence %s) from a holder whose connection to "
                         "redis is gone", self.label, fence)
            return True
        self._last_pttl = int(pttl)
        return False

    async def acquire(
        self,
        blocking: bool | None = None,
        blocking_timeout: float | None = None,
        token: str | bytes | None = None,
    ) -> bool:
        """Take the lease or raise ``LockTimeout`` within the wait budget."""
        self._check_order()
        token = token if token is not None else self.new_token()
        wait_s = self.wait_s if blocking_timeout is None else float(blocking_timeout)
        if blocking is False:
            wait_s = 0.0
        if not await self.do_acquire(token):
            await self._wait_and_acquire(token, wait_s)
        self.local.token = token.encode() if isinstance(token, str) else token
        _held.set((*_held.get(), self.kind.value))
        return True

    async def _wait_and_acquire(self, token: str | bytes, wait_s: float) -> None:
        deadline = time.monotonic() + wait_s
        async with await self._mux.subscribe(self._released_channel) as sub:
            while True:
                # Re-try right after subscribing: a release in between is not missed.
                if await self.do_acquire(token):
                    return
                left = deadline - time.monotonic()
                if left <= 0:
                    raise LockTimeout(
                        f"lock {self.label} ({self.kind.value}) still held after {wait_s:.1f} s; "
                        "its holder is busy or its lease has not run out yet",
                        session_id=self.session_id,
                    )
                pttl_s = self._last_pttl / 1000 if self._last_pttl > 0 else left
                await sub.get(min(left, pttl_s + 0.001, RECHECK_S))

    async def release(self) -> None:
        """Release the lease; ``LockLost`` if it was no longer ours (it ran out)."""
        token, self.local.token = self.local.token, None
        if token is None:
            raise LockLost(f"lock {self.label} is not held", session_id=self.session_id)
        released = await self._scripts.lock_release(
            self.name, token=token, released_channel=self._released_channel)
        self._forget()
        if not released:
            raise LockLost(f"lock {self.label} was no longer ours to release: its lease ran "
                           "out and it may have been taken over", session_id=self.session_id)

    async def extend(self) -> None:
        """Re-arm the lease for ``lease_ms`` from now; ``LockLost`` if it is no longer ours."""
        token = self.local.token
        if token is None or not await self._scripts.lock_extend(
                self.name, token=token, lease_ms=self.lease_ms):
            raise LockLost(f"lock {self.label} was lost before it could be renewed",
                           session_id=self.session_id)

    def mark_released(self) -> None:
        """The lease was released by a script that also committed state (one round trip)."""
        self.local.token = None
        self._forget()

    def _forget(self) -> None:
        held = list(_held.get())
        if self.kind.value in held:
            held.remove(self.kind.value)
            _held.set(tuple(held))

    async def __aenter__(self) -> FencedLock:
        await self.acquire()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.release()

    @contextlib.asynccontextmanager
    async def kept_alive(self) -> AsyncIterator[None]:
        """Extend the lease every third of its length while the body runs, so a long step
        keeps it; if the lease is lost anyway, the fencing check rejects the stale write."""

        async def renew() -> None:
            while True:
                try:
                    await self.extend()
                except Exception as exc:  # the write path's fence check is the real guard
                    log.warning("lease on %s lost or not renewable: %s", self.label, exc)
                    return
                await asyncio.sleep(self.lease_ms / 3000)

        # Most steps end long before a third of the lease: start the renewer only if not.
        tasks: list[asyncio.Task[None]] = []
        handle = asyncio.get_running_loop().call_later(
            self.lease_ms / 3000, lambda: tasks.append(asyncio.create_task(renew())))
        try:
            yield
        finally:
            handle.cancel()
            for task in tasks:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task


class LockFactory:
    """Builds lock C and lock A with the right keys, fences, leases and waits."""

    def __init__(
        self, shards: ShardMap, scripts: Scripts, mux: Multiplexer, *, lease_ms: int,
        wait_s: float,
    ) -> None:
        self._shards = shards
        self._scripts = scripts
        self._mux = mux
        self.lease_ms = lease_ms
        self.wait_s = wait_s
        #: The worker this process's session locks name (``name_owner``); None names none.
        self.owner: str | None = None

    def name_owner(self, worker_id: str) -> None:
        """From now on, name ``worker_id`` in the tokens of lock A: only once its process
        channel is subscribed (a worker's started multiplexer), since a lock naming a holder
        whose channel has no subscriber is taken over at once."""
        self.owner = worker_id

    def registry(self, shard: Keys | None = None, **overrides: Any) -> FencedLock:
        """Lock C of ``shard`` (None: the first; the only one, unsharded). Each shard has
        its own: a sweep of one shard never waits on another's."""
        keys = shard or self._shards.all[0]
        name = keys.registry_lock
        return FencedLock(
            name, kind=LockKind.REGISTRY, scripts=self._scripts, mux=self._mux,
            released_channel=Keys.lock_released(name), shard=keys,
            fence_key=keys.registry_fence,
            lease_ms=overrides.get("lease_ms", self.lease_ms),
            wait_s=overrides.get("wait_s", self.wait_s),
        )

    def session(self, sid: str, **overrides: Any) -> FencedLock:
        keys = self._shards.of(sid)
        sk = keys.session(sid)
        return FencedLock(
            sk.lock, kind=LockKind.SESSION, scripts=self._scripts, mux=self._mux,
            released_channel=Keys.lock_released(sk.lock), shard=keys,
            fence_key=sk.session, fence_field="fence",
            lease_ms=overrides.get("lease_ms", self.lease_ms),
            wait_s=overrides.get("wait_s", self.wait_s),
            session_id=sid, owner=self.owner,
        )
