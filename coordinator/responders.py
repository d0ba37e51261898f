"""Who answers the prompts when ``coordinator run`` plays the host.

- ``terminal``: a person types the answer (one line, or ``<<<`` ... ``>>>`` for several);
- ``echo``: the answer is the prompt itself (a pure function of the prompt: reproducible);
- ``cmd:SHELL COMMAND``: the command gets the prompt on stdin (and ``ALC_QUERY_ID``,
  ``ALC_SYSTEM``, ``ALC_MAX_TOKENS`` in its environment) and prints the answer; the queries
  of a batch run at once, ``parallel`` at a time.

A responder only answers: showing the prompt is the caller's (``coordinator.console``), so
each prompt is shown once whoever answers it. ``parallel`` tells the caller how many
queries of a batch it may ask at once; ``interactive`` that a person types the answers (so
they are not echoed back to them).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
from collections.abc import Callable
from typing import Protocol

from .errors import InvalidInput, ResponderFailed
from .models import LlmQuery

CMD_TIMEOUT_S = 600.0
DEFAULT_PARALLEL = 4
#: How much of a failing command's stderr its error quotes (the end: where the cause is).
STDERR_TAIL = 500
#: The lines that open and close a multi-line terminal answer.
OPEN_BLOCK, CLOSE_BLOCK = "<<<", ">>>"


class Responder(Protocol):
    #: A person types the answers: their prompt is shown in full, their answer not echoed.
    interactive: bool
    #: How many queries of one batch may be asked at once.
    parallel: int

    async def answer(self, q: LlmQuery) -> str: ...


def make_responder(spec: str, *, parallel: int = DEFAULT_PARALLEL,
                   show: Callable[[LlmQuery], None] | None = None) -> Responder:
    """The responder ``--responder SPEC`` names. ``show`` is how the terminal responder
    puts a prompt in front of its person, right before it reads the answer."""
    if spec == "echo":
        return Echo()
    if spec == "terminal":
        return Terminal(StdinLines(), show or (lambda q: None))
    if spec.startswith("cmd:") and spec[4:].strip():
        return Command(spec[4:].strip(), parallel=parallel)
    raise InvalidInput(f"unknown responder {spec!r}: use terminal, echo or 'cmd:SHELL COMMAND'")


class Echo:
    interactive = False
    parallel = 1_000

    async def answer(self, q: LlmQuery) -> str:
        return q.prompt


class StdinLines:
    """Lines of standard input, read by a daemon thread and handed to the event loop.

    Not ``asyncio.to_thread(sys.stdin.readline)``: ``asyncio.run`` waits at exit for its
    executor's threads, so a read that never returns (a person who pressed Ctrl-C instead
    of Enter) kept the process alive until the next Enter. A daemon thread is left behind at
    exit; it reads the file descriptor with ``os.read``, which holds none of Python's locks
    (a thread blocked in ``sys.stdin.readline`` holds the buffer's lock, which the
    interpreter's shutdown then waits for). Not ``loop.add_reader``: it refuses a regular
    file (``run < answers.txt``)."""

    def __init__(self, fd: int = 0) -> None:
        self._fd = fd
        self._lines: asyncio.Queue[str | None] | None = None

    async def readline(self) -> str | None:
        """The next line without its newline; None once the input has ended."""
        if self._lines is None:
            self._lines = asyncio.Queue()
            self._start(asyncio.get_running_loop(), self._lines)
        line = await self._lines.get()
        if line is None:
            self._lines.put_nowait(None)  # ended for every later read too
        return line

    def _start(self, loop: asyncio.AbstractEventLoop, lines: asyncio.Queue[str | None]) -> None:
        def put(line: str | None) -> bool:
            try:
                loop.call_soon_threadsafe(lines.put_nowait, line)
            except RuntimeError:  # the loop is closed: nobody reads any more
                return False
            return True

        def pump() -> None:
            pending = b""
            while True:
                try:
                    chunk = os.read(self._fd, 65536)
                except OSError:
                    chunk = b""
                if not chunk:
                    break
                pending += chunk
                while b"\n" in pending:
                    line, _, pending = pending.partition(b"\n")
                    if not put(line.decode("utf-8", errors="replace").rstrip("\r")):
                        return
            if pending:
                put(pending.decode("utf-8", errors="replace"))
            put(None)

        threading.Thread(target=pump, name="coordinator-stdin", daemon=True).start()


class Terminal:
    interactive = True
    parallel = 1  # one person, one question at a time

    def __init__(self, lines: StdinLines, show: Callable[[LlmQuery], None]) -> None:
        self._lines = lines
        self._show = show

    async def answer(self, q: LlmQuery) -> str:
        self._show(q)
        first = await self._lines.readline()
        if first is None:
            raise self._closed(q)
        if first.strip() != OPEN_BLOCK:
            return first
        block: list[str] = []
        while (line := await self._lines.readline()) is not None:
            if line.strip() == CLOSE_BLOCK:
                return "\n".join(block)
            block.append(line)
        raise self._closed(q)

    @staticmethod
    def _closed(q: LlmQuery) -> ResponderFailed:
        return ResponderFailed(
            f"standard input ended before an answer to {q.id} was given (to run without "
            "a person, use --responder echo or --responder 'cmd:SHELL COMMAND')",
            query_id=q.id)


class Command:
    """Runs the command once per query, ``parallel`` at a time (the caller bounds it)."""

    interactive = False

    def __init__(self, cmd: str, *, parallel: int = DEFAULT_PARALLEL,
                 timeout_s: float = CMD_TIMEOUT_S) -> None:
        self.cmd = cmd
        self.parallel = parallel
        self.timeout_s = timeout_s

    async def answer(self, q: LlmQuery) -> str:
        env = {**os.environ, "ALC_QUERY_ID": q.id, "ALC_SYSTEM": q.system or "",
               "ALC_MAX_TOKENS": str(q.max_tokens)}
        proc = await asyncio.create_subprocess_shell(
            self.cmd, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE, env=env,
        )
        try:
            out, err = await asyncio.wait_for(proc.communicate(q.prompt.encode()),
                                              self.timeout_s)
        except TimeoutError:
            raise ResponderFailed(
                f"the responder command for {q.id} gave no answer within "
                f"{self.timeout_s:g} s", query_id=q.id) from None
        finally:
            if proc.returncode is None:  # timed out, or the run is stopping: no orphans
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
        if proc.returncode != 0:
            tail = err.decode("utf-8", errors="replace").strip()[-STDERR_TAIL:]
            raise ResponderFailed(
                f"the responder command for {q.id} exited with {proc.returncode}"
                + (f": {tail}" if tail else " (and wrote nothing on stderr)"),
                query_id=q.id)
        return out.decode("utf-8", errors="replace").rstrip("\n")
