"""One streaming GET straight on an ASGI app, read one server-sent event block at a time.

httpx's ASGI transport buffers a whole response, so a test of an endless event stream could
never see its first event; this sends the request itself and hands over each chunk as the
app sends it. The test decides when the client goes: ``close`` sends ``http.disconnect``
and returns once the handler has finished (so what it holds, subscriptions above all, can
be checked as released).
"""

from __future__ import annotations

import asyncio
from typing import Any

KEEPALIVE = "keep-alive"


class AsgiStream:
    def __init__(self, app: Any, path: str, *, wait_s: float) -> None:
        self.chunks: asyncio.Queue[bytes | None] = asyncio.Queue()
        self.status: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.wait_s = wait_s
        self._gone = asyncio.Event()
        self._asked = False
        self._buf = ""
        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
                 "method": "GET", "scheme": "http", "path": path, "raw_path": path.encode(),
                 "root_path": "", "query_string": b"", "headers": [(b"host", b"api")],
                 "client": ("127.0.0.1", 1), "server": ("api", 80), "state": {}}
        self.task = asyncio.create_task(app(scope, self._receive, self._send))

    async def _receive(self) -> dict[str, Any]:
        if not self._asked:
            self._asked = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await self._gone.wait()
        return {"type": "http.disconnect"}

    async def _send(self, msg: dict[str, Any]) -> None:
        if msg["type"] == "http.response.start":
            self.status.set_result(msg["status"])
        elif msg["type"] == "http.response.body":
            if msg.get("body"):
                await self.chunks.put(msg["body"])
            if not msg.get("more_body", False):
                await self.chunks.put(None)

    async def block(self) -> dict[str, str] | str | None:
        """The next event's fields ({"event", "data", "id"?}), ``KEEPALIVE`` for a comment,
        or None at the stream's end; each wait bounded by ``wait_s``."""
        while "\n\n" not in self._buf:
            chunk = await asyncio.wait_for(self.chunks.get(), self.wait_s)
            if chunk is None:
                return None
            self._buf += chunk.decode()
        block, self._buf = self._buf.split("\n\n", 1)
        if block.startswith(":"):
            return KEEPALIVE
        return dict(line.split(": ", 1) for line in block.splitlines())

    async def close(self) -> None:
        self._gone.set()
        await asyncio.wait_for(self.task, self.wait_s)
