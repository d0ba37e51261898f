"""The embedded default: an in-process Redis (fakeredis) with in-process workers.

It lets ``coordinator run`` work on a machine with no Redis at all. Everything goes through
the same scripts, streams and pub/sub as a real deployment; only the server is in memory and
dies with the process.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from .registry import SessionRegistry
from .settings import Settings
from .transport import Transport


@asynccontextmanager
async def embedded(
    settings: Settings, *, workers: int = 2, concurrency: int = 4, modules: list[str] | None = None
) -> AsyncIterator[SessionRegistry]:
    import fakeredis

    from workers import catalog
    from workers.worker import Worker

    catalog.load(modules or [])
    server = fakeredis.FakeServer()
    pool = [
        Worker(Transport.in_memory(server, timeout_s=settings.redis_timeout_s), settings,
               concurrency=concurrency, worker_id=f"embedded-{n}")
        for n in range(workers)
    ]
    for worker in pool:
        await worker.start()
    registry = SessionRegistry(Transport.in_memory(server, timeout_s=settings.redis_timeout_s),
                               settings=settings)
    try:
        yield registry
    finally:
        await registry.aclose()
        for worker in pool:
            await worker.shutdown(grace_s=1.0)
