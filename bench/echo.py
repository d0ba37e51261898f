"""The floor's far side: a process that answers each message through Redis at once.

``pubsub``: wait on channel ``<prefix>:ping`` and publish the payload to ``<prefix>:pong``.
``list``: BLPOP ``<prefix>:ping`` and LPUSH the payload to ``<prefix>:pong:<tag>``.
Same client stack as the coordinator (redis-py asyncio + hiredis), so the floor is the cost
of one trip to another process through Redis with our tools, below which no step can go.
"""

from __future__ import annotations

import argparse
import asyncio

from redis.asyncio import Redis


async def pubsub_echo(client: Redis, prefix: str) -> None:
    ps = client.pubsub()
    await ps.subscribe(f"{prefix}:ping")
    await client.set(f"{prefix}:ready", 1)
    async for msg in ps.listen():
        if msg["type"] == "message":
            data = msg["data"]
            if data == b"stop":
                return
            await client.publish(f"{prefix}:pong", data)


async def list_echo(client: Redis, prefix: str) -> None:
    await client.set(f"{prefix}:ready", 1)
    while True:
        _, data = await client.blpop([f"{prefix}:ping"])  # type: ignore[misc]
        if data == b"stop":
            return
        tag, _, _ = data.partition(b":")
        await client.lpush(f"{prefix}:pong:{tag.decode()}", data)


async def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("url")
    p.add_argument("mode", choices=["pubsub", "list"])
    p.add_argument("prefix")
    a = p.parse_args()
    client = Redis.from_url(a.url)
    try:
        await (pubsub_echo if a.mode == "pubsub" else list_echo)(client, a.prefix)
    finally:
        await client.aclose()


if __name__ == "__main__":
    asyncio.run(main())
