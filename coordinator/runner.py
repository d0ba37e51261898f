"""``coordinator run``: the host loop, driving one session to its end from a terminal.

It starts the session, answers each round's queries through a responder (``parallel`` at a
time, each answer fed as it comes), and shows the session's progress and logs through a
``RunView``. It never leaves a session silently: Ctrl-C or SIGTERM (at a prompt or while it
waits) and a responder that cannot answer cancel the session and print it, or with
``leave_paused`` print the exact commands that pick it up; the session's id is printed the
moment it exists, and every error printed names it.

Signals are handled on the event loop (``loop.add_signal_handler``), not as
``KeyboardInterrupt``: the handler cancels the step in progress, so the cancellation that
follows runs on the same loop, within Redis's bound, and itself answers a second Ctrl-C.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shlex
import signal
import sys
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any

from .console import RunView
from .errors import InvalidTransition, ResponderFailed, SessionError
from .models import FeedResult, Finished, LlmQuery, Paused
from .registry import SessionRegistry
from .responders import Responder
from .states import Phase

#: The exit code of a command stopped by Ctrl-C (as a shell reports it).
INTERRUPTED = 128 + signal.SIGINT


def emit(obj: Any) -> None:
    """JSON for programs, on stdout."""
    print(json.dumps(obj, ensure_ascii=False, indent=2), flush=True)


def event_json(sid: str, res: FeedResult) -> dict[str, Any]:
    """What the CLI prints for an event: algocline's shape, with ``session_id`` first."""
    return {"session_id": sid, **res.to_json(sid)}


def error_json(exc: SessionError, session_id: str | None) -> dict[str, object]:
    """The error's JSON, naming the session it is about whenever the caller knows it."""
    if exc.session_id is None and session_id:
        exc.session_id = session_id
    return exc.to_json()


def outcome(res: FeedResult) -> int:
    """The exit code of an event: 1 for a session that ended failed or cancelled, else 0."""
    return 1 if isinstance(res, Finished) and res.state is not Phase.COMPLETED else 0


@dataclass(frozen=True, slots=True)
class RunOptions:
    strategy: str
    timeout: float | None = None
    #: The session's idle ttl (seconds; None: the deployment's) and the start's
    #: idempotency key (a second run with the same key drives the same session).
    ttl: float | None = None
    idempotency_key: str | None = None
    #: On a signal or a failed responder, leave the session rather than cancel it.
    leave_paused: bool = False
    #: The connection flags as given (``--redis URL --namespace NS``), repeated in the
    #: commands printed to pick a session up.
    connection: tuple[str, ...] = ()


