"""A neighbour in its own process, busy in a loop until its stdin closes.

The benchmark measures feeds while this runs, as a dashboard or a second host would: another
client of the same Redis, not a task sharing the feeding host's event loop. Besides the
observer itself (``list``), two controls measured in the same run tell what any neighbour of
that kind costs a feed on this machine, whatever the listing does:

- ``read``: the floor of a listing: one HGET of one field of each paused session, packed once,
  200 per write on a bare asyncio socket and parsed by hiredis. No snapshot is built and no
  client library runs; no reader of 10k sessions does less.
- ``blob``: the best case of a snapshot index kept up to date by every transition: all the
  snapshots prebuilt in one key, read with one GET and decoded into dicts each round. Redis
  does next to nothing; the observer's own CPU remains.
- ``spin``: a process that only burns a core and never talks to Redis, the share of the
  interference that is CPU contention alone.
"""

from __future__ import annotations

import asyncio
import sys
import time
from urllib.parse import urlparse

import hiredis
import msgpack
from redis.asyncio import Redis

from coordinator import SessionRegistry

KINDS = ("list", "read", "blob", "spin")
READ_BATCH = 200


async def _list(reg: SessionRegistry) -> None:
    await reg.list_snapshots()


class _Reader:
    def __init__(self, url: str, reg: SessionRegistry) -> None:
        self.url, self.reg = url, reg
        self.parser = hiredis.Reader()

    async def connect(self) -> None:
        u = urlparse(self.url)
        self.r, self.w = await asyncio.open_connection(u.hostname, u.port or 6379)
        if u.path.strip("/"):
            await self._call([hiredis.pack_command(("SELECT", u.path.strip("/")))])

    async def _call(self, packed: list[bytes]) -> list[object]:
        self.w.write(b"".join(packed))
        replies: list[object] = []
        while len(replies) < len(packed):
            reply = self.parser.gets()
            if reply is False:
                self.parser.feed(await self.r.read(1 << 16))
            else:
                replies.append(reply)
        return replies

    async def round(self) -> None:
        head, tail = self.reg.keys.session_template()
        (sids,) = await self._call([hiredis.pack_command(("ZRANGE", self.reg.keys.registry,
                                                          0, -1))])
        assert isinstance(sids, list)
        cmds = [hiredis.pack_command(("HGET", f"{head}{s.decode()}{tail}", "phase"))
                for s in sids]
        for i in range(0, len(cmds), READ_BATCH):
            await self._call(cmds[i : i + READ_BATCH])


async def _blob(reg: SessionRegistry, raw: Redis, first: bool) -> None:
    key = f"{reg.keys.namespace}:bench:snapshot-blob"
    if first:
        await raw.set(key, msgpack.packb(await reg.list_snapshots()))
    snaps = msgpack.unpackb(await raw.get(key))
    # as list_snapshots hands them out: a dict per session, its metrics a dict of their own
    _ = {sid: {**snap, "metrics": {**snap["metrics"]}} for sid, snap in snaps.items()}


async def _spin() -> None:
    until = time.perf_counter() + 0.05
    while time.perf_counter() < until:
        pass
    await asyncio.sleep(0)  # lets the loop see stdin close


async def main(url: str, namespace: str, kind: str) -> None:
    reg = SessionRegistry.from_url(url, namespace=namespace)
    reader = _Reader(url, reg)
    await reader.connect()
    raw = Redis.from_url(url)
    loop = asyncio.get_running_loop()
    closed = loop.run_in_executor(None, sys.stdin.read)  # returns when the parent closes it
    rounds = 0
    while not closed.done():
        if kind == "list":
            await _list(reg)
        elif kind == "read":
            await reader.round()
        elif kind == "blob":
            await _blob(reg, raw, rounds == 0)
        else:
            await _spin()
        rounds += 1
        if rounds == 1:
            print("ready", flush=True)  # the parent measures from here on
    reader.w.close()
    await raw.aclose()
    await reg.aclose()
    print(rounds, flush=True)


if __name__ == "__main__":
    if len(sys.argv) != 4 or sys.argv[3] not in KINDS:
        sys.exit(f"usage: python -m bench.observer URL NAMESPACE {{{'|'.join(KINDS)}}}")
    asyncio.run(main(*sys.argv[1:4]))
