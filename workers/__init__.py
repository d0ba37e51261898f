"""Worker side: the strategy API (``strategy``, ``Context``), the runtime and the worker."""

from .catalog import strategy
from .context import Context

__all__ = ["Context", "Worker", "strategy"]


def __getattr__(name: str) -> object:
    # The worker pulls in the whole coordinator; strategy modules need not pay for it.
    if name == "Worker":
        from .worker import Worker

        return Worker
    raise AttributeError(name)
