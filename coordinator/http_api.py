"""The HTTP front: a FastAPI app over ``SessionRegistry`` (``coordinator serve``).

Hosts that are not Python programs reach sessions here. Every body and result is a
``FeedResult.to_json`` shape, so a host written for algocline's ``alc_continue`` reads ours
unchanged. The app keeps no session state: all of it is in Redis, so any number of API
processes can serve the same sessions, and a request may land on any of them.

Errors are the coordinator's own ``to_json()`` with a status from ``fronts.http_status``;
request bodies FastAPI rejects get the same shape (422), never a bare 500.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, FastAPI, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr
from starlette.exceptions import HTTPException

from . import fronts
from .errors import InvalidInput, SessionError, WaitTimeout
from .models import Finished
from .registry import MAX_BUDGET, SessionRegistry
from .settings import Settings
from .transport import Target, Transport

log = logging.getLogger(__name__)

RegistryFactory = Callable[[], SessionRegistry]
SessionId = Annotated[str, Path(pattern=r"^[A-Za-z0-9._-]{1,128}$",
                                description="a session id from POST /sessions")]
#: A client may pick its wait (default: the registry's ``wait_timeout_s``), within bounds:
#: at least 1 s, so a 504 means a slow session rather than an impatient client.
Timeout = Annotated[float | None, Query(ge=1.0, le=3600.0,
                                        description="seconds to wait for the next event")]
PositiveCount = Annotated[StrictInt, Field(gt=0, le=MAX_BUDGET)]
TokenCount = Annotated[StrictInt, Field(ge=0, le=MAX_BUDGET)]


# -- request bodies ----------------------------------------------------------------------

class Budget(BaseModel):
    model_config = ConfigDict(extra="forbid")
    llm_calls: PositiveCount | None = None
    tokens: PositiveCount | None = None
    elapsed_ms: PositiveCount | None = None


class StartRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    strategy: StrictStr = Field(min_length=1, max_length=200, examples=["reflect"])
    input: dict[str, Any] = Field(default_factory=dict, examples=[{"task": "Design a cache"}])
    budget: Budget | None = None


class AnswerItem(BaseModel):
    model_config = ConfigDict(extra="forbid")
    query_id: StrictStr = Field(min_length=1, max_length=200)
    response: StrictStr
    usage: dict[str, TokenCount] | None = None


class FeedRequest(BaseModel):
    """A bare ``response`` (to the one pending query), one for ``query_id``, or a batch."""

    model_config = ConfigDict(extra="forbid")
    response: StrictStr | None = None
    query_id: StrictStr | None = Field(default=None, min_length=1, max_length=200)
    usage: dict[str, TokenCount] | None = None
    responses: list[AnswerItem] | None = Field(default=None, min_length=1)


# -- documented results (for /openapi.json; handlers return the to_json dicts as they are) -

class Event(BaseModel):
    model_config = ConfigDict(extra="allow")
    status: Literal["accepted", "needs_response", "completed", "error", "cancelled"]
    session_id: str | None = None


class ErrorBody(BaseModel):
    model_config = ConfigDict(extra="allow")
    status: Literal["error"]
    error: str
    type: str = Field(description="the error's stable code, e.g. not_found")


class Health(BaseModel):
    model_config = ConfigDict(extra="allow")
    status: Literal["ok", "degraded", "error"]
    redis: str
    workers: int | None = None


#: One event of GET /sessions/{id}/events (keep-alive comments are not events).
_SSE_EVENT: dict[str, Any] = {
    "type": "object",
    "required": ["event", "id", "data"],
    "properties": {
        "event": {"type": "string", "description": "the event's status",
                  "enum": ["needs_response", "completed", "error", "cancelled"]},
        "id": {"type": "string", "description": "1, 2, ... within this stream"},
        "data": {"type": "string", "contentMediaType": "application/json",
                 "contentSchema": {"type": "object", "required": ["status"]},
                 "description": "the event's to_json shape, with session_id"},
    },
}


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    return {code: {"model": ErrorBody} for code in (*codes, 401, 422, 503)}


# -- serving ---------------------------------------------------------------------------

def is_loopback(host: str) -> bool:
    """Whether only this machine can reach ``host`` (then auth may stay off)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


async def serve(
    settings: Settings, host: str, port: int, token: str | None, *,
    log_level: str = "info", grace_s: int = 10,
) -> None:
    """Run the API under uvicorn until SIGTERM/SIGINT, then drain: stop accepting, let
    in-flight requests finish for up to ``grace_s`` seconds, close the registry."""
    import uvicorn

    if not token and not is_loopback(host):
        raise InvalidInput(
            f"refusing to serve on {host} without a bearer token: anyone who can reach it "
            "could drive and cancel sessions. Pass --token TOKEN or set ALC_API_TOKEN "
            "(or bind 127.0.0.1)")
    app = create_app(settings, token or None)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level.lower(),
                            timeout_graceful_shutdown=grace_s, lifespan="on")
    try:
        await uvicorn.Server(config).serve()
    except SystemExit as exc:
        # uvicorn logs why it could not start (a host that does not resolve, a port in
        # use or not ours to bind) and exits the process; say it as the CLI's JSON error.
        raise InvalidInput(f"cannot serve on {host}:{port}: the server stopped at start-up "
                           f"(exit code {exc.code}); its log above says why, e.g. a --host "
                           "that does not resolve or a --port in use") from None


