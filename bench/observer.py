"""An observer in its own process: lists every snapshot in a loop until its stdin closes.

The benchmark measures feeds while this runs, as a dashboard or a second host would: another
client of the same Redis, not a task sharing the feeding host's event loop.
"""

from __future__ import annotations

import asyncio
import sys

from coordinator import SessionRegistry


async def main(url: str, namespace: str) -> None:
    reg = SessionRegistry.from_url(url, namespace=namespace)
    loop = asyncio.get_running_loop()
    closed = loop.run_in_executor(None, sys.stdin.read)  # returns when the parent closes it
    listings = 0
    while not closed.done():
        await reg.list_snapshots()
        listings += 1
    await reg.aclose()
    print(listings, flush=True)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2]))
