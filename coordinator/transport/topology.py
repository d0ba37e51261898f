"""``Topology``: a Redis Cluster as the transport sees it: the slot map, and one ``Pipe`` (and
one pool, for pub/sub connections) per node, each made on first use.

The slot map comes from ``CLUSTER SLOTS``, asked of the known primaries and the URL's seeds in
turn (nodes that just failed last). A refresh is single-flight: every caller that meets a
``MOVED``, a lost connection or a demoted primary awaits the same one, bounded by its own
budget. A ``MOVED`` reply also patches its slot at once, so the retry goes to the new owner
before the refresh is done. The retry policy is not here: ``coordinator.transport.routing``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

from redis.asyncio import ConnectionPool
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from .pipe import Pipe, pack
from .slots import SlotMap, key_slot, split_addr
from .target import Target

log = logging.getLogger(__name__)

_CLUSTER_SLOTS = pack(("CLUSTER", "SLOTS"))
#: Bound on asking one node for the slot map (it answers from memory; a dead one is skipped).
ASK_NODE_TIMEOUT_S = 1.0


class Topology:
    """The slot map of one cluster, and the connections to its nodes."""

    clustered = True

    def __init__(self, target: Target, *, make_pipe: Callable[[ConnectionPool], Pipe],
                 pool_options: dict[str, Any], timeout_s: float) -> None:
        self._target = target
        self._make_pipe = make_pipe
        self._pool_options = pool_options
        self._timeout_s = timeout_s
        self._seeds = [f"{host}:{port}" for host, port in target.seeds]
        self._pools: dict[str, ConnectionPool] = {}
        self._pipes: dict[str, Pipe] = {}
        self._suspects: dict[str, None] = {}  # nodes that failed lately, oldest first
        self._refreshing: asyncio.Future[None] | None = None
        self.map: SlotMap | None = None
        #: Successful refreshes so far (tests and logs).
        self.refreshes = 0

    # -- nodes ---------------------------------------------------------------------------

    def pool(self, node: str) -> ConnectionPool:
        pool = self._pools.get(node)
        if pool is None:
            host, port = split_addr(node)
            pool = self._pools[node] = self._target.node_pool(host, port, **self._pool_options)
        return pool

    def pipe(self, node: str) -> Pipe:
        pipe = self._pipes.get(node)
        if pipe is None:
            pipe = self._pipes[node] = self._make_pipe(self.pool(node))
        return pipe

    def owner(self, key: Any) -> str:
        """The primary serving ``key``'s slot (``ensure`` first); a channel is a key here."""
        assert self.map is not None, "the slot map is not loaded: await ensure() first"
        node = self.map.owners[key_slot(key)]
        if node is None:
            raise RedisConnectionError(f"no node serves slot {key_slot(key)} (cluster down?)")
        return node

    def any_primary(self) -> str:
        assert self.map is not None, "the slot map is not loaded: await ensure() first"
        return self.map.ranges[0][2] if self.map.ranges else self._seeds[0]

    def moved(self, slot: int, node: str) -> None:
        """A ``MOVED slot node`` reply: the slot's owner, as its old owner says."""
        if self.map is not None:
            self.map.owners[slot] = node

    def suspect(self, node: str) -> None:
        """``node`` failed: ask it last for the slot map."""
        self._suspects.pop(node, None)
        self._suspects[node] = None

    def primaries(self) -> list[tuple[str, list[tuple[int, int]]]]:
        assert self.map is not None, "the slot map is not loaded: await ensure() first"
        return self.map.primaries()

    # -- the slot map ----------------------------------------------------------------------

    async def ensure(self, timeout: float) -> None:
        if self.map is None:
            await self.refresh(timeout)

    async def refresh(self, timeout: float) -> None:
        """A fresh slot map (one refresh at a time; callers wait at most ``timeout``)."""
        flight = self._refreshing
        if flight is None or flight.done():
            flight = self._refreshing = asyncio.ensure_future(self._refresh())
            flight.add_done_callback(_retrieve)
        async with asyncio.timeout(max(timeout, 0.001)):
            await asyncio.shield(flight)

    async def _refresh(self) -> None:
        known = [node for node, _ in self.map.primaries()] if self.map is not None else []
        candidates = list(dict.fromkeys([*known, *self._seeds]))
        candidates.sort(key=lambda node: node in self._suspects)
        cause: BaseException | None = None
        for node in candidates:
            try:
                reply = await self.pipe(node).call(
                    _CLUSTER_SLOTS, timeout=min(ASK_NODE_TIMEOUT_S, self._timeout_s))
                fresh = SlotMap.from_reply(reply, split_addr(node)[0])
            except (RedisError, OSError) as exc:
                log.debug("cluster node %s did not tell the slot map: %s", node, exc)
                self.suspect(node)
                cause = exc
                continue
            if not fresh.ranges:
                cause = RedisConnectionError(f"cluster node {node} serves no slots yet")
                continue
            self.map = fresh
            self.refreshes += 1
            self._suspects.pop(node, None)
            return
        raise RedisConnectionError(
            f"no cluster node told the slot map (asked {', '.join(candidates)}; last error: "
            f"{cause})")

    async def aclose(self) -> None:
        if self._refreshing is not None and not self._refreshing.done():
            self._refreshing.cancel()
            with contextlib.suppress(BaseException):
                await self._refreshing
        for pipe in self._pipes.values():
            await pipe.aclose()
        for pool in self._pools.values():
            await pool.disconnect()


def _retrieve(flight: asyncio.Future[None]) -> None:
    """A refresh nobody waits for any more must not log "exception never retrieved"."""
    if not flight.cancelled():
        flight.exception()
