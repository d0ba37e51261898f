"""MCP progress notifications and ``notifications/cancelled`` for the session tools.

As algocline 0.35 does: a tool call that carries ``_meta.progressToken`` hears, as MCP
``notifications/progress`` while it waits, what the session does (its new log lines, its
progress, then the pause or the end it waited for), and a ``notifications/cancelled`` for an
``alc_run`` / ``alc_continue`` still waiting cancels the session it waits on (upstream keeps
the same request-id-to-session map, ``req_registry.rs``).

**What is reported when.** A worker writes a session's log lines and progress with the
commit that also writes its next pause or end, so they are read, and reported in the order
the strategy made them, when the wait ends, before the tool's result. While the wait lasts,
a notification every ``every_s`` says the session is still running; besides telling the
person, it keeps a host that restarts its request timeout on progress
(``resetTimeoutOnProgress``) from giving up on a long step.

**The numbers.** MCP wants each notification's ``progress`` larger than the last. It is the
strategy's ``step`` and ``total`` when the strategy reports progress; the k-th further
notification at the same step adds ``1 - 2**-k`` (below one, so the next step is still
larger). Beyond the strategy's total the total is left out, and the end's notification
carries ``total == progress``: done. Before any progress is known, the steps count from 0
and there is no total.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from mcp.server.context import CallNext, HandlerResult, ServerRequestContext
from mcp.server.mcpserver import Context

from . import fronts
from .errors import SessionError
from .registry import SessionRegistry

#: Seconds between "still running" notifications while a call waits.
EVERY_S = 10.0
#: Calls whose sessions a cancel may name at once: far more than one host has in flight.
_IN_FLIGHT_MAX = 10_000


def progress_token(mcp: Context[Any, Any]) -> str | int | None:
    """The request's ``_meta.progressToken`` (None: the caller wants no progress)."""
    params = mcp.request_context.params or {}
    meta = params.get("_meta") if isinstance(params, dict) else None
    token = meta.get("progressToken") if isinstance(meta, dict) else None
    return token if isinstance(token, str | int) and not isinstance(token, bool) else None


class Reporter:
    """The progress notifications of one tool call (a no-op without a progress token)."""

    def __init__(self, mcp: Context[Any, Any], reg: SessionRegistry, *,
                 every_s: float = EVERY_S) -> None:
        self.mcp, self.reg, self.every_s = mcp, reg, every_s
        self.on = progress_token(mcp) is not None
        self._seq = 0  # the last log entry reported
        self._progress: dict[str, Any] | None = None  # the last progress reported
        self._step, self._extra = 0.0, 0
        self._total: float | None = None
        self._last = -1.0
        self._announce: str | None = None
        self._news = asyncio.Event()

    async def prime(self, sid: str) -> None:
        """Start from what the session shows now: only what it does during this call is
        news (a continue's reporter must not repeat the earlier rounds' logs)."""
        if not self.on:
            return
        snap = await self._look(sid)
        if snap is not None:
            self._seq = max((e["seq"] for e in _logs(snap)), default=0)
            self._note_progress(snap.get("metrics", {}).get("progress"))

    def started(self, sid: str, strategy: str) -> None:
        """The session exists (called as soon as it is queued, from a plain callback): say
        so from the waiting task at once, or before the result if the wait is shorter."""
        if self.on:
            self._announce = f"session {sid} started ({strategy})"
            self._news.set()

    @contextlib.asynccontextmanager
    async def waiting(self, sid: Callable[[], str | None]) -> AsyncIterator[None]:
        """While the body waits on the session ``sid()`` names (None: not created yet),
        say every ``every_s`` that it still runs."""
        if not self.on:
            yield
            return
        task = asyncio.ensure_future(self._tick(sid))
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _tick(self, sid: Callable[[], str | None]) -> None:
        while True:
            try:
                await asyncio.wait_for(self._news.wait(), self.every_s)
            except TimeoutError:
                current = sid()
                if current is not None:
                    await self._send(f"session {current} is running")
                continue
            self._news.clear()
            await self._flush()

    async def _flush(self) -> None:
        announce, self._announce = self._announce, None
        if announce is not None:
            await self._send(announce)

    async def settled(self, sid: str, out: dict[str, Any]) -> None:
        """The call's result is ``out``: report the session's new log lines and progress,
        then the pause or the end (or the answers still missing)."""
        if not self.on:
            return
        await self._flush()
        snap = await self._look(sid)
        if snap is not None:
            for entry in _logs(snap):
                if entry["seq"] > self._seq:
                    self._seq = entry["seq"]
                    await self._send(f"{entry.get('level', 'info')}: "
                                     f"{entry.get('message', '')}")
            progress = snap.get("metrics", {}).get("progress")
            if isinstance(progress, dict) and progress != self._progress:
                self._note_progress(progress)
                await self._send(_progress_text(progress))
        status = out.get("status")
        await self._send(_event_text(out), done=status in ("completed", "error", "cancelled"))

    def _note_progress(self, progress: Any) -> None:
        if not isinstance(progress, dict):
            return
        self._progress = progress
        step, total = progress.get("step"), progress.get("total")
        if isinstance(step, int) and step > self._step:
            self._step, self._extra = float(step), 0
        self._total = float(total) if isinstance(total, int) and total > 0 else None

    async def _send(self, message: str, *, done: bool = False) -> None:
        if not self.on:
            return
        value = self._step + (1 - 0.5 ** self._extra)
        self._extra += 1
        if value <= self._last:  # never reached: each value is above the last; kept as a guard
            value = self._last + 1
        self._last = value
        total = value if done else (self._total if self._total and value <= self._total
                                    else None)
        # A host that went away or does not take progress only loses the notification.
        with contextlib.suppress(Exception):
            await self.mcp.report_progress(value, total, message)

    async def _look(self, sid: str) -> dict[str, Any] | None:
        try:
            return await self.reg.status(sid)
        except SessionError:
            return None  # the result itself says what happened to the session