# -- the app -----------------------------------------------------------------------------

class _Holder:
    """The app's one registry. Made at startup, or on first use when the ASGI server runs
    no lifespan (test transports), and closed at shutdown."""

    def __init__(self, factory: RegistryFactory) -> None:
        self._factory = factory
        self._reg: SessionRegistry | None = None

    def get(self) -> SessionRegistry:
        if self._reg is None:
            self._reg = self._factory()
        return self._reg

    async def aclose(self) -> None:
        reg, self._reg = self._reg, None
        if reg is not None:
            await reg.aclose()


def _factory_for(source: RegistryFactory | Settings) -> RegistryFactory:
    if not isinstance(source, Settings):
        return source
    url = source.url
    if url is None:
        raise InvalidInput("the HTTP API needs Redis: pass --redis URL or set REDIS_URL")
    Target.parse(url)  # a bad URL is said at start, not on the first request
    return lambda: SessionRegistry(
        Transport.from_url(url, timeout_s=source.redis_timeout_s,
                           allow_eviction=source.allow_eviction), settings=source)


def create_app(
    source: RegistryFactory | Settings, token: str | None = None, *, keepalive_s: float = 15.0
) -> FastAPI:
    """The API over the registry that ``source`` makes (a zero-argument factory, or Settings
    with a Redis URL). With ``token`` every route but /healthz and the docs needs
    ``Authorization: Bearer <token>``."""
    holder = _Holder(_factory_for(source))

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        holder.get()
        try:
            yield
        finally:
            await holder.aclose()

    app = FastAPI(title="alc-coordinator", version="0.1.0", lifespan=lifespan,
                  description="Pausable strategy sessions on Redis: start, answer, observe.")
    deps = [Depends(_bearer(token))] if token else []
    router = APIRouter(dependencies=deps)
    _session_routes(router, holder, keepalive_s)
    app.include_router(router)
    _health_route(app, holder)
    _error_handlers(app)
    return app


#: Module level: the dependency's annotation below must resolve from the module's globals.
_BEARER = HTTPBearer(auto_error=False, description="the token given to `serve --token`")


def _bearer(token: str) -> Callable[..., Any]:
    expected = token.encode()

    async def check(cred: Annotated[HTTPAuthorizationCredentials | None,
                                    Depends(_BEARER)]) -> None:
        given = (cred.credentials if cred is not None else "").encode()
        if not hmac.compare_digest(given, expected):  # constant time: no timing oracle
            raise HTTPException(401, "missing or wrong bearer token",
                                headers={"WWW-Authenticate": "Bearer"})

    return check


