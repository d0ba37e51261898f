"""Suspect steps run alone, so a step that wedges or kills its worker takes nobody with it.

Every acquisition of a session's lock A counts an attempt at its step, and a step that
reaches ``max_attempts`` is dead-lettered: that is how a step that kills its worker, or
wedges it until it is killed (``watchdog.py``, ``supervisor.py``), stops looping. But a
worker's steps share its event loop, so the steps in flight beside the one that took the
worker down die with it and are charged an attempt too. And the worker that takes the dead
worker's jobs over takes them all at once (a claim, a rescue), the poisoned one among them:
run side by side, they would die together again at each attempt, and healthy sessions would
be dead-lettered with the poisoned one.

So a step taken over from a worker that died or stalled (claimed or rescued by the intake) is
a *suspect*, and runs alone:

- one suspect at a time per worker, from before it takes its lock to its end. The others
  wait without their locks, so a suspect that takes the worker down costs them no attempt;
- it runs with no other step from the stream beside it: it waits for those in flight to end,
  and none starts until it is over;
- when its lock is busy (a holder not yet known to be gone, or its lease not run out), it
  waits for it aside: the worker's ordinary steps go on meanwhile, the other suspects wait.

A session is then charged once for each worker death it was in flight for. Its next step
runs alone elsewhere and commits, which resets the count, so with ``max_attempts`` of 2 or
more a healthy session finishes. A poisoned step is charged at every attempt until it is
dead-lettered.

Steps handed over by a feed (lock A already taken in this worker's name, so already charged)
pass by the gate: holding them back would gain nothing, and their leases would run out.

The cost: while a suspect runs (normally a few ms), the worker starts no step from the
stream. An ordinary step that waits for a busy lock steps aside too (``aside``).
"""

from __future__ import annotations

import asyncio
from types import TracebackType

__all__ = ["Quarantine"]


class Quarantine:
    """The gate a worker's steps pass through: any number of ordinary steps at once, or one
    suspect alone. A suspect waiting for the ordinary steps to end goes first (else a busy
    worker would never run it)."""

    def __init__(self) -> None:
        self._running = 0  # ordinary steps inside
        self._alone = False  # the suspect is inside, alone
        self._draining = False  # the suspect waits for the ordinary steps inside to end
        self._suspects = asyncio.Lock()  # one suspect at a time, lock wait included
        self._changed = asyncio.Event()
        self._passes: dict[asyncio.Task[object], _Pass] = {}

    def step(self, suspect: bool, *, handed: bool = False) -> _Pass:
        """``async with quarantine.step(suspect, handed=...):`` around one step."""
        return _Pass(self, suspect, bypass=handed)

    def aside(self) -> _Aside:
        """``async with quarantine.aside():`` around a step's wait for a busy lock: the step
        lets the others run meanwhile (a suspect still keeps the other suspects out), and
        passes the gate again after."""
        task = asyncio.current_task()
        return _Aside(self._passes.get(task) if task is not None else None)

    async def _enter(self, alone: bool) -> None:
        if alone:
            self._draining = True
            try:
                while self._running:
                    await self._changed.wait()
            finally:
                self._draining = False
                self._poke()
            self._alone = True
        else:
            while self._alone or self._draining:
                await self._changed.wait()
            self._running += 1

    def _leave(self, alone: bool) -> None:
        if alone:
            self._alone = False
        else:
            self._running -= 1
        self._poke()

    def _poke(self) -> None:
        """Wake whoever waits, to look again (one Event per change, so none is missed)."""
        self._changed.set()
        self._changed = asyncio.Event()


class _Pass:
    __slots__ = ("_gate", "_task", "alone", "bypass", "inside")

    def __init__(self, gate: Quarantine, alone: bool, *, bypass: bool) -> None:
        self._gate = gate
        self._task: asyncio.Task[object] | None = None
        self.alone = alone and not bypass
        self.bypass = bypass
        self.inside = False

    async def __aenter__(self) -> _Pass:
        if self.bypass:
            return self
        gate = self._gate
        if self.alone:
            await gate._suspects.acquire()
            try:
                await gate._enter(True)
            except BaseException:
                gate._suspects.release()
                raise
        elif gate._alone or gate._draining:
            await gate._enter(False)
        else:  # the hot path: nothing to wait for
            gate._running += 1
        self.inside = True
        self._task = asyncio.current_task()
        if self._task is not None:
            gate._passes[self._task] = self
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.bypass:
            return
        gate = self._gate
        if self._task is not None:
            gate._passes.pop(self._task, None)
        if self.inside:
            self.inside = False
            if self.alone or gate._draining:
                gate._leave(self.alone)
            else:
                gate._running -= 1  # nobody waits on it
        if self.alone:
            gate._suspects.release()


class _Aside:
    __slots__ = ("_pass",)

    def __init__(self, held: _Pass | None) -> None:
        self._pass = held

    async def __aenter__(self) -> None:
        held = self._pass
        if held is not None and held.inside:
            held.inside = False
            held._gate._leave(held.alone)

    async def __aexit__(
        self, typ: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        held = self._pass
        if held is not None and not held.inside:
            await held._gate._enter(held.alone)
            held.inside = True
