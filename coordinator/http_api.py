"""The HTTP front: a FastAPI app over ``SessionRegistry`` (``coordinator serve``).

Hosts that are not Python programs reach sessions here. Every body and result is a
``FeedResult.to_json`` shape, so a host written for algocline's ``alc_continue`` reads ours
unchanged. The app keeps no session state: all of it is in Redis, so any number of API
processes can serve the same sessions, and a request may land on any of them.

Errors are the coordinator's own ``to_json()`` with a status from ``fronts.http_status``;
request bodies FastAPI rejects get the same shape (422), never a bare 500.

Around the routes, each in its module: the body-size bound (``http_limits``, outermost but
one, so a huge body is refused before it is read), request counting for ``/metrics``
(``metrics``), the offline ``/docs`` (``http_docs``), the resumable event stream
(``http_stream``) and the namespace's activity stream (``http_activity``).
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, FastAPI, Header, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr
from starlette.exceptions import HTTPException

from . import fronts
from .errors import InvalidInput, SessionError
from .http_activity import activity_stream
from .http_docs import mount_docs
from .http_drain import Drain
from .http_drain import server as drain_server
from .http_limits import PAYLOAD_TOO_LARGE, BodyLimit
from .http_stream import EVENT_ID, event_stream, parse_event_id
from .metrics import ApiMetrics, CountRequests, scrape
from .registry import MAX_BUDGET, SessionRegistry
from .settings import Settings
from .transport import Target, Transport
from .webui import mount_console

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
#: A round number as the scripts take it (a whole number below 2**48).
Round = Annotated[StrictInt, Field(gt=0, lt=2**48)]


# -- request bodies ----------------------------------------------------------------------

class Budget(BaseModel):
    """algocline's limits (``max_*``), or our former names for them."""

    model_config = ConfigDict(extra="forbid")
    max_llm_calls: PositiveCount | None = None
    max_tokens: PositiveCount | None = None
    max_elapsed_ms: PositiveCount | None = None
    llm_calls: PositiveCount | None = Field(default=None, description="= max_llm_calls")
    tokens: PositiveCount | None = Field(default=None, description="= max_tokens")
    elapsed_ms: PositiveCount | None = Field(default=None, description="= max_elapsed_ms")


class StartRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    strategy: StrictStr = Field(min_length=1, max_length=200, examples=["reflect"])
    input: dict[str, Any] = Field(
        default_factory=dict, examples=[{"task": "Design a cache"}],
        description="the strategy's input; algocline's limits may ride in it as "
                    '{"budget": {"max_llm_calls", "max_tokens", "max_elapsed_ms"}}')
    budget: Budget | None = Field(default=None, description="the same limits as input.budget")
    ttl: float | None = Field(default=None, gt=0, examples=[3600],
                              description="seconds the session may idle waiting for answers "
                                          "before it expires (default: the deployment's)")
    idempotency_key: StrictStr | None = Field(
        default=None, min_length=1, max_length=256,
        description="the client's id for this start: the same key (with the same strategy "
                    "and input) within the retention returns the same session; with another "
                    "strategy or input it is a 409 idempotency_conflict")


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
    round: Round | None = Field(
        default=None, examples=[1],
        description="the round the answers are for (the snapshot's `round`): a session at "
                    "another round refuses them with 409 `stale_round` and nothing is "
                    "written; for a batch it applies to every item")


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


class SessionPage(BaseModel):
    model_config = ConfigDict(extra="allow")
    active_sessions: int = Field(description="running + paused sessions in the namespace")
    counts: dict[str, int] = Field(description="sessions per phase (finished ones while "
                                   "retained): running, paused, completed, failed, cancelled")
    sessions: list[dict[str, Any]] = Field(description="snapshots, newest activity first, "
                                           "each with session_id first")
    next_cursor: str | None = Field(description="pass as `cursor` for the next page; null "
                                    "on the last one")


