"""Strategy code must not take its worker down: the watchdog cuts a step that holds the loop.

Strategies run as asyncio tasks on the worker's one event loop, so a strategy that computes
without awaiting (``while True: pass``) or makes a blocking call holds up everything else on
that loop: the step timeout (an asyncio timer), the lease renewals of every session the
worker is stepping, its heartbeat, the other sessions' steps. Nothing on the loop can stop
it, so a thread does:

- every strategy coroutine runs wrapped (``StepClock.timed``), so the process always knows
  which execution's code holds the loop and since when;
- the ``Watchdog`` thread, seeing one hold it past ``block_limit_s``, or past its step's
  deadline, sends SIGUSR1 to the main thread; the handler raises ``StepInterrupted`` (a
  ``BaseException``, so ``except Exception`` in a strategy does not swallow it) inside that
  strategy, which ends its step as a ``step_timeout`` failure of its own session while the
  worker carries on. This stops pure-Python loops and calls a signal interrupts
  (``time.sleep``, most blocking I/O);
- when the strategy is still running a second after (signals blocked, a C call that retries
  on EINTR or never returns), the watchdog ends the process (exit ``WEDGED_EXIT``): a worker
  that cannot get its loop back is worth less than a fresh one, and its steps are taken over
  by replay. ``coordinator worker``'s supervising parent (``supervisor.py``) starts a new
  one, and kills a child whose loop stopped beating when even this thread cannot run (a C
  loop holding the GIL).

``block_limit_s`` is the step timeout, or half the lock lease when that is shorter: the
worker renews each lease every third of it, so a loop held longer than half a lease lets
other workers take over this worker's sessions (lock A expired, job claimed), and replay
the very step that holds it, freezing them too: the issue this module answers.

Time that other strategies' code held the loop does not count against a step (up to one
more ``timeout_s``): a step waiting on a timer or a thread while a neighbour froze the loop
is not the one to fail.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import signal
import threading
import time
from collections.abc import Coroutine, Generator
from types import FrameType, TracebackType
from typing import Any, TypeVar

from coordinator.logs import about
from coordinator.settings import Settings

__all__ = ["WEDGED_EXIT", "StepClock", "StepInterrupted", "Watchdog", "block_limit"]

log = logging.getLogger(__name__)

T = TypeVar("T")

#: How often the watchdog thread looks.
CHECK_S = 0.05
#: A strategy still running this long after its first interrupt is not coming back.
ESCALATE_S = 1.0
#: Interrupts to a strategy that swallowed one are repeated this often until then.
RESEND_S = 0.25
#: A watchdog wake-up this late means the whole process was stopped (SIGSTOP, a paused
#: VM): the code that was running then is not to blame for the gap.
PAUSED_S = 0.5
#: The exit code of a worker whose watchdog could not stop a step (EX_SOFTWARE).
WEDGED_EXIT = 70


class StepInterrupted(BaseException):
    """Raised inside a strategy that held the worker's loop too long: a BaseException, so
    that a strategy's `except Exception` does not take it for one of its own errors."""


class _Shared:
    """What the loop's thread and the watchdog thread share (plain attribute reads and
    writes, atomic under the GIL): who holds the loop now, and for how long all strategies
    held it so far."""

    __slots__ = ("block_limit_s", "busy_s", "limit_why", "resumed_at", "running")

    def __init__(self) -> None:
        self.running: StepClock | None = None
        self.busy_s = 0.0
        self.block_limit_s = math.inf  # no watchdog: nothing is cut (in-process tests)
        self.limit_why = ""
        self.resumed_at = 0.0


_shared = _Shared()


def block_limit(settings: Settings) -> tuple[float, str]:
    """The longest a strategy may hold its worker's loop at once, and why that long."""
    half_lease = settings.lease_ms / 2000
    if half_lease < settings.step_timeout_s:
        return half_lease, (f"half the {settings.lease_ms / 1000:g} s lock lease, beyond which "
                            "the worker would lose the locks of the sessions it is stepping")
    return settings.step_timeout_s, "the step timeout"


