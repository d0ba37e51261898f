"""One exception tree for everything a caller of the coordinator can catch.

::

    SessionError                      base: catch this to catch them all
    ├── NotFound                      no such session (never existed, or its retention ran out)
    ├── UnknownQuery                  query id not in the pending batch
    ├── AlreadyResponded              query id answered already in this round
    ├── StaleRound                    the answer was given for a round the session is not at
    ├── NoPendingQuery                resolve_sole_pending_id with 0 or >1 pending queries
    ├── InvalidTransition             the session is not in a state that allows the call
    ├── WaitTimeout                   a bounded wait ran out; the session carries on
    ├── InvalidInput                  caller data rejected before it reached Redis
    │   └── PayloadTooLarge           over the configured byte limit
    ├── UnknownStrategy               no strategy registered under that name
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
snake-case name that the JSON fronts put on the wire.
"""

from __future__ import annotations


class SessionError(Exception):
    """Base of every error the coordinator raises on purpose."""

    code = "session_error"

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


class UnknownQuery(SessionError):
    code = "unknown_query"


class AlreadyResponded(SessionError):
    code = "already_responded"


class StaleRound(SessionError):
    """The answer names a query of a round the session is no longer (or not yet) at: another
    caller answered that round, or a Redis failover rolled the session back to an earlier
    pause. ``q-0`` recurs every round, so applying it would answer the wrong question. Re-read
    the session (``wait_event``) and answer the queries it shows; ``state`` holds the round
    the session is at, as ``round <n>``."""

    code = "stale_round"


class NoPendingQuery(SessionError):
    code = "no_pending_query"


class InvalidTransition(SessionError):
    code = "invalid_transition"


class WaitTimeout(SessionError):
    code = "wait_timeout"


class InvalidInput(SessionError):
    code = "invalid_input"


class PayloadTooLarge(InvalidInput):
    code = "payload_too_large"


class UnknownStrategy(SessionError):
    code = "unknown_strategy"


class NonDeterminism(SessionError):
    code = "non_determinism"


class BudgetExceeded(SessionError):
    code = "budget_exceeded"


class StepTimeout(SessionError):
    code = "step_timeout"


class CorruptState(SessionError):
    code = "corrupt_state"


class Unavailable(SessionError):
    """Redis could not be reached, or did not answer, within the call's bound. A write is
    never half-done (each is one atomic script), but one sent to a server that froze may
    still be applied when it resumes: re-read the session (``status``/``wait_event``) before
    repeating a write. ``url`` has its password masked; ``cause`` says what the last attempt
    met."""

    code = "unavailable"

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


class Misconfigured(SessionError):
    """Redis answered, but refused this client: wrong credentials, a database that does not
    exist, a server that is not what the URL says. Retrying does not help; the message says
    what to fix."""

    code = "misconfigured"


class LockError(SessionError):
    code = "lock_error"


class LockTimeout(LockError):
    code = "lock_timeout"


class LockOrderError(LockError):
    code = "lock_order"


class LockLost(LockError):
    """The lease ran out (its holder stalled) and another holder may have the lock now;
    whatever the stale holder still writes is refused by the fence."""

    code = "lock_lost"
