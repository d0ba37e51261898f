"""The strategies a worker may run, by name. Workers run only what is registered here,
whatever a queue entry says; ``--import MODULE`` adds a user's own."""

from __future__ import annotations

import importlib
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from coordinator.errors import UnknownStrategy

StrategyFn = Callable[..., Awaitable[Any]]
F = TypeVar("F", bound=StrategyFn)

_CATALOG: dict[str, StrategyFn] = {}


def strategy(name: str) -> Callable[[F], F]:
    """Register ``async def f(ctx, **input)`` under ``name``."""
    if not isinstance(name, str) or not name:
        raise ValueError("a strategy needs a non-empty name")

    def register(fn: F) -> F:
        existing = _CATALOG.get(name)
        if existing is not None and existing is not fn and _qualname(existing) != _qualname(fn):
            raise ValueError(f"strategy {name!r} is already registered by {_qualname(existing)}")
        _CATALOG[name] = fn
        return fn

    return register


def _qualname(fn: StrategyFn) -> str:
    return f"{fn.__module__}.{getattr(fn, '__qualname__', repr(fn))}"


def get(name: str) -> StrategyFn:
    fn = _CATALOG.get(name)
    if fn is None:
        raise UnknownStrategy(
            f"strategy {name!r} is not registered in this worker; known: {', '.join(names())}"
        )
    return fn


def names() -> list[str]:
    return sorted(_CATALOG)


def load(modules: list[str]) -> None:
    """Import the built-ins and each user module (whose @strategy decorators register)."""
    importlib.import_module("workers.builtin")
    for module in modules:
        importlib.import_module(module)

