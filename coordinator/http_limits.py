"""The HTTP front's bound on request bodies, enforced before a body is read.

FastAPI reads a whole body into memory before the handler, and the registry's own limits
(``max_input_bytes``, ``max_response_bytes``) only apply after it was parsed: a 60 MB body
would be read, buffered and parsed in full just to be refused. This middleware stands in
front of all of it, as plain ASGI (no Starlette ``BaseHTTPMiddleware``, which would buffer
the stream it should guard):

- a ``Content-Length`` above the limit is answered 413 at once, before one body byte is
  read, with ``Connection: close`` (the server need not drain the rest);
- a body without one (chunked) is counted as the server hands it over, and the request is
  refused as soon as the count passes the limit, so the app never holds more than the
  limit in memory.

The answer is the coordinator's error JSON, ``{"status": "error", "type":
"payload_too_large", "error": ...}``, like every other refusal.
"""

from __future__ import annotations

import json
from collections.abc import Callable

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

PAYLOAD_TOO_LARGE = "payload_too_large"


class BodyTooLarge(HTTPException):
    """Raised from ``receive`` when a chunked body passes the limit. An ``HTTPException``
    so that FastAPI hands it to the app's handler (``http_api`` maps 413 to the error JSON)
    instead of wrapping it in a 400 "error parsing the body"."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, too_large_message(limit), headers={"Connection": "close"})


def too_large_message(limit: int) -> str:
    return (f"request body is larger than the {limit} bytes this server reads "
            f"(ALC_MAX_REQUEST_BYTES); send less, e.g. a batch split in several requests")


def error_body(limit: int) -> bytes:
    return json.dumps({"status": "error", "type": PAYLOAD_TOO_LARGE,
                       "error": too_large_message(limit)}).encode()


class BodyLimit:
    """ASGI middleware: refuse request bodies over ``limit()`` bytes (read per request, so
    the bound follows the settings of the registry the app serves)."""

    def __init__(self, app: ASGIApp, limit: Callable[[], int]) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit()
        declared = _content_length(scope)
        if declared is not None and declared > limit:
            await _refuse(send, limit)
            return
        guard = _Guard(receive, send, limit)
        try:
            await self.app(scope, guard.receive, guard.send)
        except BodyTooLarge:
            # The app let it through (it is not a FastAPI app, or it has no handler for
            # HTTPException): answer here, unless a response is already on its way.
            if guard.started:
                raise
            await _refuse(send, limit)


class _Guard:
    """One request's ``receive`` that counts body bytes, and ``send`` that notes whether
    the response started."""

    def __init__(self, receive: Receive, send: Send, limit: int) -> None:
        self._receive = receive
        self._send = send
        self._limit = limit
        self._seen = 0
        self.started = False

    async def receive(self) -> Message:
        message = await self._receive()
        if message["type"] == "http.request":
            self._seen += len(message.get("body", b""))
            if self._seen > self._limit:
                raise BodyTooLarge(self._limit)
        return message

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.started = True
        await self._send(message)


def _content_length(scope: Scope) -> int | None:
    """The declared body size; None when absent or not a number (the server refuses a
    malformed one itself)."""
    for name, value in scope.get("headers", ()):
        if name.lower() == b"content-length":
            text = value.decode("latin-1").strip()
            return int(text) if text.isdigit() else None
    return None


async def _refuse(send: Send, limit: int) -> None:
    body = error_body(limit)
    await send({"type": "http.response.start", "status": 413, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
        (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body, "more_body": False})