def _session_routes(router: APIRouter, holder: _Holder, keepalive_s: float) -> None:
    @router.post("/sessions", status_code=201,
                 responses={201: {"model": Event}, **_errors(413, 504)})
    async def start_session(body: StartRequest, timeout: Timeout = None) -> JSONResponse:
        """Start a session; returns its first event (a pause or its end) and session_id."""
        budget = body.budget.model_dump(exclude_none=True) if body.budget else None
        out = await fronts.start(holder.get(), body.strategy, body.input, budget, timeout)
        return JSONResponse(out, status_code=201,
                            headers={"Location": f"/sessions/{out['session_id']}"})

    @router.post("/sessions/{session_id}/responses",
                 responses={200: {"model": Event}, **_errors(404, 409, 413, 504)})
    async def feed_responses(
        session_id: SessionId, body: FeedRequest, timeout: Timeout = None
    ) -> JSONResponse:
        """Answer pending queries: `accepted` while answers remain, else the next event."""
        batch = None if body.responses is None else [
            fronts.Answer(a.query_id, a.response, a.usage) for a in body.responses]
        out = await fronts.feed(holder.get(), session_id, response=body.response,
                                query_id=body.query_id, usage=body.usage, responses=batch,
                                timeout=timeout)
        return JSONResponse(out)

    @router.get("/sessions", responses={200: {"description": "session id -> snapshot"},
                                        **_errors()})
    async def list_sessions(
        pending: Literal["meta", "preview", "full"] | None = None, history: bool = False
    ) -> JSONResponse:
        """Snapshots of the paused sessions, keyed by session id."""
        return JSONResponse(await fronts.observe(holder.get(), None, pending, history))

    @router.get("/sessions/{session_id}", responses={200: {"description": "snapshot"},
                                                     **_errors(404)})
    async def get_session(
        session_id: SessionId,
        pending: Literal["meta", "preview", "full"] | None = None, history: bool = False,
    ) -> JSONResponse:
        """One session's snapshot; a finished one's carries its result while retained."""
        return JSONResponse(await fronts.observe(holder.get(), session_id, pending, history))

    @router.get("/sessions/{session_id}/events", response_class=StreamingResponse,
                responses={200: {"content": {"text/event-stream": {"schema": _SSE_EVENT}},
                                 "description": "server-sent events"}, **_errors(404)})
    async def session_events(session_id: SessionId) -> StreamingResponse:
        """Server-sent events: the session's current event, then each next one as it
        happens (event name = status, data = the to_json shape); ends after its end."""
        reg = holder.get()
        await reg.status(session_id)  # a 404 now, not an error event in a 200 stream
        return StreamingResponse(
            event_stream(reg, session_id, keepalive_s), media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @router.delete("/sessions/{session_id}",
                   responses={200: {"model": Event}, **_errors(404, 409)})
    async def cancel_session(session_id: SessionId) -> JSONResponse:
        """Cancel a session (running or paused); 409 once it has finished."""
        return JSONResponse(await fronts.cancel(holder.get(), session_id))


def _health_route(app: FastAPI, holder: _Holder) -> None:
    @app.get("/healthz", responses={200: {"model": Health}, 503: {"model": Health}})
    async def healthz() -> JSONResponse:
        """200 while Redis answers PING (``degraded`` when no worker heartbeat is live);
        503 when Redis does not answer within 3 s, saying why."""
        reg = holder.get()
        try:
            await reg.redis.ping(timeout=3.0)
            workers = await fronts.live_workers(reg)
        except SessionError as exc:
            return JSONResponse({"status": "error", "redis": "unreachable",
                                 "type": exc.code, "error": exc.message}, status_code=503)
        return JSONResponse({"status": "ok" if workers else "degraded", "redis": "ok",
                             "workers": len(workers), "worker_ids": workers})


def _error_handlers(app: FastAPI) -> None:
    @app.exception_handler(SessionError)
    async def session_error(_: Request, exc: SessionError) -> JSONResponse:
        return JSONResponse(exc.to_json(), status_code=fronts.http_status(exc))

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"status": "error", "type": "invalid_input",
                             "error": _describe(exc.errors())}, status_code=422)

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, exc: HTTPException) -> JSONResponse:
        if exc.status_code == 400:  # FastAPI could not even decode the body (not UTF-8)
            return JSONResponse({"status": "error", "type": "invalid_input", "error":
                                 f"request body is not valid JSON: {exc.detail}"},
                                status_code=422)
        kind = {401: "unauthorized", 404: "not_found", 405: "method_not_allowed"}
        return JSONResponse({"status": "error", "error": str(exc.detail),
                             "type": kind.get(exc.status_code, "http_error")},
                            status_code=exc.status_code, headers=exc.headers)



def _describe(errors: Any) -> str:
    """FastAPI's validation errors as one line a person can act on."""
    parts = []
    for err in list(errors)[:5]:
        where = ".".join(str(p) for p in err.get("loc", ()))
        if err.get("type") == "json_invalid":
            parts.append(f"request body is not valid JSON ({err.get('ctx', {}).get('error', '')})")
        elif where == "body" and err.get("type") in ("model_attributes_type", "dict_type"):
            parts.append("request body must be a JSON object (Content-Type: application/json)")
        else:
            parts.append(f"{where}: {err.get('msg', 'invalid')}")
    return "; ".join(parts) or "invalid request"


# -- server-sent events ------------------------------------------------------------------

KEEPALIVE = ": keep-alive\n\n"


def _sse(n: int, data: dict[str, Any]) -> str:
    body = json.dumps(data, ensure_ascii=False, separators=(",", ":"))  # one line, always
    return f"id: {n}\nevent: {data['status']}\ndata: {body}\n\n"


async def _round(reg: SessionRegistry, sid: str) -> int:
    return int((await reg.status(sid)).get("metrics", {}).get("rounds", -1))


async def event_stream(reg: SessionRegistry, sid: str, keepalive_s: float) -> AsyncIterator[str]:
    """The session's events, each once: ``wait_event`` gives the settled event (and waits
    while the session runs); a pause is new when its round is (the completed-round counter
    read before and after the wait agrees, so the pause belongs to that round). Between
    events the stream sleeps on the session's channel, not in a poll loop, and sends a
    keep-alive comment every ``keepalive_s`` so proxies keep the connection open."""
    async with await reg.mux.subscribe(reg.keys.session(sid).channel) as sub:
        shown: int | None = None
        n = 0
        while True:
            try:
                before = await _round(reg, sid)
                event = await reg.wait_event(sid, timeout=keepalive_s)
                after = await _round(reg, sid)
            except WaitTimeout:
                yield KEEPALIVE
                continue
            except SessionError as exc:  # e.g. its retention ran out mid-stream
                yield _sse(n + 1, exc.to_json())
                return
            if isinstance(event, Finished):
                yield _sse(n + 1, {"session_id": sid, **event.to_json(sid)})
                return
            if before != after:
                continue  # a round completed while we read: read again
            if after != shown:
                shown, n = after, n + 1
                yield _sse(n, event.to_json(sid))
            if await sub.get(keepalive_s) is None:
                yield KEEPALIVE
