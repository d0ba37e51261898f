"""Distributed coordinator for pausable strategy executions, on Redis.

A session runs a strategy that asks questions (``await ctx.llm(...)``); each ask pauses it
until the host answers by query id; ``SessionRegistry`` is the host's API.
"""

from .errors import (
    AlreadyResponded,
    BudgetExceeded,
    CorruptState,
    InvalidInput,
    InvalidTransition,
    LockError,
    LockLost,
    LockOrderError,
    LockTimeout,
    Misconfigured,
    NonDeterminism,
    NoPendingQuery,
    NotFound,
    NotReplicated,
    PayloadTooLarge,
    SessionError,
    StaleRound,
    StepTimeout,
    Unavailable,
    UnknownQuery,
    UnknownStrategy,
    WaitTimeout,
)
from .models import Accepted, FeedResult, Finished, LlmQuery, Paused, PendingFilter, QueryId
from .registry import SessionRegistry
from .settings import Settings
from .states import Phase

__all__ = [
    "Accepted",
    "AlreadyResponded",
    "BudgetExceeded",
    "CorruptState",
    "FeedResult",
    "Finished",
    "InvalidInput",
    "InvalidTransition",
    "LlmQuery",
    "LockError",
    "LockLost",
    "LockOrderError",
    "LockTimeout",
    "Misconfigured",
    "NoPendingQuery",
    "NonDeterminism",
    "NotFound",
    "NotReplicated",
    "Paused",
    "PayloadTooLarge",
    "PendingFilter",
    "Phase",
    "QueryId",
    "SessionError",
    "SessionRegistry",
    "Settings",
    "StaleRound",
    "StepTimeout",
    "Unavailable",
    "UnknownQuery",
    "UnknownStrategy",
    "WaitTimeout",
]