class StrategyParam(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str
    required: bool
    default: Any = None
    annotation: str | None = None


class Strategy(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str
    description: str
    params: list[StrategyParam]
    workers: int = Field(description="live workers that offer it")


class StrategyList(BaseModel):
    model_config = ConfigDict(extra="allow")
    strategies: list[Strategy]


class WorkerReport(BaseModel):
    model_config = ConfigDict(extra="allow")
    worker_id: str
    at: int | None = Field(default=None, description="its last heartbeat (Unix ms)")
    concurrency: int | None = Field(default=None, description="steps it runs at once")
    busy: int | None = Field(default=None, description="steps in flight")
    live: int | None = Field(default=None, description="executions held in memory")
    steps: int | None = Field(default=None, description="steps since it started")
    replays: int | None = Field(default=None, description="replays since it started")
    strategies: list[str] | None = Field(default=None, description="what it offers")


class DeadLetter(BaseModel):
    model_config = ConfigDict(extra="allow")
    id: str = Field(description="the stream entry id (its ms time first)")
    sid: str | None = None
    job: str | None = None
    reason: str | None = None
    error: str | None = None
    at: str | None = Field(default=None, description="when (Unix ms)")


class Fleet(BaseModel):
    model_config = ConfigDict(extra="allow")
    workers: list[WorkerReport] = Field(description="live workers (heartbeat present), by id")
    dead_letter_count: int = Field(description="jobs in the dead-letter streams")
    dead_letters: list[DeadLetter] = Field(description="the newest ones, newest first")


Phase = Literal["running", "paused", "completed", "failed", "cancelled"]
_PENDING = Query(max_length=2000, description=(
    "show each pending query: meta (id, max_tokens), preview (+ the prompt's first 200 "
    "characters), full, or algocline's object as JSON, e.g. "
    '{"query_id": true, "system": true, "prompt": {"mode": "preview", "chars": 80}}'))


def _pending_spec(raw: str | None) -> str | dict[str, Any] | None:
    """A ``pending`` query parameter: a preset name, or algocline's filter object as JSON."""
    if raw is None or not raw.lstrip().startswith("{"):
        return raw
    try:
        spec = json.loads(raw)
    except ValueError:
        raise InvalidInput("pending is neither meta, preview, full nor a JSON object") from None
    if not isinstance(spec, dict):
        raise InvalidInput("pending must be a preset name or a JSON object")
    return spec
_HISTORY = Query(description="add the last 10 exchanges (conversation_history)")

def _sse_event(events: list[str], event_doc: str, data_doc: str,
               id_schema: dict[str, Any] | None = None) -> dict[str, Any]:
    """The OpenAPI schema of one server-sent event (keep-alive comments are not events):
    its name, its JSON data and, for a resumable stream, its id."""
    props: dict[str, Any] = {
        "event": {"type": "string", "enum": events, "description": event_doc},
        "data": {"type": "string", "contentMediaType": "application/json",
                 "contentSchema": {"type": "object"}, "description": data_doc},
    }
    if id_schema is not None:
        props["id"] = id_schema
    return {"type": "object", "required": ["event", "data"], "properties": props}


#: One event of GET /sessions/{id}/events.
_SSE_EVENT = _sse_event(
    ["log", "progress", "needs_response", "accepted", "completed", "error", "cancelled"],
    "what happened",
    "log: {ts, level, source, message, seq}; progress: the progress object; needs_response "
    "and the end: the to_json shape with session_id; accepted: {status, remaining, "
    "session_id}",
    {"type": "string", "pattern": EVENT_ID,
     "description": "S.G.K.A, the same on every connection: S log entries written, G the "
                    "pause (the round; the end is rounds + 1), K 0 progress / 1 pause or "
                    "end, A answers accepted since the pause; send the last one back as "
                    "Last-Event-ID to resume. An error that ends the stream (the session is "
                    "gone) has none"})


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
    log_level: str = "info", grace_s: int = 10, modules: list[str] | None = None,
) -> None:
    """Run the API under uvicorn until SIGTERM/SIGINT, then drain: stop accepting, let
    in-flight requests finish for up to ``grace_s`` seconds (event streams end by
    themselves before that: ``coordinator.http_drain``), close the registry.

    Without a Redis URL it serves the embedded default (``coordinator.embedded``: an
    in-process Redis with two in-process workers importing ``modules``), so the console at
    ``/ui`` works on a machine with nothing else installed; its sessions die with it."""
    if not token and not is_loopback(host):
        raise InvalidInput(
            f"refusing to serve on {host} without a bearer token: anyone who can reach it "
            "could drive and cancel sessions. Pass --token TOKEN or set ALC_API_TOKEN "
            "(or bind 127.0.0.1)")
    drain = Drain(grace_s)
    if settings.url is not None:
        app = create_app(settings, token or None, drain=drain)
        await _run_uvicorn(app, drain, host, port, log_level)
        return
    from .embedded import embedded

    async with embedded(settings, modules=modules) as reg:
        log.warning("no Redis URL given: serving the embedded in-process Redis with 2 "
                    "workers; its sessions are gone when the server stops")
        await _run_uvicorn(create_app(lambda: reg, token or None, drain=drain), drain, host,
                           port, log_level)


async def _run_uvicorn(app: FastAPI, drain: Drain, host: str, port: int,
                       log_level: str) -> None:
    import uvicorn

    # log_config None: uvicorn keeps the handlers ``coordinator.logs.configure_logging`` set
    # (so ``--log-format json`` covers its lines too) instead of installing its own.
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level.lower(),
                            timeout_graceful_shutdown=max(1, round(drain.grace_s)),
                            lifespan="on", log_config=None)
    drain.bind()
    try:
        await drain_server(config, drain).serve()
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
    source: RegistryFactory | Settings, token: str | None = None, *, keepalive_s: float = 15.0,
    drain: Drain | None = None,
) -> FastAPI:
    """The API over the registry that ``source`` makes (a zero-argument factory, or Settings
    with a Redis URL). With ``token`` every route but /healthz and the docs needs
    ``Authorization: Bearer <token>``. Request bodies are bounded by the registry's
    ``Settings.max_request_bytes``."""
    holder = _Holder(_factory_for(source))
    counters = ApiMetrics()

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        holder.get()
        try:
            yield
        finally:
            await holder.aclose()

    app = FastAPI(title="alc-coordinator", version=_version(), lifespan=lifespan,
                  docs_url=None, redoc_url=None,
                  description="Pausable strategy sessions on Redis: start, answer, observe. "
                              "Interactive docs at /docs (served offline).")
    deps = [Depends(_bearer(token))] if token else []
    router = APIRouter(dependencies=deps)
    _session_routes(router, holder, counters)
    drain = drain or Drain(0)  # unbound: streams run until they end, as in tests
    _event_route(router, holder, keepalive_s, drain)
    _activity_route(router, holder, keepalive_s, drain)
    _observer_routes(router, holder, counters)
    app.include_router(router)
    _health_route(app, holder)
    mount_docs(app)
    mount_console(app)
    _error_handlers(app)
    # Outermost last: requests are counted whatever answers them, the size refusal included.
    app.add_middleware(BodyLimit, limit=lambda: holder.get().settings.max_request_bytes)
    app.add_middleware(CountRequests, metrics=counters, routes=lambda: app.routes)
    return app


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("alc-coordinator")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "0.0.0+unknown"


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


