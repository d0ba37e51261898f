"""A real ``redis-server`` child process for tests that need crash semantics.

fakeredis is fine for logic, but recovery code must be tested against what a
real server does when it is killed, frozen or restarted from its AOF. This
module owns exactly one server per ``RedisProcess``, on a loopback port, in a
private directory, so tests can do those things without touching any system
Redis and without leaking processes when a test (or the whole run) fails.
"""

from __future__ import annotations

import atexit
import contextlib
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Self

import redis

from tests.helpers import free_port

__all__ = [
    "RedisProcess",
    "RedisProcessError",
    "RedisServerNotFoundError",
    "RedisStartError",
]

_HOST = "127.0.0.1"
_APPENDFSYNC_CHOICES = frozenset({"always", "everysec", "no"})
# Auto-picked ports can be stolen between free_port() and bind(); retrying
# with a fresh port hides that race. An explicit port is never retried.
_AUTO_PORT_ATTEMPTS = 3

# Every live child, so an interpreter exit (including after a failed test
# run) can SIGKILL whatever fixtures did not get to clean up.
_live: set[subprocess.Popen[bytes]] = set()
# Data dirs of instances never close()d, removed at exit once their servers
# are dead, so aborted runs do not litter the temp dir.
_unclosed_dirs: set[Path] = set()


def _cleanup_at_exit() -> None:
    """SIGKILL every child still running at interpreter exit so none is orphaned."""
    for proc in list(_live):
        with contextlib.suppress(OSError):
            proc.kill()
        with contextlib.suppress(OSError, subprocess.TimeoutExpired):
            proc.wait(timeout=5)
        _live.discard(proc)
    for path in list(_unclosed_dirs):
        shutil.rmtree(path, ignore_errors=True)
        _unclosed_dirs.discard(path)


atexit.register(_cleanup_at_exit)


class RedisProcessError(RuntimeError):
    """Base error for problems managing the redis-server child."""


class RedisServerNotFoundError(RedisProcessError):
    """redis-server is not installed; tests cannot fake their way around that."""


class RedisStartError(RedisProcessError):
    """The server exited or did not answer PING in time."""


