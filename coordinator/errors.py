"""One exception tree for everything a caller of the coordinator can catch.

::

    SessionError                      base: catch this to catch them all
    ├── NotFound                      no such session (never existed, or its retention ran out)
    ├── UnknownQuery                  query id not in the pending batch
    ├── AlreadyResponded              query id answered already in this round
    ├── StaleRound                    the answer was given for a round the session is not at
    ├── NoPendingQuery                no sole query to answer: none asked yet, or several
    ├── InvalidTransition             the session is not in a state that allows the call
    ├── IdempotencyConflict           an idempotency key already started another session
    ├── WaitTimeout                   a bounded wait ran out; the session carries on
    ├── InvalidInput                  caller data rejected before it reached Redis
    │   └── PayloadTooLarge           over the configured byte limit
    ├── UnknownStrategy               no strategy registered under that name
    ├── NoWorker                      no live worker offers the strategy (start one)
    ├── ResponderFailed               `coordinator run`'s responder gave no answer
    ├── NonDeterminism                a replay asked different questions than the journal
    ├── BudgetExceeded                a strategy went over its calls / tokens / time budget
    ├── StepTimeout                   a strategy step ran longer than the step timeout
    ├── CorruptState                  bytes in Redis that do not decode as we wrote them
    ├── Unavailable                   Redis did not answer within the call's bound (retry later)
    │   └── NotReplicated             applied on the primary, not confirmed by enough replicas
    ├── Misconfigured                 Redis refused us: bad credentials, no such database, ...
    └── LockError                     lock trouble
        ├── LockTimeout               the lock could not be had within its bounded wait
        ├── LockOrderError            registry lock C requested while holding a session lock A
        └── LockLost                  a release or renewal found the lease taken over

Every error carries the structured fields that apply (``session_id``, ``query_id``,
``state``) so callers can act without parsing messages, and ``code``, a stable
snake-case name that the JSON fronts put on the wire. Each class also says what it means on
the other fronts, so one error reads the same everywhere: ``http_status`` (the HTTP API) and
``exit_code`` (the CLI). ``vocabulary()`` is that table (the README prints it).

A session that *fails* is not an exception but an outcome: its ``error_type`` is one of
``FAILURE_TYPES``, on the wire as ``{"status": "error", "error": ..., "type": ...}``.
"""

from __future__ import annotations


