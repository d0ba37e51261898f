"""``python -m bench.bounds``: how long each registry call takes against a frozen Redis
(SIGSTOP) and against a refused port, and what it raises. Every call must end within
``ALC_REDIS_TIMEOUT_S`` (5 s by default) plus its own ``timeout``, with a ``SessionError``.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Awaitable
from typing import Any

from coordinator import SessionError, SessionRegistry
from tests.helpers import free_port
from tests.redis_proc import RedisProcess


async def timed(what: str, aw: Awaitable[Any]) -> None:
    t = time.monotonic()
    try:
        await aw
        out = "ok"
    except SessionError as exc:
        out = f"{type(exc).__name__}"
    except Exception as exc:
        out = f"RAW {type(exc).__name__}: {exc}"
    print(f"  {what:38s} {time.monotonic() - t:6.2f} s  {out}")


async def calls(reg: SessionRegistry, sid: str) -> None:
    await timed("feed_response(timeout=2)", reg.feed_response(sid, "q-0", "x", timeout=2))
    await timed("wait_event(timeout=2)", reg.wait_event(sid, timeout=2))
    await timed("start_execution(timeout=2)", reg.start_execution("sc", {"task": "t"}, timeout=2))
    await timed("submit", reg.submit("sc", {"task": "t"}))
    await timed("status", reg.status(sid))
    await timed("list_snapshots", reg.list_snapshots())
    await timed("cancel", reg.cancel(sid))

async def main() -> None:
    with RedisProcess() as server:
        reg = SessionRegistry.from_url(server.url, namespace="probe")
        sid = await reg.submit("sc", {"task": "t"})
        await reg.status(sid)
        assert server.pid is not None
        os.kill(server.pid, signal.SIGSTOP)
        print("frozen (SIGSTOP):")
        try:
            await calls(reg, sid)
        finally:
            os.kill(server.pid, signal.SIGCONT)
        await reg.aclose()
    reg = SessionRegistry.from_url(f"redis://127.0.0.1:{free_port()}/0", namespace="probe")
    print("refused port:")
    await calls(reg, "s-0-x")
    await reg.aclose()

if __name__ == "__main__":
    asyncio.run(main())
