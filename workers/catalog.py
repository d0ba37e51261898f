"""The strategies a worker may run, by name. Workers run only what is registered here,
whatever a queue entry says; ``--import MODULE`` adds a user's own.

Each worker publishes what it offers (``describe``: a description and the input parameters,
read from each function's docstring and signature) so hosts can list strategies and the
workers can route a session to one that has its strategy (``workers.routing``)."""

from __future__ import annotations

import importlib
import inspect
import json
import os
import sys
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


def has(name: str) -> bool:
    """Whether this process can run ``name`` (a dict lookup: the step asks it for every
    session it rebuilds)."""
    return name in _CATALOG


def describe() -> dict[str, dict[str, Any]]:
    """Name -> ``{"description", "params"}`` for every registered strategy: what a host
    needs to start one (``SessionRegistry.strategies`` serves it)."""
    return {name: describe_one(_CATALOG[name]) for name in names()}


def describe_one(fn: StrategyFn) -> dict[str, Any]:
    """The first paragraph of ``fn``'s docstring, and its input parameters: each with
    ``name``, ``required``, ``default`` (JSON, or None) and ``annotation`` (text, or None).
    The context and catch-all ``**kwargs`` are no input of the strategy's."""
    doc = inspect.getdoc(fn) or ""
    description = " ".join(doc.split("\n\n")[0].split())
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):  # a callable inspect cannot read: say nothing of it
        return {"description": description, "params": []}
    params = []
    for n, p in enumerate(signature.parameters.values()):
        if n == 0 or p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL):
            continue  # the first is the Context the worker passes
        required = p.default is p.empty
        params.append({"name": p.name, "required": required,
                       "default": None if required else _json_or_none(p.default),
                       "annotation": _annotation(p.annotation)})
    return {"description": description, "params": params}


def _json_or_none(value: Any) -> Any:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return None
    return value


def _annotation(annotation: Any) -> str | None:
    if annotation is inspect.Parameter.empty:
        return None
    if isinstance(annotation, str):  # postponed annotations (from __future__ import ...)
        return annotation
    return inspect.formatannotation(annotation)


def load(modules: list[str]) -> None:
    """Import the built-ins and each user module (whose @strategy decorators register).
    Modules are also looked for in the current directory, last: ``coordinator worker
    --import my_strategies`` run where ``my_strategies.py`` is must find it, as ``python -m``
    would (the console script's path has only its own directory and site-packages)."""
    importlib.import_module("workers.builtin")
    if modules and os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())
    for module in modules:
        importlib.import_module(module)