class SessionError(Exception):
    """Base of every error the coordinator raises on purpose."""

    code = "session_error"
    http_status = 400
    #: 2: the call was refused (fix the call); 3: the target is not there; 4: try again later;
    #: 5: the deployment needs fixing. 1 is a session that ended failed or cancelled.
    exit_code = 2

    def __init__(
        self,
        message: str,
        *,
        session_id: str | None = None,
        query_id: str | None = None,
        state: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.session_id = session_id
        self.query_id = query_id
        self.state = state

    def to_json(self) -> dict[str, object]:
        out: dict[str, object] = {"status": "error", "error": self.message, "type": self.code}
        if self.session_id is not None:
            out["session_id"] = self.session_id
        if self.query_id is not None:
            out["query_id"] = self.query_id
        if self.state is not None:
            out["state"] = self.state
        return out


class NotFound(SessionError):
    code = "not_found"
    http_status = 404
    exit_code = 3


class UnknownQuery(SessionError):
    code = "unknown_query"
    http_status = 422
    exit_code = 2


class AlreadyResponded(SessionError):
    code = "already_responded"
    http_status = 409
    exit_code = 2


class StaleRound(SessionError):
    """The answer names a query of a round the session is no longer (or not yet) at: another
    caller answered that round, or a Redis failover rolled the session back to an earlier
    pause. ``q-0`` recurs every round, so applying it would answer the wrong question. Re-read
    the session (``wait_event``) and answer the queries it shows; ``state`` holds the round
    the session is at, as ``round <n>``."""

    code = "stale_round"
    http_status = 409
    exit_code = 2


class NoPendingQuery(SessionError):
    code = "no_pending_query"
    http_status = 422
    exit_code = 2


class InvalidTransition(SessionError):
    code = "invalid_transition"
    http_status = 409
    exit_code = 2


class IdempotencyConflict(SessionError):
    """The idempotency key given with a start was used, within the retention, for a start of
    another strategy or input: a retry must send the same request. ``session_id`` is the
    session the key started."""

    code = "idempotency_conflict"
    http_status = 409
    exit_code = 2


class WaitTimeout(SessionError):
    code = "wait_timeout"
    http_status = 504
    exit_code = 4


class InvalidInput(SessionError):
    code = "invalid_input"
    http_status = 422
    exit_code = 2


class PayloadTooLarge(InvalidInput):
    code = "payload_too_large"
    http_status = 413
    exit_code = 2


class UnknownStrategy(SessionError):
    code = "unknown_strategy"
    http_status = 422
    exit_code = 2


class NoWorker(SessionError):
    """No live worker offers the strategy, so a session of it would only wait: start a worker
    whose ``--import`` registers it (``coordinator strategies`` lists what live workers
    offer). ``submit`` still queues such a session, for a worker about to start."""

    code = "no_worker"
    http_status = 503
    exit_code = 4


class ResponderFailed(SessionError):
    """The responder gave no answer: its command failed or timed out, or the terminal's
    input ended. The session itself is sound; ``run`` cancels it (or, with
    ``--leave-paused``, leaves it paused for ``coordinator continue``)."""

    code = "responder_failed"
    http_status = 502
    exit_code = 1


class NonDeterminism(SessionError):
    code = "non_determinism"
    http_status = 500
    exit_code = 5


class BudgetExceeded(SessionError):
    code = "budget_exceeded"
    http_status = 422
    exit_code = 2


class StepTimeout(SessionError):
    code = "step_timeout"
    http_status = 504
    exit_code = 4


class CorruptState(SessionError):
    code = "corrupt_state"
    http_status = 500
    exit_code = 5


class Unavailable(SessionError):
    """Redis could not be reached, or did not answer, within the call's bound. A write is
    never half-done (each is one atomic script), but one sent to a server that froze may
    still be applied when it resumes: re-read the session (``status``/``wait_event``) before
    repeating a write. ``url`` has its password masked; ``cause`` says what the last attempt
    met."""

    code = "unavailable"
    http_status = 503
    exit_code = 4

    def __init__(self, message: str, *, url: str = "", cause: str = "",
                 session_id: str | None = None) -> None:
        super().__init__(message, session_id=session_id)
        self.url = url
        self.cause = cause

    def to_json(self) -> dict[str, object]:
        out = super().to_json()
        if self.url:
            out["redis"] = self.url
        return out


class NotReplicated(Unavailable):
    """The write was applied on the primary but fewer replicas than ``wait_replicas``
    confirmed it in time, so a failover now could still lose it. Re-read the session
    (``wait_event``/``status``) and repeat what is missing: every write recognises its own
    repetition or is refused as already done."""

    code = "not_replicated"
    http_status = 503
    exit_code = 4


class Misconfigured(SessionError):
    """Redis answered, but refused this client: wrong credentials, a database that does not
    exist, a server that is not what the URL says. Retrying does not help; the message says
    what to fix."""

    code = "misconfigured"
    http_status = 500
    exit_code = 5


class LockError(SessionError):
    code = "lock_error"
    http_status = 500
    exit_code = 5


class LockTimeout(LockError):
    code = "lock_timeout"
    http_status = 503
    exit_code = 4


class LockOrderError(LockError):
    code = "lock_order"
    http_status = 500
    exit_code = 5


class LockLost(LockError):
    """The lease ran out (its holder stalled) and another holder may have the lock now;
    whatever the stale holder still writes is refused by the fence."""

    code = "lock_lost"
    http_status = 500
    exit_code = 5


#: What a failed session's ``error_type`` says happened (``Finished.error_type``).
FAILURE_TYPES: dict[str, str] = {
    "strategy_error": "the strategy raised an exception (its traceback is kept)",
    "budget_exceeded": "the strategy went over its llm_calls, tokens or elapsed_ms budget",
    "non_determinism": "a replay asked other questions than the journal recorded",
    "step_timeout": "a step neither asked nor returned within step_timeout_s",
    "expired": "the session idled past its ttl waiting for its host",
    "deadline": "a query's deadline passed unanswered, and it had no default answer",
    "worker_lost": "its step failed max_attempts times: the worker died or stalled mid-step",
    "worker_error": "its step failed max_attempts times with an error in the worker",
    "corrupt_state": "its state in Redis could not be read as written",
    "unknown_strategy": "no live worker offers the session's strategy",
    "invalid_input": "the strategy refused its input",
    "invalid_result": "the strategy returned a value that cannot be stored (not JSON, too large)",
}


def vocabulary() -> list[tuple[str, str, int, int]]:
    """Every error type: (code, meaning, CLI exit code, HTTP status), in the order of the tree
    above, whose one-line meanings it reuses: the docs print this, so they cannot drift."""
    meanings: dict[str, str] = {}
    for line in (__doc__ or "").splitlines():
        parts = line.replace("│", " ").replace("├──", " ").replace("└──", " ").split(None, 1)
        if len(parts) == 2 and parts[0].isidentifier() and parts[0][0].isupper():
            meanings[parts[0]] = " ".join(parts[1].split())
    rows: list[tuple[str, str, int, int]] = []
    seen: set[str] = set()
    stack: list[type[SessionError]] = [SessionError]
    while stack:
        cls = stack.pop(0)
        if cls.code not in seen and cls.__name__ in meanings:
            seen.add(cls.code)
            rows.append((cls.code, meanings[cls.__name__], cls.exit_code, cls.http_status))
        stack = cls.__subclasses__() + stack
    return rows
