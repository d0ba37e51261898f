"""Commands on a Redis Cluster: each to the primary that owns its key's slot, within one budget.

A call is a list of **units**: commands that must travel together on one connection (a
command alone; ``EVALSHA`` with the ``WAIT`` that follows it; in ``execute_many``, a keyless
command joins the unit before it). Units are grouped by node; each group leaves in one write,
the groups concurrently, and the replies come back in the caller's order. Then, per unit:

- ``MOVED slot node``: the slot is patched at once, the map refreshed, the unit sent again;
- ``ASK slot node``: the unit is sent to that node once, preceded by ``ASKING``, in one write;
- ``NOSCRIPT`` (units that carry their script): ``SCRIPT LOAD`` and the unit again, in one
  write, on the node that said it;
- ``TRYAGAIN``, ``CLUSTERDOWN``, ``LOADING``, ``MASTERDOWN``: sent again after a backoff;
- a lost connection or a demoted primary (``READONLY``): the map is refreshed (a replica is
  promoted within seconds) and the unit sent again after a backoff.

All within the call's budget, then ``Unavailable`` as on a single server
(``coordinator.transport.client``). Retrying is safe for the reasons given there.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any

from redis.exceptions import (
    AskError,
    AuthenticationError,
    BusyLoadingError,
    ClusterDownError,
    MasterDownError,
    MovedError,
    NoScriptError,
    ReadOnlyError,
    RedisError,
    ResponseError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from .pipe import pack
from .slots import routing_key
from .topology import Topology

#: Server replies that mean "not now" rather than "never" (redis-py 8 strips the code from
#: the message of the ones it has a class for; 5.0.1 keeps it).
TRANSIENT_CODES = ("LOADING", "BUSY ", "MASTERDOWN", "TRYAGAIN", "CLUSTERDOWN")
_TRANSIENT_TYPES = (TryAgainError, ClusterDownError, MasterDownError, BusyLoadingError)
_ASKING = pack(("ASKING",))


def transient(exc: BaseException) -> bool:
    return isinstance(exc, _TRANSIENT_TYPES) or str(exc).startswith(TRANSIENT_CODES)


def redirect(exc: BaseException) -> tuple[bool, int, str] | None:
    """``(moved, slot, "host:port")`` for a ``MOVED``/``ASK`` reply, else None."""
    if not isinstance(exc, ResponseError):
        return None
    text = str(exc)
    if isinstance(exc, AskError):  # MovedError is an AskError
        moved = isinstance(exc, MovedError)
    elif text.startswith(("MOVED ", "ASK ")):
        moved = text.startswith("MOVED ")
    else:
        return None
    slot, addr = text.split()[-2:]
    return moved, int(slot), addr


class Unit:
    """Commands that travel together; ``replies`` once answered."""

    __slots__ = ("ask", "commands", "key", "node", "replies", "source", "with_load")

    def __init__(self, commands: list[tuple[Any, ...]], node: str | None,
                 source: str | None = None) -> None:
        self.commands = commands
        self.key = routing_key(commands[0])
        self.node = node  # fixed by the caller (keyless), else the key's owner
        self.source = source  # the script, to load on NOSCRIPT
        self.ask: str | None = None
        self.with_load = False
        self.replies: list[Any] | None = None

    def packed(self) -> tuple[bytes, int]:
        parts = [pack(c) for c in self.commands]
        if self.ask is not None:
            parts.insert(0, _ASKING)
        if self.with_load:
            parts.insert(0, pack(("SCRIPT", "LOAD", self.source)))
        return b"".join(parts), len(parts)

    def take(self, replies: list[Any]) -> list[Any]:
        """This unit's own replies out of a write's (dropping SCRIPT LOAD's and ASKING's)."""
        skip = (self.ask is not None) + self.with_load
        return replies[skip:]


def units_of(commands: Sequence[tuple[Any, ...]], node: str | None) -> list[Unit]:
    """One unit per keyed command; a keyless one joins the unit before it (``WAIT`` goes with
    the write it waits for)."""
    units: list[Unit] = []
    for command in commands:
        if units and node is None and routing_key(command) is None:
            units[-1].commands.append(command)
        else:
            units.append(Unit([command], node))
    return units


class Router:
    def __init__(self, topology: Topology, *, timeout_s: float,
                 unavailable: Callable[[str, BaseException, float], Exception],
                 refused: Callable[[BaseException], Exception],
                 failed: Callable[[str, BaseException], Exception]) -> None:
        self.topology = topology
        self.timeout_s = timeout_s
        self._unavailable = unavailable
        self._refused = refused
        self._failed = failed

    async def run(self, units: list[Unit], timeout: float | None, what: str) -> None:
        """Every unit's replies (``unit.replies``), or the call's error."""
        loop = asyncio.get_running_loop()
        budget = self.timeout_s if timeout is None else max(0.001, min(timeout, self.timeout_s))
        deadline = loop.time() + budget
        backoff = 0.02
        pending = units
        cause: BaseException | None = None
        while True:
            refresh = wait = False
            try:
                await self.topology.ensure(deadline - loop.time())
                groups = self._groups(pending)
            except (RedisError, OSError) as exc:
                cause, groups = exc, {}
                refresh = wait = True
            results = await self._send_all(groups, deadline - loop.time())
            retry: list[Unit] = [] if groups else pending
            for (node, group), result in zip(groups.items(), results, strict=True):
                if isinstance(result, BaseException):
                    cause = self._failure(node, result)
                    refresh = wait = True
                    retry += group
                    continue
                for unit in group:
                    verdict = self._verdict(unit, node)
                    if verdict is not None:
                        cause = verdict
                        retry.append(unit)
                        refresh |= isinstance(verdict, ReadOnlyError) or (
                            (found := redirect(verdict)) is not None and found[0])
                        wait |= transient(verdict) or isinstance(verdict, ReadOnlyError)
            if not retry:
                return
            pending = retry
            left = deadline - loop.time()
            if left <= 0.01:
                assert cause is not None
                raise self._unavailable(what, cause, budget) from None
            if refresh:
                try:
                    await self.topology.refresh(left)
                except (RedisError, OSError) as exc:
                    cause, wait = exc, True
            if wait:
                await asyncio.sleep(min(backoff, max(0.0, deadline - loop.time())))
                backoff = min(backoff * 2, 0.5)

    def _groups(self, units: list[Unit]) -> dict[str, list[Unit]]:
        topology = self.topology
        groups: dict[str, list[Unit]] = {}
        previous: str | None = None
        for unit in units:
            if unit.ask is not None:
                node = unit.ask
            elif unit.node is not None:
                node = unit.node
            elif unit.key is not None:
                node = topology.owner(unit.key)
            else:
                node = previous or topology.any_primary()
            previous = node
            groups.setdefault(node, []).append(unit)
        return groups

    async def _send_all(self, groups: dict[str, list[Unit]], left: float) -> list[Any]:
        """Each group in one write, the groups concurrently; an exception per failed write."""
        if len(groups) == 1:  # the common case: no task to spawn
            ((node, group),) = groups.items()
            try:
                await self._send(node, group, left)
            except Exception as exc:
                return [exc]
            return [None]
        return await asyncio.gather(*(self._send(node, group, left)
                                      for node, group in groups.items()),
                                    return_exceptions=True)

    async def _send(self, node: str, group: list[Unit], left: float) -> None:
        parts = [unit.packed() for unit in group]
        packed = b"".join(p for p, _ in parts)
        replies: list[Any] = await self.topology.pipe(node).call(
            packed, sum(n for _, n in parts), batch=True, timeout=max(left, 0.001))
        at = 0
        for unit, (_, n) in zip(group, parts, strict=True):
            unit.replies = unit.take(replies[at:at + n])
            at += n

    def _failure(self, node: str, exc: BaseException) -> BaseException:
        """A whole write failed: the cause to retry on, or raise what is final."""
        if isinstance(exc, AuthenticationError):
            raise self._refused(exc) from None
        if isinstance(exc, RedisConnectionError | RedisTimeoutError | OSError):
            self.topology.suspect(node)
            return exc
        if isinstance(exc, RedisError):
            raise self._failed(node, exc) from None
        raise exc

    def _verdict(self, unit: Unit, node: str) -> BaseException | None:
        """None when ``unit`` is answered; else the reply to retry on (and the unit set up
        for its retry)."""
        assert unit.replies is not None
        first = unit.replies[0] if unit.replies else None
        unit.ask = None
        unit.with_load = False
        if not isinstance(first, ResponseError):
            return None
        found = redirect(first)
        if found is not None:
            moved, slot, addr = found
            if addr.startswith(":"):  # the node we asked, on another port
                addr = node.rpartition(":")[0] + addr
            if moved:
                if unit.node is None:
                    self.topology.moved(slot, addr)
                else:
                    unit.node = addr
            else:
                unit.ask = addr
            unit.replies = None
            return first
        if isinstance(first, NoScriptError) and unit.source is not None:
            unit.with_load = True
            unit.node = unit.node or (node if unit.key is None else None)
            unit.replies = None
            return first
        if isinstance(first, ReadOnlyError):  # a demoted primary: its slots moved
            self.topology.pipe(node).reset(first)
            unit.replies = None
            return first
        if transient(first):
            unit.replies = None
            return first
        return None
