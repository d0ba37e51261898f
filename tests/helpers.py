"""Small test utilities shared by the test-suite.

``assert_eventually`` is the single sanctioned polling loop in the tests: every
other wait must be driven by an event (a future, a pub/sub message, a stream
entry). Keeping polling in one place keeps its timeout and error message
consistent and makes accidental sleep-based tests easy to grep for.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

__all__ = ["assert_eventually", "free_port"]


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago.

    The kernel picks the port (bind to 0), which avoids collisions between
    parallel test processes far better than a random choice would. The port is
    released before returning, so a small race remains; callers that can
    retry on "address in use" should do so.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def assert_eventually(
    predicate: Callable[[], Awaitable[object] | object],
    timeout: float = 10.0,
    interval: float = 0.02,
    message: str = "",
) -> None:
    """Await until ``predicate()`` is truthy, or fail the test after ``timeout`` seconds.

    The predicate may be sync or async so that tests can check either local
    state or Redis state without wrapping. Exceptions raised by the predicate
    propagate immediately: a crashing check is a bug in the test, not a
    "not yet". The predicate is always evaluated once more at the deadline so
    a slow event loop cannot turn a success into a spurious failure.
    """
    if timeout < 0:
        raise ValueError("timeout must be >= 0")
    if interval <= 0:
        raise ValueError("interval must be > 0")
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        result = predicate()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return
        remaining = deadline - loop.time()
        if remaining <= 0:
            detail = f": {message}" if message else ""
            raise AssertionError(
                f"condition not met within {timeout:.2f}s{detail} (last value: {result!r})"
            )
        await asyncio.sleep(min(interval, remaining))


class Gate:
    """Holds a strategy step at a known point: the step sets ``entered`` and awaits ``open``,
    so a test acts while the step is in flight without guessing with sleeps."""

    def __init__(self) -> None:
        self.entered = asyncio.Event()
        self.open = asyncio.Event()


#: Gates by name, for strategies defined in test modules (see the ``gates`` fixture).
GATES: dict[str, Gate] = {}


async def shard_keys(owner: Any, sid: str | None = None) -> Any:
    """The keys of ``sid``'s shard (or of the first shard) of a registry's or worker's
    namespace, once its shard table is read: what a test names a stream or index by."""
    shards = await owner.services.ready()
    return shards.of(sid) if sid is not None else shards.keys[0]


def line_of(path: Path, marker: str) -> int:
    """The line of ``path`` that ends with the comment ``# marker``: a test that checks a
    traceback's line numbers finds them, rather than hard-coding them."""
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        if line.rstrip().endswith(f"# {marker}"):
            return n
    raise AssertionError(f"no line of {path} is marked {marker!r}")


@contextlib.asynccontextmanager
async def offline_api(token: str | None = None) -> AsyncIterator[Any]:
    """The HTTP app over a Redis nobody listens on, through httpx's ASGI transport: for what
    the app must serve without ever reaching Redis (the docs, the console's files)."""
    import httpx

    from coordinator.http_api import create_app
    from coordinator.registry import SessionRegistry

    app = create_app(lambda: SessionRegistry.from_url("redis://127.0.0.1:1/0"), token)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                 base_url="http://api") as c:
        yield c
