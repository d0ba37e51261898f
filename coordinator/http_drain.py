"""Event streams end by themselves when ``coordinator serve`` stops.

uvicorn's graceful shutdown waits for open responses, and an event stream is open for as
long as its client wants: the console's namespace stream never ends, and a session's ends
only with the session, which may wait hours for a person. Left alone, every stop would run
into the grace period and end in uvicorn's cancellation and its traceback. So on SIGTERM or
SIGINT the streams are told (``Drain``): the namespace stream ends at once (a client
reconnects, to another API process or to this one restarted, and reads fresh counts); a
session's stream may still deliver the session's end, up to a second before the grace runs
out, then ends too (its client resumes with ``Last-Event-ID`` and misses nothing). Either
way the response ends cleanly, so the process exits as soon as the last one has.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from types import FrameType
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    import uvicorn

#: How long before the grace runs out a session's stream ends (it must finish sending).
MARGIN_S: Final = 1.0


class Drain:
    """Whether the server is stopping, and until when a stream may still run."""

    def __init__(self, grace_s: float) -> None:
        self.grace_s = grace_s
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._deadline: float | None = None

    def bind(self) -> None:
        """Called on the server's loop before it serves (the event belongs to that loop)."""
        self._loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()

    def begin(self) -> None:
        """The stop was asked for. Safe from a signal handler: the event is set by the loop."""
        if self._loop is None or self._stopping is None or self._deadline is not None:
            return
        self._deadline = time.monotonic() + max(0.0, self.grace_s - MARGIN_S)
        self._loop.call_soon_threadsafe(self._stopping.set)

    async def _until(self, at_once: bool) -> None:
        """Returns when a stream of this kind must end (never while the server runs)."""
        assert self._stopping is not None
        await self._stopping.wait()
        if not at_once and self._deadline is not None:
            await asyncio.sleep(max(0.0, self._deadline - time.monotonic()))

    async def bounded(self, stream: AsyncIterator[str], *, at_once: bool) -> AsyncIterator[str]:
        """``stream``'s frames until it ends or the stop says it must (``at_once``: as soon
        as the stop begins; else near the grace's end)."""
        if self._stopping is None:  # not under ``serve`` (tests' in-process apps)
            async for frame in stream:
                yield frame
            return
        stop = asyncio.ensure_future(self._until(at_once))
        try:
            while True:
                step = asyncio.ensure_future(anext(stream))
                await asyncio.wait({step, stop}, return_when=asyncio.FIRST_COMPLETED)
                if not step.done():  # the stop came first: the stream's own finally runs
                    step.cancel()
                    with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration):
                        await step
                    return
                try:
                    frame = step.result()
                except StopAsyncIteration:
                    return
                yield frame
        finally:
            stop.cancel()
            aclose = getattr(stream, "aclose", None)
            if aclose is not None:
                await aclose()


def server(config: uvicorn.Config, drain: Drain) -> uvicorn.Server:
    """A uvicorn server that tells ``drain`` when a signal asks it to stop (before its own
    shutdown starts waiting for open responses)."""
    import uvicorn

    class _Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            drain.begin()
            super().handle_exit(sig, frame)

    return _Server(config)