def _session_routes(router: APIRouter, holder: _Holder, counters: ApiMetrics) -> None:
    @router.post("/sessions", status_code=201,
                 responses={201: {"model": Event}, **_errors(409, 413, 504)})
    async def start_session(body: StartRequest, timeout: Timeout = None) -> JSONResponse:
        """Start a session; returns its first event (a pause or its end) and session_id.
        503 `no_worker` at once when no live worker offers the strategy; 409
        `idempotency_conflict` when `idempotency_key` started another strategy or input."""
        budget = body.budget.model_dump(exclude_none=True) if body.budget else None
        out = await fronts.start(holder.get(), body.strategy, body.input, budget, timeout,
                                 ttl=body.ttl, idempotency_key=body.idempotency_key)
        return JSONResponse(out, status_code=201,
                            headers={"Location": f"/sessions/{out['session_id']}"})

    @router.post("/sessions/{session_id}/responses",
                 responses={200: {"model": Event}, **_errors(404, 409, 413, 504)})
    async def feed_responses(
        session_id: SessionId, body: FeedRequest, timeout: Timeout = None
    ) -> JSONResponse:
        """Answer pending queries: `accepted` while answers remain, else the next event.
        With `round`, answers for a round the session has left are refused (409
        `stale_round`) and nothing is written."""
        batch = None if body.responses is None else [
            fronts.Answer(a.query_id, a.response, a.usage) for a in body.responses]
        out = await fronts.feed(holder.get(), session_id, response=body.response,
                                query_id=body.query_id, usage=body.usage, responses=batch,
                                timeout=timeout, round=body.round)
        counters.feeds.inc(1 if batch is None else len(batch))
        return JSONResponse(out)

    @router.get("/sessions", responses={200: {"model": SessionPage}, **_errors()})
    async def list_sessions(
        phase: Annotated[Phase | None, Query(description="only sessions in this phase")] = None,
        strategy: Annotated[str | None, Query(min_length=1, max_length=200,
                                              description="only this strategy's")] = None,
        limit: Annotated[int, Query(ge=1, le=1000, description="most sessions per page")] = 100,
        cursor: Annotated[str | None, Query(min_length=1, max_length=1000, description=(
            "next_cursor of the page before"))] = None,
        pending: Annotated[str | None, _PENDING] = None,
        history: Annotated[bool, _HISTORY] = False,
    ) -> JSONResponse:
        """A page of sessions in every phase (finished ones while retained), newest activity
        first, with the count per phase; follow `next_cursor` until it is null (a page
        filtered by strategy may hold fewer than `limit`)."""
        return JSONResponse(await fronts.sessions(
            holder.get(), phase, strategy, limit, cursor, pending_filter=_pending_spec(pending),
            include_history=history))

    @router.get("/sessions/{session_id}", responses={200: {"description": "snapshot"},
                                                     **_errors(404)})
    async def get_session(
        session_id: SessionId,
        pending: Annotated[str | None, _PENDING] = None,
        history: Annotated[bool, _HISTORY] = False,
    ) -> JSONResponse:
        """One session's snapshot; a finished one's carries its result while retained."""
        return JSONResponse(await fronts.observe(holder.get(), session_id,
                                                 _pending_spec(pending), history))

    @router.delete("/sessions/{session_id}",
                   responses={200: {"model": Event}, **_errors(404, 409)})
    async def cancel_session(session_id: SessionId) -> JSONResponse:
        """Cancel a session (running or paused); 409 once it has finished."""
        return JSONResponse(await fronts.cancel(holder.get(), session_id))