class RedisProcess:
    """One ``redis-server`` bound to 127.0.0.1 with its data in a private temp dir.

    The port and directory are fixed for the lifetime of the object so that
    ``restart()`` (or ``kill()`` followed by ``start()``) brings back the same
    AOF data at the same URL, which is what clients reconnecting after a crash
    see in production.
    """

    def __init__(
        self,
        *,
        appendonly: bool = False,
        appendfsync: str = "everysec",
        extra_args: list[str] | None = None,
        port: int | None = None,
        startup_timeout: float = 10.0,
    ) -> None:
        executable = shutil.which("redis-server")
        if executable is None:
            raise RedisServerNotFoundError(
                "redis-server was not found on PATH. Install it (Debian/Ubuntu: "
                "`apt-get install -y redis-server`); tests using a real server need it."
            )
        if appendfsync not in _APPENDFSYNC_CHOICES:
            raise ValueError(
                f"appendfsync must be one of {sorted(_APPENDFSYNC_CHOICES)}, got {appendfsync!r}"
            )
        self._executable = executable
        self._appendonly = appendonly
        self._appendfsync = appendfsync
        self._extra_args = list(extra_args or [])
        self._port: int | None = port
        self._port_explicit = port is not None
        self._startup_timeout = startup_timeout
        self._dir = Path(tempfile.mkdtemp(prefix="redis-proc-"))
        _unclosed_dirs.add(self._dir)
        self._proc: subprocess.Popen[bytes] | None = None
        self._paused = False
        self._closed = False
        self._started_once = False

    # -- properties -------------------------------------------------------

    @property
    def port(self) -> int:
        """The TCP port; fixed after the first start so restarts keep the URL."""
        if self._port is None:
            raise RedisProcessError("port is not known until start() has been called")
        return self._port

    @property
    def url(self) -> str:
        """URL for redis-py clients (database 0)."""
        return f"redis://{_HOST}:{self.port}/0"

    @property
    def dir(self) -> Path:
        """Working directory holding the AOF and the server log."""
        return self._dir

    @property
    def log_path(self) -> Path:
        """Server log, worth reading when a start-up or crash test fails."""
        return self._dir / "redis.log"

    @property
    def pid(self) -> int | None:
        """PID of the running child, or None when it is not running."""
        return self._proc.pid if self._proc is not None else None

    @property
    def is_running(self) -> bool:
        """True while a child exists and has not exited (a paused one counts)."""
        return self._proc is not None and self._proc.poll() is None

    # -- lifecycle --------------------------------------------------------

    def start(self) -> None:
        """Launch the server and return only once it answers PING.

        Raises RedisStartError (with the log tail) if it exits or stays silent
        past the start-up timeout; the child is killed first so a failed start
        never leaves a process behind.
        """
        if self._closed:
            raise RedisProcessError("this RedisProcess has been closed")
        if self.is_running:
            raise RedisProcessError(f"redis-server already running on port {self.port}")
        self._reap()
        retry_ports = not self._port_explicit and not self._started_once
        attempts = _AUTO_PORT_ATTEMPTS if retry_ports else 1
        for attempt in range(1, attempts + 1):
            if self._port is None or (retry_ports and attempt > 1):
                self._port = free_port()
            try:
                self._launch_and_wait()
            except RedisStartError:
                if attempt == attempts:
                    raise
                continue
            self._started_once = True
            return

    def stop(self, timeout: float = 10.0) -> None:
        """Shut down gracefully (SIGTERM), escalating to SIGKILL after ``timeout``.

        SIGTERM lets Redis flush the AOF, which is what a clean restart test
        wants. A paused server is continued first, otherwise it could not act
        on the SIGTERM and we would always fall through to SIGKILL.
        """
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            if self._paused:
                self._signal(signal.SIGCONT)
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                proc.wait()
        self._reap()

    def kill(self) -> None:
        """SIGKILL the server, as a crash would: no AOF rewrite, no goodbye to clients."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait()
        self._reap()

    def pause(self) -> None:
        """SIGSTOP the server to simulate a hung node: TCP connects, nothing answers."""
        self._require_running()
        self._signal(signal.SIGSTOP)
        self._paused = True

    def resume(self) -> None:
        """SIGCONT a paused server; queued commands are then processed in order."""
        self._require_running()
        self._signal(signal.SIGCONT)
        self._paused = False

    def restart(self) -> None:
        """Graceful stop, then start on the same port and dir so AOF data reloads."""
        self.stop()
        self.start()

    def close(self) -> None:
        """Stop the server and delete its directory; the object is unusable afterwards."""
        if self._closed:
            return
        try:
            self.stop()
        finally:
            self._closed = True
            shutil.rmtree(self._dir, ignore_errors=True)
            _unclosed_dirs.discard(self._dir)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "running" if self.is_running else "stopped"
        if self._paused and self.is_running:
            state = "paused"
        return f"<RedisProcess port={self._port} dir={self._dir} {state}>"

    # -- internals --------------------------------------------------------

    def _command(self) -> list[str]:
        return [
            self._executable,
            "--port",
            str(self.port),
            "--bind",
            _HOST,
            "--dir",
            str(self._dir),
            "--save",
            "",
            "--appendonly",
            "yes" if self._appendonly else "no",
            "--appendfsync",
            self._appendfsync,
            "--logfile",
            str(self.log_path),
            "--daemonize",
            "no",
            *self._extra_args,
        ]

    def _launch_and_wait(self) -> None:
        proc = subprocess.Popen(
            self._command(),
            cwd=self._dir,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self._proc = proc
        self._paused = False
        _live.add(proc)
        try:
            self._wait_for_ping(proc)
        except BaseException:
            # Also on KeyboardInterrupt: never leave a half-started child.
            self.kill()
            raise

    def _wait_for_ping(self, proc: subprocess.Popen[bytes]) -> None:
        deadline = time.monotonic() + self._startup_timeout
        client = redis.Redis(
            host=_HOST,
            port=self.port,
            socket_timeout=0.5,
            socket_connect_timeout=0.5,
        )
        try:
            while True:
                code = proc.poll()
                if code is not None:
                    raise RedisStartError(
                        f"redis-server exited with code {code} during start-up on port "
                        f"{self.port}.{self._log_tail()}"
                    )
                with contextlib.suppress(redis.ConnectionError, redis.TimeoutError):
                    # BusyLoadingError (AOF still loading) is a ConnectionError,
                    # so "answers PING" also means "data is fully loaded". The
                    # PID check stops a different server that already holds the
                    # port from passing for ours while ours fails to bind.
                    if client.ping() and client.info("server")["process_id"] == proc.pid:
                        return
                if time.monotonic() >= deadline:
                    raise RedisStartError(
                        f"redis-server on port {self.port} did not answer PING within "
                        f"{self._startup_timeout:.1f}s.{self._log_tail()}"
                    )
                time.sleep(0.02)
        finally:
            client.close()

    def _log_tail(self, max_chars: int = 2000) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return " (no server log)"
        return f"\n--- tail of {self.log_path} ---\n{text[-max_chars:]}"

    def _signal(self, sig: signal.Signals) -> None:
        if self._proc is not None:
            with contextlib.suppress(ProcessLookupError):
                self._proc.send_signal(sig)

    def _require_running(self) -> None:
        if not self.is_running:
            raise RedisProcessError("redis-server is not running")

    def _reap(self) -> None:
        """Forget an exited child, so the next start() spawns a fresh one."""
        proc = self._proc
        if proc is not None and proc.poll() is not None:
            _live.discard(proc)
            self._proc = None
            self._paused = False