class StepClock:
    """One execution's time: the deadline of the step it is in, and how long its own code
    held the loop, so others' time can be told apart (see the module docstring)."""

    __slots__ = ("_all0", "_expired", "_own0", "_started", "_timeout_s", "_timer", "busy_s",
                 "entered", "interrupted", "label", "session_id")

    def __init__(self, label: str = "", *, session_id: str | None = None) -> None:
        self.label = label
        #: The session whose strategy this clocks, for the watchdog's log lines.
        self.session_id = session_id
        self.busy_s = 0.0
        #: When the strategy's code last got the loop (valid while ``running`` is this).
        self.entered = 0.0
        #: The step-timeout message, once the watchdog interrupted this step.
        self.interrupted: str | None = None
        self._started: float | None = None
        self._timeout_s = math.inf
        self._own0 = self._all0 = 0.0
        self._expired = False
        self._timer: asyncio.TimerHandle | None = None

    @property
    def timeout_s(self) -> float:
        """The current (or last) step's timeout."""
        return self._timeout_s

    def timed(self, coro: Coroutine[Any, Any, T]) -> Coroutine[Any, Any, T]:
        """``coro`` (the strategy's main coroutine), for ``create_task``, clocked."""
        return _Timed(coro, self)

    def deadline(self) -> float:
        """When the current step times out (monotonic), others' time on the loop added."""
        started = self._started  # read once: the watchdog thread asks too
        if started is None:
            return math.inf
        others = (_shared.busy_s - self._all0) - (self.busy_s - self._own0)
        return started + self._timeout_s + min(self._timeout_s, max(0.0, others))

    async def within(self, outbox: asyncio.Future[T], timeout_s: float) -> T:
        """``await outbox`` as this clock's step, bounded by ``timeout_s``: ``TimeoutError``
        when it is overrun (message-less: the caller words it), or with the watchdog's
        message when the step was interrupted (whether the strategy died of it or not)."""
        loop = asyncio.get_running_loop()
        self._started, self._timeout_s = loop.time(), timeout_s
        self._own0, self._all0 = self.busy_s, _shared.busy_s
        self._expired, self.interrupted = False, None
        self._timer = loop.call_at(self._started + timeout_s, self._expire, outbox)
        try:
            result = await outbox
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if self._expired and (task is None or not task.cancelling()):
                raise TimeoutError from None
            raise
        finally:
            self._timer.cancel()
            self._started = None
        if self.interrupted is not None:
            raise TimeoutError(self.interrupted)
        return result

    def _expire(self, outbox: asyncio.Future[Any]) -> None:
        if outbox.done():
            return  # the strategy made it (its step just has not woken up yet)
        loop = asyncio.get_running_loop()
        deadline = self.deadline()
        if loop.time() < deadline:  # others held the loop meanwhile: their time is theirs
            self._timer = loop.call_at(deadline, self._expire, outbox)
            return
        self._expired = True
        outbox.cancel()


class _Timed(Coroutine[Any, Any, T]):
    """A coroutine that clocks each run of the one it wraps: the C task steps it through
    ``send`` and ``throw`` like any coroutine, and only this says whose code holds the loop."""

    __slots__ = ("_clock", "_coro")

    def __init__(self, coro: Coroutine[Any, Any, T], clock: StepClock) -> None:
        self._coro = coro
        self._clock = clock

    def send(self, value: Any) -> Any:
        clock = self._clock
        _shared.running, clock.entered = clock, time.monotonic()
        try:
            return self._coro.send(value)
        finally:
            _shared.running = None
            held = time.monotonic() - clock.entered
            clock.busy_s += held
            _shared.busy_s += held

    def throw(self, typ: Any, val: Any = None, tb: TracebackType | None = None) -> Any:
        clock = self._clock
        _shared.running, clock.entered = clock, time.monotonic()
        try:
            if val is None and tb is None:
                return self._coro.throw(typ)
            return self._coro.throw(typ, val, tb)
        finally:
            _shared.running = None
            held = time.monotonic() - clock.entered
            clock.busy_s += held
            _shared.busy_s += held

    def close(self) -> None:
        self._coro.close()

    def __await__(self) -> Generator[Any, None, T]:
        raise TypeError("a clocked strategy runs as a task of its own (asyncio.create_task)")

    @property
    def cr_frame(self) -> FrameType | None:
        """For ``Task.print_stack``: where the strategy is."""
        frame: FrameType | None = getattr(self._coro, "cr_frame", None)
        return frame


