"""``coordinator worker`` as a supervising parent, so the command recovers by itself.

The watchdog (``watchdog.py``) interrupts a strategy that holds the worker's loop, and ends
the process when even that does not work; but it is a thread of that process, and a C call
that never gives back the GIL (``re`` backtracking, ``sum(range(10**12))``) stops it too.
So by default the worker runs as a child of a small parent that does no work of its own:

- the child's loop writes a byte to a pipe every ``BEAT_S`` (``beats``); a child whose loop
  has not beaten for the watchdog's limit plus ``GRACE_S`` is SIGKILLed, so no process is
  left burning a core, and a new child is started. The dead child's steps are taken over by
  the other workers (lock A's lease runs out, the job is claimed), and each takeover counts
  an attempt, so a step that wedges every worker it lands on is dead-lettered after
  ``max_attempts`` like any step that kills its worker;
- a child that dies any other way (killed, or exiting on its own but for 0 and 2, the CLI's
  "stopped" and "refused to start") is started again, after a back-off that grows while
  children keep dying young;
- SIGTERM and SIGINT are forwarded, and the parent exits with the child's code; a child that
  has not stopped within its shutdown grace (plus a margin) is killed.

A child whose parent died hears it at its next beat (a broken pipe) and stops. Opt out with
``ALC_SUPERVISE=0`` (one process, as before: tests that signal worker PIDs directly).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import Callable, Iterator

from coordinator.errors import InvalidInput
from coordinator.settings import Settings

from .watchdog import WEDGED_EXIT, block_limit

__all__ = ["BEAT_FD_ENV", "SUPERVISE_ENV", "Supervisor", "beats", "wanted"]

log = logging.getLogger(__name__)

SUPERVISE_ENV = "ALC_SUPERVISE"
#: Set by the parent in the child's environment: the pipe the child beats on.
BEAT_FD_ENV = "ALC_SUPERVISOR_FD"
#: How often the child's loop beats.
BEAT_S = 0.1
#: Beyond the watchdog's limit, how long a silent loop is given: the watchdog's interrupt
#: and its escalation (1 s) come first; this is for what stops the watchdog thread too.
GRACE_S = 3.0
#: A child not beating yet (still starting: imports, first connection) gets this long.
STARTUP_S = 30.0
#: How often the parent looks; a look this late means the parent was stopped too (SIGSTOP
#: of the group, a paused VM), and the child is not to blame for the silence.
CHECK_S = 0.1
PAUSED_S = 1.0
#: Restart back-off: from the first, doubled while children die within HEALTHY_S.
BACKOFF_S = (0.2, 10.0)
HEALTHY_S = 30.0
#: Beyond the child's shutdown grace, how long a stopping child is given before SIGKILL.
STOP_MARGIN_S = 10.0
#: Child exit codes that end the parent too: stopped, and refused to start (the CLI's error).
FINAL_CODES = (0, 2)


def wanted() -> bool:
    """Whether this ``coordinator worker`` is to supervise: not when it is the child, nor
    when ``ALC_SUPERVISE=0``."""
    if BEAT_FD_ENV in os.environ:
        return False
    return os.environ.get(SUPERVISE_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


@contextlib.contextmanager
def beats(on_orphaned: Callable[[], None]) -> Iterator[None]:
    """In a supervised child, beat to the parent while the body runs (on the running loop);
    ``on_orphaned`` is called once the parent is gone. Anywhere else, nothing."""
    raw = os.environ.pop(BEAT_FD_ENV, None)
    if raw is None:
        yield
        return
    try:
        fd = int(raw)
        os.fstat(fd)
    except (ValueError, OSError):
        raise InvalidInput(f"{BEAT_FD_ENV}={raw!r} names no open pipe: it is set by the "
                           "supervising `coordinator worker` for its child, not by hand") from None
    os.set_blocking(fd, False)
    beat = _Beats(fd, on_orphaned)
    try:
        yield
    finally:
        beat.close()


class _Beats:
    def __init__(self, fd: int, on_orphaned: Callable[[], None]) -> None:
        self._fd = fd
        self._on_orphaned = on_orphaned
        self._loop = asyncio.get_running_loop()
        self._handle: asyncio.TimerHandle | None = None
        self._beat()

    def _beat(self) -> None:
        try:
            os.write(self._fd, b".")
        except BlockingIOError:
            pass  # the parent is behind on reading: it has beats enough
        except OSError as exc:
            log.warning("the supervising parent is gone (%s): stopping", exc)
            self._handle = None
            self._on_orphaned()
            return
        self._handle = self._loop.call_later(BEAT_S, self._beat)

    def close(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
        os.close(self._fd)


class Supervisor:
    """Runs ``argv`` (the worker, as a child) until asked to stop; see the module
    docstring for when it kills and restarts it."""

    def __init__(self, argv: list[str], env: dict[str, str], settings: Settings) -> None:
        self.argv = argv
        self.env = env
        self.stall_limit_s = block_limit(settings)[0] + GRACE_S
        self.stop_limit_s = settings.shutdown_grace_s + STOP_MARGIN_S
        self._proc: asyncio.subprocess.Process | None = None
        self._stopping = asyncio.Event()
        self._stop_at: float | None = None
        self._beat_at = 0.0
        self._beaten = False

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._forward, sig)
        log.info("supervising the worker: a child whose loop is silent for %.1f s is "
                 "replaced (%s=0 to run without)", self.stall_limit_s, SUPERVISE_ENV)
        backoff = BACKOFF_S[0]
        while True:
            started = loop.time()
            pid, code = await self._run_child()
            if self._stopping.is_set():
                return 128 - code if code < 0 else code
            if code in FINAL_CODES:
                return code
            young = loop.time() - started < HEALTHY_S
            delay = backoff if young else 0.0
            backoff = min(BACKOFF_S[1], backoff * 2) if young else BACKOFF_S[0]
            log.warning("worker child %d %s; starting a new one in %.1f s", pid,
                        _describe(code), delay)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), delay)
            if self._stopping.is_set():
                return 0

    def _forward(self, sig: signal.Signals) -> None:
        if self._stop_at is None:
            self._stop_at = asyncio.get_running_loop().time()
        self._stopping.set()
        if self._proc is not None and self._proc.returncode is None:
            self._proc.send_signal(sig)

    async def _run_child(self) -> tuple[int, int]:
        """Start a child, watch it until it exits; its pid and exit code."""
        loop = asyncio.get_running_loop()
        r, w = os.pipe()
        try:
            proc = await asyncio.create_subprocess_exec(
                *self.argv, env={**self.env, BEAT_FD_ENV: str(w)}, pass_fds=(w,),
                stdin=asyncio.subprocess.DEVNULL)
        except BaseException:
            os.close(r)
            raise
        finally:
            os.close(w)
        self._proc, self._beaten = proc, False
        log.info("worker child %d started", proc.pid)
        if self._stopping.is_set():  # asked to stop while it was being started
            proc.send_signal(signal.SIGTERM)
        os.set_blocking(r, False)
        loop.add_reader(r, self._heard, r)
        exited = asyncio.ensure_future(proc.wait())
        try:
            await self._watch(proc, exited)
            return proc.pid, await exited
        finally:
            if proc.returncode is None:  # we are the ones leaving (an error): not it alone
                proc.kill()
            loop.remove_reader(r)
            os.close(r)
            self._proc = None

    async def _watch(self, proc: asyncio.subprocess.Process, exited: asyncio.Future[int]) -> None:
        loop = asyncio.get_running_loop()
        self._beat_at = last = loop.time()
        killed = False
        while not exited.done():
            await asyncio.wait({exited}, timeout=CHECK_S)
            now = loop.time()
            if now - last > PAUSED_S:
                self._beat_at = now
            last = now
            if killed or exited.done():
                continue
            limit = self.stall_limit_s if self._beaten else max(self.stall_limit_s, STARTUP_S)
            if now - self._beat_at > limit:
                log.error("worker child %d: its event loop has been silent for %.1f s (a "
                          "strategy step blocking it where its watchdog cannot reach): "
                          "killing it", proc.pid, now - self._beat_at)
            elif self._stop_at is not None and now - self._stop_at > self.stop_limit_s:
                log.error("worker child %d did not stop within %.0f s: killing it", proc.pid,
                          self.stop_limit_s)
            else:
                continue
            proc.kill()
            killed = True

    def _heard(self, fd: int) -> None:
        try:
            data = os.read(fd, 4096)
        except BlockingIOError:
            return
        if data:
            self._beat_at, self._beaten = asyncio.get_running_loop().time(), True
        else:  # the child closed its end: it is exiting
            asyncio.get_running_loop().remove_reader(fd)


def _describe(code: int) -> str:
    if code < 0:
        return f"was killed by {signal.Signals(-code).name}"
    if code == WEDGED_EXIT:
        return (f"ended itself (exit {code}): its watchdog could not get a blocked strategy "
                "step off its event loop")
    return f"exited with code {code}"
