"""Request bodies over ``Settings.max_request_bytes`` are refused before they are read:
through a real uvicorn server and a raw socket (a 60 MB ``Content-Length`` is answered 413
after a few bytes of body; a chunked body is cut off once it passes the limit), and in
process (the app pulls at most one chunk past the limit from an endless body).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest

from coordinator.http_api import create_app
from coordinator.http_limits import BodyLimit
from coordinator.registry import SessionRegistry
from tests.test_http_api import served

pytestmark = [pytest.mark.redis]

WAIT_S = 30.0
SMALL = 4096


@asynccontextmanager
async def server(redis_url: str, **settings: Any) -> AsyncIterator[tuple[str, int]]:
    app = create_app(lambda: SessionRegistry.from_url(redis_url, namespace="limits",
                                                      **settings))
    async with served(app) as base:
        host, port = base.removeprefix("http://").split(":")
        yield host, int(port)


async def exchange(where: tuple[str, int], head: bytes, body: bytes) -> tuple[int, dict[str, str],
                                                                              bytes]:
    """Send ``head`` and ``body`` (nothing more), then read the response to the server's
    close: its status, headers and body."""
    reader, writer = await asyncio.open_connection(*where)
    try:
        writer.write(head + body)
        await writer.drain()
        raw = await asyncio.wait_for(reader.read(), WAIT_S)  # to EOF: the server closes
    finally:
        writer.close()
    status_line, _, rest = raw.partition(b"\r\n")
    header_block, _, payload = rest.partition(b"\r\n\r\n")
    headers = {}
    for line in header_block.decode("latin-1").split("\r\n"):
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(status_line.split()[1]), headers, payload


def too_large(status: int, headers: dict[str, str], payload: bytes) -> dict[str, Any]:
    assert status == 413, (status, headers, payload)
    assert headers["content-type"] == "application/json"
    assert headers.get("connection") == "close"
    body: dict[str, Any] = json.loads(payload)
    assert body["status"] == "error" and body["type"] == "payload_too_large", body
    return body


async def test_a_declared_60_mb_body_is_refused_after_a_few_bytes(redis_url: str) -> None:
    async with server(redis_url) as where:
        head = (b"POST /sessions HTTP/1.1\r\nHost: api\r\nContent-Type: application/json\r\n"
                b"Content-Length: 62914560\r\n\r\n")
        body = too_large(*await exchange(where, head, b'{"strategy":'))
        assert str(8 * 1024 * 1024) in body["error"]  # the default limit, named


async def test_a_chunked_body_is_cut_off_once_past_the_limit(redis_url: str) -> None:
    """The body never ends (no last chunk is sent): the 413 comes all the same."""
    async with server(redis_url, max_request_bytes=SMALL) as where:
        head = (b"POST /sessions HTTP/1.1\r\nHost: api\r\nContent-Type: application/json\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n")
        chunks = b"".join(b"400\r\n" + b" " * 1024 + b"\r\n" for _ in range(SMALL // 1024 + 2))
        body = too_large(*await exchange(where, head, chunks))
        assert str(SMALL) in body["error"]


async def test_a_body_at_the_limit_reaches_the_app(redis_url: str) -> None:
    async with server(redis_url, max_request_bytes=SMALL) as where:
        doc = json.dumps({"strategy": "cot", "input": {"task": "t"}}).encode()
        doc += b" " * (SMALL - len(doc))
        head = (b"POST /sessions HTTP/1.1\r\nHost: api\r\nContent-Type: application/json\r\n"
                b"Connection: close\r\nContent-Length: %d\r\n\r\n" % len(doc))
        status, _, payload = await exchange(where, head, doc)
        assert status == 503 and json.loads(payload)["type"] == "no_worker", payload


async def test_an_endless_body_is_read_no_further_than_one_chunk_past_the_limit(
    redis_url: str,
) -> None:
    """In process, on the app itself: the body is pulled chunk by chunk and the pulling
    stops at the first chunk past the limit, so the app never holds more than that."""
    app = create_app(lambda: SessionRegistry.from_url(redis_url, namespace="limits",
                                                      max_request_bytes=SMALL))
    pulled = 0
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        nonlocal pulled
        pulled += 1000
        return {"type": "http.request", "body": b" " * 1000, "more_body": True}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": "/sessions", "raw_path": b"/sessions",
             "root_path": "", "query_string": b"", "client": ("127.0.0.1", 1),
             "server": ("api", 80), "state": {}, "headers": [
                 (b"host", b"api"), (b"content-type", b"application/json"),
                 (b"transfer-encoding", b"chunked")]}
    async with app.router.lifespan_context(app):
        await asyncio.wait_for(app(scope, receive, send), WAIT_S)
    assert SMALL < pulled <= SMALL + 1000
    start, *rest = sent
    assert start["status"] == 413
    body = json.loads(b"".join(m.get("body", b"") for m in rest))
    assert body["type"] == "payload_too_large"


async def test_the_middleware_answers_for_an_app_without_handlers() -> None:
    """A bare ASGI app that lets the refusal propagate still gets the 413 JSON."""

    async def reader(scope: Any, receive: Any, send: Any) -> None:
        while (await receive()).get("more_body"):
            pass

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"x" * 600, "more_body": True}

    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await BodyLimit(reader, lambda: 1024)({"type": "http", "headers": []}, receive, send)
    assert sent[0]["status"] == 413
    assert json.loads(sent[1]["body"])["type"] == "payload_too_large"