def _logs(snap: dict[str, Any]) -> list[dict[str, Any]]:
    entries = snap.get("metrics", {}).get("recent_logs") or ()
    out = [e for e in entries if isinstance(e, dict) and isinstance(e.get("seq"), int)
           and not isinstance(e.get("seq"), bool)]
    return sorted(out, key=lambda e: int(e["seq"]))


def _progress_text(progress: dict[str, Any]) -> str:
    head = f"step {progress.get('step')} of {progress.get('total')}"
    return f"{head}: {progress['message']}" if progress.get("message") else head


def _event_text(out: dict[str, Any]) -> str:
    status = out.get("status")
    if status == "needs_response":
        ids = [str(q.get("id")) for q in out["queries"]] if "queries" in out else \
            [str(out.get("query_id"))]
        return f"needs_response: {len(ids)} {'query' if len(ids) == 1 else 'queries'} " \
               f"to answer ({', '.join(ids)})"
    if status == "accepted":
        return f"accepted: {out.get('remaining')} answers of the round still missing"
    if status == "error":
        return f"error ({out.get('type', 'strategy_error')}): {out.get('error')}"
    return str(status)


class InFlight:
    """The sessions that waiting ``alc_run`` / ``alc_continue`` calls are about, by request
    id, and the server middleware that cancels one when its call is cancelled: the SDK
    cancels the call itself; this ends the session it was driving, as algocline does.

    An entry outlives a call that was cancelled (the notification is handled after the
    call has stopped) and is dropped when the cancel comes; the bound keeps entries of
    calls cancelled for other reasons (a connection closing) from piling up. Request ids
    are per connection, and ``coordinator mcp`` serves one connection (stdio)."""

    def __init__(self, reg: SessionRegistry) -> None:
        self.reg = reg
        self._sessions: dict[str, str] = {}

    def add(self, request_id: str, sid: str) -> None:
        if len(self._sessions) >= _IN_FLIGHT_MAX:
            self._sessions.pop(next(iter(self._sessions)))
        self._sessions[request_id] = sid

    def done(self, request_id: str) -> None:
        self._sessions.pop(request_id, None)

    async def run(self, request_id: str, sid: str | None,
                  work: Callable[[Callable[[str], None]], Awaitable[dict[str, Any]]]
                  ) -> dict[str, Any]:
        """``work(track)`` (``track(sid)`` names the session once it exists), with the
        call's session cancellable by ``notifications/cancelled`` while it runs."""
        if sid is not None:
            self.add(request_id, sid)
        try:
            out = await work(lambda new: self.add(request_id, new))
        except asyncio.CancelledError:
            raise  # the cancel's notification, handled after this, needs the entry
        except BaseException:
            self.done(request_id)
            raise
        self.done(request_id)
        return out

    async def __call__(self, ctx: ServerRequestContext[Any, Any],
                       call_next: CallNext) -> HandlerResult:
        result = await call_next(ctx)
        if ctx.method == "notifications/cancelled" and ctx.request_id is None:
            params = ctx.params or {}
            sid = self._sessions.pop(str(params.get("requestId")), None)
            if sid is not None:
                # Cancelled or already ended: either way, nothing more to do for the caller.
                with contextlib.suppress(SessionError):
                    await fronts.cancel(self.reg, sid)
        return result
