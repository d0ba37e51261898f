"""Helpers for the CLI tests (``test_cli_*.py``): CLI processes whose output the test reads
as it comes, one under a pseudo-terminal (so Ctrl-C is a real SIGINT from the terminal),
and a registry on the test's namespace to check what the CLI left in Redis. No tests here.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import pty
import termios
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from coordinator.registry import SessionRegistry
from tests.procs import FAST_SETTINGS, ROOT, WAIT_S, CliResult, clean_env, cli_argv


def conn(redis_url: str, namespace: str) -> tuple[str, ...]:
    return ("--redis", redis_url, "--namespace", namespace)


@contextlib.asynccontextmanager
async def registry(redis_url: str, namespace: str) -> AsyncIterator[SessionRegistry]:
    async with SessionRegistry.from_url(redis_url, namespace=namespace,
                                        **FAST_SETTINGS) as reg:
        yield reg


def _controlling_tty() -> None:
    """In the child, after ``setsid``: its stdin (the pty's slave) becomes its controlling
    terminal, so the terminal's ^C is a SIGINT to it, as in a shell."""
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


@dataclass
class Cli:
    """A running CLI process: stderr read line by line as it comes, stdout at the end."""

    proc: asyncio.subprocess.Process
    master: int | None = None
    err: list[str] = field(default_factory=list)

    async def read_err_until(self, fragment: str, timeout: float = WAIT_S) -> str:
        """Read stderr until a line holds ``fragment``; that line."""
        assert self.proc.stderr is not None
        async with asyncio.timeout(timeout):
            while True:
                raw = await self.proc.stderr.readline()
                if not raw:
                    raise AssertionError(f"stderr ended (rc {await self.proc.wait()}) before "
                                         f"{fragment!r}:\n{''.join(self.err)}")
                line = raw.decode(errors="replace")
                self.err.append(line)
                if fragment in line:
                    return line

    def ctrl_c(self) -> None:
        assert self.master is not None, "not under a pseudo-terminal"
        os.write(self.master, b"\x03")

    async def finish(self, timeout: float = WAIT_S) -> CliResult:
        """Wait (at most ``timeout``) for the exit; the output."""
        assert self.proc.stdout is not None and self.proc.stderr is not None
        async with asyncio.timeout(timeout):
            out, rest = await asyncio.gather(self.proc.stdout.read(), self.proc.stderr.read())
            code = await self.proc.wait()
        self.err.append(rest.decode(errors="replace"))
        return CliResult(code, out.decode(errors="replace"), "".join(self.err))

    def kill(self) -> None:
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
        if self.master is not None:
            os.close(self.master)
            self.master = None


@contextlib.asynccontextmanager
async def cli(*args: str, stdin: Any = asyncio.subprocess.DEVNULL, tty: bool = False,
              **env: str) -> AsyncIterator[Cli]:
    """``coordinator ARGS`` as a child; with ``tty`` its stdin is a pseudo-terminal that
    is its controlling terminal (``Cli.ctrl_c`` types ^C on it). Killed on the way out."""
    master = None
    extra: dict[str, Any] = {}
    if tty:
        master, slave = pty.openpty()
        stdin = slave
        extra = {"start_new_session": True, "preexec_fn": _controlling_tty}
    try:
        proc = await asyncio.create_subprocess_exec(
            *cli_argv(*args), cwd=ROOT, env=clean_env(**env), stdin=stdin,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, **extra)
    finally:
        if tty:
            os.close(slave)
    handle = Cli(proc, master)
    try:
        yield handle
    finally:
        handle.kill()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(WAIT_S):
                await proc.wait()


async def session_phase(redis_url: str, namespace: str, sid: str) -> str:
    async with registry(redis_url, namespace) as reg:
        return str((await reg.status(sid))["phase"])