def _overrun(now: float) -> tuple[StepClock, str] | None:
    """The strategy holding the loop now, if it held it too long, with its verdict."""
    clock = _shared.running
    if clock is None:
        return None
    held = now - max(clock.entered, _shared.resumed_at)
    if held >= _shared.block_limit_s:
        return clock, (f"step timeout: the strategy ran {held:.1f} s without awaiting, holding "
                       f"up its worker; a step may hold it at most {_shared.block_limit_s:g} s "
                       f"at a time ({_shared.limit_why}). Await between long computations, or "
                       "run them in a thread (asyncio.to_thread)")
    if now >= clock.deadline() and held > CHECK_S:
        return clock, (f"step timeout: the strategy neither asked nor returned within "
                       f"{clock.timeout_s:g} s (it was interrupted while holding up its "
                       "worker)")
    return None


def _on_sigusr1(signum: int, frame: FrameType | None) -> None:
    """Runs in the main thread, between two bytecodes of whatever runs there: when that is
    a strategy past its limit, it is the strategy that gets the exception."""
    found = _overrun(time.monotonic())
    if found is not None:
        clock, message = found
        if clock.interrupted is None:
            clock.interrupted = message
        raise StepInterrupted(clock.interrupted)


class Watchdog:
    """The thread that watches which strategy holds the loop (a context manager: the
    signal handler is installed in the main thread on entry, and both go on exit)."""

    def __init__(self, block_limit_s: float, why: str) -> None:
        self.block_limit_s = block_limit_s
        self.why = why
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="step-watchdog", daemon=True)
        self._previous: Any = None
        # The watchdog thread's own: the overrun it saw first (clock, its entry, when seen),
        # when it last sent the signal, when it last looked.
        self._first: tuple[StepClock, float, float] | None = None
        self._sent = 0.0
        self._last = 0.0

    def __enter__(self) -> Watchdog:
        self._previous = signal.signal(signal.SIGUSR1, _on_sigusr1)
        _shared.block_limit_s, _shared.limit_why = self.block_limit_s, self.why
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        _shared.block_limit_s, _shared.limit_why = math.inf, ""
        signal.signal(signal.SIGUSR1, self._previous)

    def _watch(self) -> None:
        main = threading.main_thread().ident
        assert main is not None
        self._last = time.monotonic()
        while not self._stop.wait(CHECK_S):
            try:
                self._look(main)
            except Exception:  # a bug here must not leave the worker unwatched
                log.exception("the step watchdog failed a look; it goes on")

    def _look(self, main: int) -> None:
        """Interrupt the strategy holding the loop past its limit, or end the process when
        an interrupt did not help."""
        now = time.monotonic()
        if now - self._last > PAUSED_S:
            _shared.resumed_at = now
        self._last = now
        found = _overrun(now)
        if found is None:
            self._first = None
            return
        clock = found[0]
        first = self._first
        if first is None or first[0] is not clock or first[1] != clock.entered:
            first = self._first = (clock, clock.entered, now)
        elif now - first[2] >= ESCALATE_S:
            _wedged(clock, now - first[2])
        if now - self._sent >= RESEND_S:
            # The signal first, the log line after: logging takes locks that whatever holds
            # up the main thread may hold too.
            signal.pthread_kill(main, signal.SIGUSR1)
            self._sent = now
            if now - first[2] < RESEND_S:
                log.error("strategy %s of session %s held the event loop past its limit; "
                          "interrupting it", clock.label or "?", clock.session_id or "?",
                          extra=about(clock.session_id))


def _wedged(clock: StepClock, since_s: float) -> None:
    """End the process: its loop is not coming back. Said on stderr without ``logging``,
    whose locks the stuck main thread may hold."""
    message = (f"{time.strftime('%Y-%m-%d %H:%M:%S')} CRITICAL {__name__}: strategy "
               f"{clock.label or '?'} of session {clock.session_id or '?'} is still holding "
               f"the event loop {since_s:.1f} s after it "
               "was interrupted (signals blocked, or a call that cannot be interrupted): "
               f"ending this worker process (exit {WEDGED_EXIT}); its steps are taken over "
               "elsewhere\n")
    try:
        os.write(2, message.encode(errors="replace"))
    finally:
        os._exit(WEDGED_EXIT)
