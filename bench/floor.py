"""The floor: a cross-process round trip through Redis with redis-py asyncio + hiredis.

Process A (this one) sends, process B (``bench.echo``) waits and sends back. Measured as
latency (one trip at a time) and as throughput with the same host shape as the coordinator's
throughput run (``concurrency`` loops in flight from one host process).
"""

from __future__ import annotations

import asyncio
import secrets
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from redis.asyncio import Redis

from .stats import Latency, now


@asynccontextmanager
async def echo_process(url: str, mode: str) -> AsyncIterator[str]:
    prefix = f"floor-{secrets.token_hex(4)}"
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "bench.echo", url, mode,
                                                prefix)
    client = Redis.from_url(url)
    try:
        for _ in range(500):
            if await client.get(f"{prefix}:ready"):
                break
            await asyncio.sleep(0.01)  # process start-up, not a measured wait
        else:
            raise RuntimeError("echo process did not start")
        yield prefix
    finally:
        if mode == "pubsub":
            await client.publish(f"{prefix}:ping", b"stop")
        else:
            await client.lpush(f"{prefix}:ping", b"stop")
        await client.aclose()
        try:
            await asyncio.wait_for(proc.wait(), 5)
        except TimeoutError:
            proc.kill()


async def pubsub_rtt(url: str, n: int, concurrency: int = 1) -> tuple[Latency, float]:
    """(latency, round trips per second) of publish -> echo -> publish back."""
    async with echo_process(url, "pubsub") as prefix:
        client = Redis.from_url(url)
        ps = client.pubsub()
        await ps.subscribe(f"{prefix}:pong")
        await ps.get_message(timeout=1)
        waiters: dict[bytes, asyncio.Future[None]] = {}

        async def reader() -> None:
            async for msg in ps.listen():
                if msg["type"] == "message":
                    fut = waiters.pop(msg["data"], None)
                    if fut is not None:
                        fut.set_result(None)

        rd = asyncio.create_task(reader())
        samples: list[float] = []
        loop = asyncio.get_running_loop()

        async def one_loop(tag: int, count: int) -> None:
            for i in range(count):
                key = f"{tag}:{i}".encode()
                fut = loop.create_future()
                waiters[key] = fut
                t0 = now()
                await client.publish(f"{prefix}:ping", key)
                await fut
                samples.append(now() - t0)

        for i in range(50):  # warm-up
            await one_loop(-1, 1) if i == 0 else None
        samples.clear()
        per = max(1, n // concurrency)
        t0 = now()
        await asyncio.gather(*(one_loop(t, per) for t in range(concurrency)))
        elapsed = now() - t0
        rd.cancel()
        await ps.aclose()
        await client.aclose()
        return Latency.of(samples), len(samples) / elapsed


async def list_rtt(url: str, n: int) -> Latency:
    """LPUSH -> echo BLPOP + LPUSH -> BLPOP back, one at a time."""
    async with echo_process(url, "list") as prefix:
        client = Redis.from_url(url)
        samples: list[float] = []
        for i in range(n + 50):
            t0 = now()
            await client.lpush(f"{prefix}:ping", f"0:{i}")
            await client.blpop([f"{prefix}:pong:0"], timeout=5)  # type: ignore[misc]
            if i >= 50:
                samples.append(now() - t0)
        await client.aclose()
        return Latency.of(samples)