class HostRun:
    """One ``coordinator run``: drives the session, and never leaves it silently. A signal
    (Ctrl-C, SIGTERM) or a failing responder cancels it, or with ``--leave-paused`` leaves
    it and prints the commands that pick it up; every error printed names it."""

    def __init__(self, reg: SessionRegistry, options: RunOptions, view: RunView,
                 responder: Responder) -> None:
        self.reg, self.options, self.view, self.responder = reg, options, view, responder
        self.sid: str | None = None
        self._signal: int | None = None
        self._signals = 0
        self._current: asyncio.Task[int] | None = None

    async def run(self, data: dict[str, Any], budget: dict[str, int] | None) -> int:
        """The exit code: the session's outcome, 1 after a failed responder, 128 + the
        signal's number after a signal. A ``SessionError`` propagates, the way back to the
        session printed first."""
        loop = asyncio.get_running_loop()
        handled = []
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.add_signal_handler(sig, self._on_signal, sig)  # main thread only
                handled.append(sig)
        try:
            return await self._run(data, budget)
        except SessionError:
            self._carries_on()
            raise
        finally:
            self.view.close()
            for sig in handled:
                loop.remove_signal_handler(sig)

    async def _run(self, data: dict[str, Any], budget: dict[str, int] | None) -> int:
        try:
            code = await self._step(self._drive(data, budget))
        except ResponderFailed as exc:
            code = await self._step(self._end(exc))
        else:
            if code is None:  # signalled: end the session, itself interruptible
                code = await self._step(self._end(None))
        if code is None:  # a second signal stopped the ending
            self.view.console.print(
                f"stopped before the session was cancelled; cancel it with: "
                f"{self._command('cancel')}", markup=False, highlight=False)
            code = 128 + (self._signal or signal.SIGINT)
        return code

    def _on_signal(self, sig: int) -> None:
        self._signal = sig
        self._signals += 1
        if self._current is not None:
            self._current.cancel()

    async def _step(self, work: Coroutine[Any, Any, int]) -> int | None:
        """Run ``work`` as the task a signal cancels: its result, or None once signalled.
        A signal wins a race with an error (a responder command killed by the same Ctrl-C
        may fail before the signal's handler runs)."""
        seen = self._signals
        task = asyncio.ensure_future(work)
        self._current = task
        try:
            await asyncio.wait({task})
        except asyncio.CancelledError:
            task.cancel()
            raise
        finally:
            self._current = None
        if task.cancelled():
            return None
        if self._signals > seen and task.exception() is not None:
            return None
        return task.result()

    # -- the session ---------------------------------------------------------------------

    async def _drive(self, data: dict[str, Any], budget: dict[str, int] | None) -> int:
        sid, res = await self.reg.start_execution(
            self.options.strategy, data, budget=budget, ttl=self.options.ttl,
            idempotency_key=self.options.idempotency_key, timeout=self.options.timeout,
            on_created=self._created)
        while not isinstance(res, Finished):
            if isinstance(res, Paused):
                await self._refresh()
                res = await self._answer_round(sid, res)
            else:  # Accepted: another host holds the rest of the round's answers
                res = await self.reg.wait_event(sid, timeout=self.options.timeout)
        await self._refresh()
        self.view.close()
        emit(event_json(sid, res))
        return outcome(res)

    def _created(self, sid: str) -> None:
        self.sid = sid
        self.view.session(sid, self.options.strategy)
        self.view.waiting()

    async def _answer_round(self, sid: str, paused: Paused) -> FeedResult:
        """Ask the responder every query of the round, ``parallel`` at a time, and feed
        each answer as it comes."""
        gate = asyncio.Semaphore(self.responder.parallel)

        async def ask(q: LlmQuery) -> tuple[LlmQuery, str]:
            async with gate:
                return q, await self.responder.answer(q)

        asking = [asyncio.ensure_future(ask(q)) for q in paused.queries]
        res: FeedResult = paused
        try:
            for left, next_answer in enumerate(asyncio.as_completed(asking), 1 - len(asking)):
                q, answer = await next_answer
                if not self.responder.interactive:
                    self.view.answered(q, answer)
                if not left:
                    self.view.waiting()  # the last answer: the session runs next
                res = await self.reg.feed_response(sid, q.id, answer, round=paused.round or None,
                                                   timeout=self.options.timeout)
        finally:
            for task in asking:
                task.cancel()
            await asyncio.gather(*asking, return_exceptions=True)
        return res

    async def _refresh(self) -> None:
        """Show the session's new progress and logs. A worker writes them with each step's
        commit, so a look at each event shows every one as it comes. A failed look shows
        nothing (the run's own calls report trouble with Redis)."""
        if self.sid is not None and not self.view.quiet:
            with contextlib.suppress(SessionError):
                self.view.update((await self.reg.status(self.sid)).get("metrics") or {})

    # -- ending it when the run cannot go on -------------------------------------------

    async def _end(self, why: ResponderFailed | None) -> int:
        """After a signal (``why`` None) or a failed responder: cancel the session and print
        it, or with ``--leave-paused`` print how to pick it up."""
        code = 1 if why is not None else 128 + (self._signal or signal.SIGINT)
        self.view.close()
        if self.sid is None:
            print(json.dumps({"status": "error", "type": "interrupted",
                              "error": "interrupted before the session was created"}),
                  file=sys.stderr)
            return code
        if self.options.leave_paused:
            await self._leave(why)
            return code
        try:
            res: FeedResult = await self.reg.cancel(self.sid)
        except InvalidTransition:  # it ended meanwhile: show how
            res = await self.reg.wait_event(self.sid, timeout=0)
        if why is not None:
            print(json.dumps(error_json(why, self.sid)), file=sys.stderr)
        emit(event_json(self.sid, res))
        return code

    def _carries_on(self) -> None:
        """The run stops on an error (Redis away, a wait that ran out): the session, if any,
        carries on without it; say how to get back to it."""
        if self.sid is not None:
            self.view.close()
            self.view.console.print(
                f"session {self.sid} carries on without this run; re-attach with "
                f"{self._command('wait')}, or end it with {self._command('cancel')}",
                markup=False, highlight=False)

    async def _leave(self, why: ResponderFailed | None) -> None:
        """Print (for people, then as the error's JSON) the commands that pick the session
        up: its queries still pending as Redis has them, whatever this run fed."""
        try:
            snap = await self.reg.status(self.sid or "", pending_filter="meta")
        except SessionError:
            snap = {}
        state = str(snap.get("phase", "running"))
        commands = [self._command("wait")]
        commands += [self._command("continue", "--query-id", str(p["query_id"]), "ANSWER")
                     for p in snap.get("pending") or ()]
        commands.append(self._command("cancel"))
        self.view.console.print(
            f"session {self.sid} is left {state}; pick it up with:\n"
            + "\n".join(f"  {c}" for c in commands), markup=False, highlight=False)
        body = error_json(why, self.sid) if why is not None else {
            "status": "error", "type": "interrupted", "session_id": self.sid,
            "error": f"interrupted; session {self.sid} is left {state}"}
        print(json.dumps({**body, "left": state, "resume": commands}), file=sys.stderr)

    def _command(self, name: str, *extra: str) -> str:
        """The exact command that acts on the session, with the connection as given."""
        return shlex.join(["coordinator", name, self.sid or "SESSION_ID",
                           *self.options.connection, *extra])