def _event_route(router: APIRouter, holder: _Holder, keepalive_s: float, drain: Drain) -> None:
    @router.get("/sessions/{session_id}/events", response_class=StreamingResponse,
                responses={200: {"content": {"text/event-stream": {"schema": _SSE_EVENT}},
                                 "description": "server-sent events"}, **_errors(404)})
    async def session_events(
        session_id: SessionId,
        last_event_id: Annotated[str | None, Header(
            alias="Last-Event-ID", pattern=EVENT_ID,
            description="the id of the last event a client had: the stream resumes after "
                        "it (browsers send it when they reconnect)")] = None,
    ) -> StreamingResponse:
        """Server-sent events: the session's logs, progress, pauses, accepted answers and its
        end, each as it happens; ends after the end. Event ids come from the session's
        state, so a reconnect with Last-Event-ID gets exactly what it missed that is still
        retained (the last 20 logs, the current pause and its answers, the end)."""
        after = parse_event_id(last_event_id)
        reg = holder.get()
        await reg.status(session_id)  # a 404 now, not an error event in a 200 stream
        return StreamingResponse(
            drain.bounded(event_stream(reg, session_id, keepalive_s, after), at_once=False),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


#: One event of GET /events (no ids: a reconnecting client reads fresh counts).
_ACTIVITY_EVENT = _sse_event(
    ["counts", "session", "error"],
    "counts: sessions per phase (on connect, then after changes, at most ~4 a second); "
    "session: one session changed phase; error: Redis could not be read (the stream ends)",
    'counts: {"counts": {"running": n, "paused": n, ...}, "active_sessions": n}; session: '
    '{"session_id", "phase"}')


def _activity_route(router: APIRouter, holder: _Holder, keepalive_s: float,
                    drain: Drain) -> None:
    @router.get("/events", response_class=StreamingResponse,
                responses={200: {"content": {"text/event-stream": {"schema": _ACTIVITY_EVENT}},
                                 "description": "server-sent events"}, **_errors()})
    async def namespace_events() -> StreamingResponse:
        """Server-sent events for the whole namespace: `counts` (sessions per phase and
        `active_sessions`) on connect and, coalesced to at most about 4 a second, after
        changes; `session` ({session_id, phase}) for every phase change (started, paused,
        answered and running again, finished, cancelled, expired). No ids: a reconnecting
        client gets fresh counts. Keep-alive comments while nothing happens."""
        reg = holder.get()
        await reg.services.ready()  # Redis unreachable: a 503 now, not a broken 200 stream
        return StreamingResponse(
            drain.bounded(activity_stream(reg, keepalive_s), at_once=True),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _observer_routes(router: APIRouter, holder: _Holder, counters: ApiMetrics) -> None:
    @router.get("/strategies", responses={200: {"model": StrategyList}, **_errors()})
    async def list_strategies() -> JSONResponse:
        """The strategies live workers offer, by name: description, input parameters (from
        each strategy function's signature and docstring) and how many workers offer it."""
        return JSONResponse(await fronts.strategies(holder.get()))

    @router.get("/workers", responses={200: {"model": Fleet}, **_errors()})
    async def list_workers(
        dead: Annotated[int, Query(ge=1, le=1000, description=(
            "how many of the newest dead letters to show"))] = 20,
    ) -> JSONResponse:
        """The live workers (heartbeat key present), each as its last heartbeat reported it
        (`worker_id`, `at`, `concurrency`, `busy`, `live`, `steps`, `replays`, the other
        counters since it started, `strategies`), sorted by id; `dead_letter_count`, the
        jobs in the dead-letter streams; and `dead_letters`, the newest `dead` of them over
        every shard, newest first (`id`, `sid`, `job`, `reason`, `error`, `at`)."""
        return JSONResponse(await fronts.workers(holder.get(), dead))

    @router.get("/metrics", response_class=Response, responses={
        200: {"content": {"text/plain": {"schema": {"type": "string"}}},
              "description": "Prometheus text exposition"}, **_errors()})
    async def metrics() -> Response:
        """Prometheus metrics: sessions per phase, live workers, dead letters and each live
        worker's counters (read from Redis at scrape time), and this API process's feeds
        and requests (by method, route template and status)."""
        return Response(await scrape(holder.get(), counters), media_type=CONTENT_TYPE_LATEST)


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
        kind = {401: "unauthorized", 404: "not_found", 405: "method_not_allowed",
                413: PAYLOAD_TOO_LARGE}
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
