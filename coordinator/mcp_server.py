"""The MCP front: ``coordinator mcp`` serves algocline's session tools over stdio.

An LLM host that knows algocline drives our sessions with the same tools and the same
result shapes: ``alc_run`` / ``alc_advice`` start a session and return its first event,
``alc_continue`` answers (one response, one for ``query_id``, or a batch), ``alc_status``
observes (one session, or a bounded page of them), ``alc_cancel`` ends, and
``alc_strategies`` (also the resource ``alc://strategies``) says which strategies the live
workers offer and what input each takes. Each result is the ``to_json`` shape as JSON text;
an error is the coordinator error's ``to_json()`` as text with ``isError`` set, so the host
reads the error type the same way the HTTP API's clients do. That holds for arguments the
SDK refuses against a tool's schema too (a missing ``strategy``, a budget of 1.5, an
argument the tool does not take): ``invalid_input``, not the SDK's plain-text message.

The model reads each tool's description as its whole manual, so descriptions are one plain
paragraph (the docstring, dedented and unwrapped) that ends with what to do next with the
result; a list of sessions is a page, never the whole namespace, so one call cannot flood
the model's context.

As in algocline: the limits of ``alc_run`` ride in ``ctx.budget`` (``max_*`` keys; our
``budget`` argument is an alias), ``alc_advice``'s completed result is the whole ctx with the
strategy's result in it, ``alc_status``'s ``pending_filter`` is a preset or an object naming
the fields, a call that carries a progress token hears the session's progress as MCP
progress notifications, and cancelling a waiting ``alc_run`` / ``alc_continue``
(``notifications/cancelled``) cancels its session (``mcp_progress``). Starts take a ``ttl``
and an ``idempotency_key``.

With a Redis URL (``--redis`` / ``REDIS_URL``) the tools drive the shared deployment;
without one they run on the embedded in-process Redis with in-process workers, so the
server works on a machine with nothing else installed.
"""

from __future__ import annotations

import inspect
import json
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from importlib import metadata
from typing import Annotated, Any, Literal

from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.types import CallToolResult, InputRequiredResult, TextContent, ToolAnnotations
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, ValidationError

from . import fronts
from .errors import InvalidInput, SessionError
from .mcp_progress import EVERY_S, InFlight, Reporter
from .registry import SessionRegistry
from .settings import Settings
from .transport import Transport

DISTRIBUTION = "alc-coordinator"
#: ``alc_status`` without a session id: sessions per page unless the caller asks, and at most.
PAGE_DEFAULT, PAGE_MAX = 20, 100


def paragraph(text: str) -> str:
    """``text`` (a docstring or a wrapped string) as one paragraph: hosts show a
    description to the model as it is, so indentation and hard line breaks would reach it
    as noise."""
    return " ".join(inspect.cleandoc(text).split())


def server_version() -> str:
    """The installed distribution's version, so a host can tell which server it talks to
    (``0+unknown`` when run from a source tree that was never installed)."""
    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return "0+unknown"


INSTRUCTIONS = paragraph("""
    Run reasoning strategies that pause to ask YOU questions. alc_strategies lists the
    strategies the live workers offer and the input each takes. alc_run (or alc_advice)
    starts one; while the result's status is needs_response, answer its prompt(s) with
    alc_continue (response, or responses=[{query_id, response}] for several), until the
    status is completed, error or cancelled. alc_status shows one session, or one page of
    sessions with counts per phase. A refused call returns {"status": "error", "error",
    "type"} with isError set; its type says what went wrong (e.g. no_worker: no live worker
    offers that strategy).
""")

Phase = Literal["running", "paused", "completed", "failed", "cancelled"]
PendingPreset = Literal["meta", "preview", "full"]
PageSize = Annotated[int, Field(ge=1, le=PAGE_MAX)]
#: A session's idle ttl: the registry bounds it (at most ten years) and says so.
TtlSeconds = Annotated[float, Field(gt=0)]
IdempotencyKey = Annotated[str, Field(min_length=1, max_length=256)]


class PromptView(BaseModel):
    """How much of each pending prompt to show: off, preview (its first chars) or full."""

    model_config = ConfigDict(extra="forbid")
    mode: Literal["off", "preview", "full"] = Field(
        default="off", description="off (no prompt), preview (its first chars) or full.")
    chars: StrictInt | None = Field(default=None, ge=0, le=1_000_000, description=(
        "preview only: how many characters (default: the deployment's, 200)."))


class PendingFields(BaseModel):
    """algocline's pending filter object: which fields of each pending query to show."""

    model_config = ConfigDict(extra="forbid")
    query_id: StrictBool = Field(default=False, description="Show the query's id.")
    max_tokens: StrictBool = Field(default=False, description="Show its max_tokens.")
    system: StrictBool = Field(default=False, description="Show its system prompt.")
    grounded: StrictBool = Field(default=False, description="Show its grounded flag.")
    underspecified: StrictBool = Field(default=False, description="Show its underspecified flag.")
    prompt: PromptView | None = Field(default=None, description="Show its prompt: "
                                      '{"mode": "off" | "preview" | "full", "chars": n}.')

    def to_spec(self) -> dict[str, Any]:
        """The object as the registry takes it (algocline's field names)."""
        return self.model_dump(exclude_none=True)


class QueryResponse(BaseModel):
    """One answer of a batch: the query's id, your response, and its token usage."""

    # As in algocline's ``alc_continue``. Unknown fields are refused: a misspelt ``usage``
    # would otherwise be dropped without a word. (The docstring above is the schema's
    # description, which the model reads: one line.)
    model_config = ConfigDict(extra="forbid")
    query_id: str = Field(description='The query\'s id, e.g. "q-0", "q-1".')
    response: str = Field(description="Your answer to that query's prompt.")
    usage: dict[str, int] | None = Field(
        default=None, description='Tokens your answer used, e.g. {"completion_tokens": 42}.')


async def _result(call: Awaitable[dict[str, Any]]) -> CallToolResult:
    """The call's JSON as text; a coordinator error as its ``to_json()`` with isError."""
    try:
        out: dict[str, Any] = await call
    except SessionError as exc:
        return _error(exc)
    return _text(out)


def _text(obj: dict[str, Any], *, error: bool = False) -> CallToolResult:
    body = json.dumps(obj, ensure_ascii=False)
    return CallToolResult(content=[TextContent(type="text", text=body)], is_error=error)


def _error(exc: SessionError) -> CallToolResult:
    return _text(exc.to_json(), error=True)


class _Server(MCPServer[Any]):
    """``MCPServer`` whose argument errors are the coordinator's error JSON. The SDK
    validates arguments against a tool's schema before the tool runs, and reports a
    failure as a ``ToolError`` (its ``__cause__`` the pydantic ``ValidationError``) that
    becomes plain text; here it becomes ``InvalidInput`` like any other refused call, and
    so do arguments the tool does not take (which the SDK would drop silently) and tools
    that do not exist."""

    _params: dict[str, set[str]] | None = None

    async def call_tool(
        self, name: str, arguments: dict[str, Any], context: Context[Any, Any] | None = None
    ) -> CallToolResult | InputRequiredResult:
        params = await self._tool_params()
        if name not in params:
            return _error(InvalidInput(f"unknown tool {name!r}; the tools are "
                                       f"{', '.join(sorted(params))}"))
        unknown = sorted(set(arguments) - params[name])
        if unknown:
            return _error(InvalidInput(
                f"{name} takes no argument {', '.join(map(repr, unknown))}; its arguments "
                f"are {', '.join(sorted(params[name]))}"))
        try:
            return await super().call_tool(name, arguments, context)
        except ToolError as exc:
            if isinstance(exc.__cause__, ValidationError):
                return _error(InvalidInput(
                    f"{name}: {fronts.describe_validation(exc.__cause__.errors())}"))
            raise

    async def _tool_params(self) -> dict[str, set[str]]:
        """Each tool's argument names, from the schemas the host sees (fixed once built)."""
        if self._params is None:
            self._params = {t.name: set(t.input_schema.get("properties", {}))
                            for t in await self.list_tools()}
        return self._params


ToolFn = Callable[..., Awaitable[CallToolResult]]


def _tool(server: MCPServer, *, read_only: bool = False) -> Callable[[ToolFn], ToolFn]:
    """Register a tool under its function's name, its docstring as one paragraph."""

    def register(fn: ToolFn) -> ToolFn:
        server.add_tool(fn, name=fn.__name__, description=paragraph(fn.__doc__ or ""),
                        annotations=ToolAnnotations(read_only_hint=read_only),
                        structured_output=False)
        return fn

    return register


def build_server(reg: SessionRegistry, *, progress_every_s: float = EVERY_S) -> MCPServer:
    """The MCP server whose tools drive ``reg``. A call that carries a progress token hears
    that its session still runs every ``progress_every_s`` while it waits."""
    in_flight = InFlight(reg)
    server: MCPServer = _Server(name="alc-coordinator", version=server_version(),
                                instructions=INSTRUCTIONS, middleware=[in_flight])
    tools = _Tools(reg, in_flight, progress_every_s)
    _start_tools(server, tools)
    _session_tools(server, tools)
    _catalog(server, reg)
    return server


#: Sessions started by ``alc_advice`` whose end is still to be reported (most recent kept).
_ADVICE_KEPT = 10_000


class _Tools:
    """What the session tools share: the registry, the calls in flight (a cancel names
    them), progress reporting, and the input of the ``alc_advice`` sessions this server
    started, whose completed result is algocline's whole ctx."""

    def __init__(self, reg: SessionRegistry, in_flight: InFlight, every_s: float) -> None:
        self.reg, self.in_flight, self.every_s = reg, in_flight, every_s
        self._advice: OrderedDict[str, dict[str, Any]] = OrderedDict()

    async def start(self, mcp: Context[Any, Any], strategy: str, ctx: dict[str, Any] | None,
                    budget: dict[str, Any] | None, ttl: float | None,
                    idempotency_key: str | None, *, advice: bool = False) -> CallToolResult:
        """Start a session and wait for its first event, reporting progress, and cancelling
        the session if the call is cancelled."""
        try:  # refused arguments are the coordinator's error JSON, not a tool crash
            for value, what in ((strategy, "strategy"), (ctx, "ctx"), (budget, "budget"),
                                (idempotency_key, "idempotency_key")):
                fronts.check_wire(value, what)
        except SessionError as exc:
            return _error(exc)
        report = Reporter(mcp, self.reg, every_s=self.every_s)
        created: list[str] = []

        async def work(track: Callable[[str], None]) -> dict[str, Any]:
            def on_created(sid: str) -> None:
                created.append(sid)
                track(sid)
                report.started(sid, strategy)
                if advice:
                    self._remember(sid, ctx or {})

            async with report.waiting(lambda: created[0] if created else None):
                sid, res = await self.reg.start_execution(
                    strategy, ctx, budget=budget, ttl=ttl, idempotency_key=idempotency_key,
                    on_created=on_created)
            out = {"session_id": sid, **res.to_json(sid)}
            await report.settled(sid, out)
            return self._finish(sid, out)

        return await _result(self.in_flight.run(mcp.request_id, None, work))

    async def feed(self, mcp: Context[Any, Any], session_id: str, **answer: Any
                   ) -> CallToolResult:
        report = Reporter(mcp, self.reg, every_s=self.every_s)

        async def work(_: Callable[[str], None]) -> dict[str, Any]:
            await report.prime(session_id)
            async with report.waiting(lambda: session_id):
                out = await fronts.feed(self.reg, session_id, **answer)
            await report.settled(session_id, out)
            return self._finish(session_id, out)

        return await _result(self.in_flight.run(mcp.request_id, session_id, work))

    def _remember(self, sid: str, ctx: dict[str, Any]) -> None:
        self._advice[sid] = ctx
        self._advice.move_to_end(sid)
        if len(self._advice) > _ADVICE_KEPT:
            self._advice.popitem(last=False)

    def _finish(self, sid: str, out: dict[str, Any]) -> dict[str, Any]:
        """``out``, with an ``alc_advice`` session's completed result as algocline gives
        it: the whole ctx, ``{task, ...opts, result: <the strategy's result>}``."""
        status = out.get("status")
        if status not in ("completed", "error", "cancelled"):
            return out
        ctx = self._advice.pop(sid, None)
        if status == "completed" and ctx is not None:
            out = {**out, "result": advice_result(ctx, out.get("result"))}
        return out


def advice_result(ctx: dict[str, Any], result: Any) -> dict[str, Any]:
    """algocline's ``alc_advice`` result: ``require(strategy).run(ctx)`` returns the ctx it
    was given with the strategy's result set on it."""
    return {**ctx, "result": result}


def _start_tools(server: MCPServer, tools: _Tools) -> None:
    @_tool(server)
    async def alc_run(
        strategy: Annotated[str, Field(
            description='The strategy\'s name as alc_strategies lists it, e.g. "cot", '
                        '"reflect", "sc".')],
        request: Context[Any, Any],
        ctx: Annotated[dict[str, Any] | None, Field(
            description='The strategy\'s input (a JSON object of the parameters '
                        'alc_strategies lists for it), e.g. {"task": "..."}; limits may ride '
                        'in it as algocline\'s {"budget": {"max_llm_calls": n, "max_tokens": '
                        'n, "max_elapsed_ms": n}}.')] = None,
        budget: Annotated[dict[str, int | None] | None, Field(
            description='Optional limits on the session, the same as ctx.budget: '
                        '{"max_llm_calls": n, "max_tokens": n, "max_elapsed_ms": n} (also '
                        'taken as {"llm_calls", "tokens", "elapsed_ms"}).')] = None,
        ttl: Annotated[TtlSeconds | None, Field(
            description="Seconds the session may wait idle for your answers before it "
                        "expires (default: the deployment's).")] = None,
        idempotency_key: Annotated[IdempotencyKey | None, Field(
            description="Your own id for this start: a retry with the same key (same "
                        "strategy and ctx) returns the same session instead of starting "
                        "another.")] = None,
    ) -> CallToolResult:
        """Start a session of a strategy with ctx as its input, and return its first
        event. Usually that is {"status": "needs_response", "session_id", ...} with one
        query (query_id, prompt, system, max_tokens) or several (queries: [{id, prompt,
        ...}]): answer each pending query with alc_continue, and keep answering until the
        status is "completed" (read result), "error" (read error and type) or "cancelled".
        Call alc_strategies first if you do not know the strategy's name or input; an
        error of type no_worker means no live worker offers the strategy."""
        return await tools.start(request, strategy, ctx, budget, ttl, idempotency_key)

    @_tool(server)
    async def alc_advice(
        strategy: Annotated[str, Field(
            description='The strategy\'s name as alc_strategies lists it, e.g. "reflect".')],
        request: Context[Any, Any],
        task: Annotated[str | None, Field(
            description="The task or question the strategy works on.")] = None,
        opts: Annotated[dict[str, Any] | None, Field(
            description='Other inputs of the strategy, merged with task, e.g. '
                        '{"rounds": 2} (a "budget" among them limits the session).')] = None,
        ttl: Annotated[TtlSeconds | None, Field(
            description="Seconds the session may wait idle for your answers before it "
                        "expires (default: the deployment's).")] = None,
        idempotency_key: Annotated[IdempotencyKey | None, Field(
            description="Your own id for this start: a retry with the same key returns the "
                        "same session instead of starting another.")] = None,
    ) -> CallToolResult:
        """Apply a strategy to a task: alc_run with ctx = {"task": task, **opts}. Returns
        the session's first event, usually "needs_response": answer each pending query
        with alc_continue until the status is "completed", "error" or "cancelled". As in
        algocline, the completed result is the whole ctx with the strategy's own result
        in it: {"task", ...opts, "result": {...}}."""
        ctx = dict(opts or {})
        if task is not None:
            ctx["task"] = task
        return await tools.start(request, strategy, ctx, None, ttl, idempotency_key,
                                 advice=True)


def _session_tools(server: MCPServer, tools: _Tools) -> None:
    reg = tools.reg

    @_tool(server)
    async def alc_continue(
        session_id: Annotated[str, Field(
            description="The session_id that alc_run or alc_advice returned.")],
        request: Context[Any, Any],
        response: Annotated[str | None, Field(
            description="Your answer, when one query is pending (with query_id, to one of "
                        "several).")] = None,
        query_id: Annotated[str | None, Field(
            description='The id of the query that response answers, e.g. "q-1"; needed '
                        'when several are pending.')] = None,
        responses: Annotated[list[QueryResponse] | None, Field(
            description="Several answers at once: [{query_id, response, usage}], instead "
                        "of response.")] = None,
        usage: Annotated[dict[str, int] | None, Field(
            description='Tokens your response used, e.g. {"prompt_tokens": 120, '
                        '"completion_tokens": 42}: they replace the estimates.')] = None,
    ) -> CallToolResult:
        """Answer a paused session's pending queries: response alone when one query is
        pending, response with query_id for one of several, or responses=[{query_id,
        response}] for several at once. Returns {"status": "accepted", "remaining": n}
        while answers of the round are still missing (answer those too), else the
        session's next event: "needs_response" again (answer its queries with
        alc_continue), or its end: "completed" (read result), "error" or "cancelled"."""
        batch = None if responses is None else [
            fronts.Answer(r.query_id, r.response, r.usage) for r in responses]
        return await tools.feed(request, session_id, response=response, query_id=query_id,
                                usage=usage, responses=batch)

    @_tool(server, read_only=True)
    async def alc_status(
        session_id: Annotated[str | None, Field(
            description="The session to inspect; omit it to list sessions one page at a "
                        "time.")] = None,
        pending_filter: Annotated[PendingPreset | PendingFields | None, Field(
            description="Include the pending queries: meta (ids), preview (plus the start "
                        "of each prompt), full (every field), or an object naming the "
                        "fields, e.g. {\"query_id\": true, \"prompt\": {\"mode\": "
                        "\"preview\", \"chars\": 80}}.")] = None,
        include_history: Annotated[bool, Field(
            description="Include the last 10 exchanges (prompt and response).")] = False,
        limit: Annotated[PageSize | None, Field(
            description=f"Listing only: the most sessions on the page, 1 to {PAGE_MAX} "
                        f"(default {PAGE_DEFAULT}).")] = None,
        phase: Annotated[Phase | None, Field(
            description="Listing only: just the sessions in this phase.")] = None,
        strategy: Annotated[str | None, Field(
            description="Listing only: just the sessions of this strategy.")] = None,
        cursor: Annotated[str | None, Field(
            description="Listing only: the next_cursor of the previous page, to read the "
                        "next page (give the same filters).")] = None,
    ) -> CallToolResult:
        """Look at sessions without changing them. With session_id: that session's
        snapshot (phase, strategy, metrics, progress, recent logs; its pending queries
        with pending_filter; its result or error once finished). Without it: one page of
        at most limit sessions (default 20), newest activity first, optionally of one
        phase or strategy, as {"active_sessions", "counts" (sessions per phase),
        "sessions", "next_cursor"}. The page is not the whole list: while next_cursor is
        not null, call alc_status again with cursor=next_cursor and the same filters to
        read the next page. A paused session's queries are answered with alc_continue."""
        pf = pending_filter.to_spec() if isinstance(pending_filter, PendingFields) \
            else pending_filter
        return await _result(_status(reg, session_id, pf, include_history,
                                     limit=limit, phase=phase, strategy=strategy,
                                     cursor=cursor))

    @_tool(server)
    async def alc_cancel(
        session_id: Annotated[str, Field(description="The session to cancel.")],
    ) -> CallToolResult:
        """Cancel a running or paused session; returns {"status": "cancelled", "stats"}.
        A session that has already ended cannot be cancelled (an error of type
        invalid_transition names its phase); to try again, start a new one with
        alc_run."""
        return await _result(fronts.cancel(reg, session_id))


async def _status(
    reg: SessionRegistry, session_id: str | None, pending_filter: str | dict[str, Any] | None,
    include_history: bool, *, limit: int | None, phase: str | None, strategy: str | None,
    cursor: str | None,
) -> dict[str, Any]:
    """One session's snapshot, or one bounded page of sessions: listing everything an
    LLM host asked about would put a whole namespace into its context."""
    if session_id:
        paging = [n for n, v in (("limit", limit), ("phase", phase), ("strategy", strategy),
                                 ("cursor", cursor)) if v is not None]
        if paging:
            raise InvalidInput(f"{', '.join(paging)} page the list of sessions; give them "
                               "without session_id, or drop them to see that one session",
                               session_id=session_id)
        return await fronts.observe(reg, session_id, pending_filter, include_history)
    fronts.check_wire(strategy, "strategy")
    fronts.check_wire(cursor, "cursor")
    return await fronts.sessions(
        reg, phase=phase, strategy=strategy, limit=PAGE_DEFAULT if limit is None else limit,
        cursor=cursor, pending_filter=pending_filter, include_history=include_history)


def _catalog(server: MCPServer, reg: SessionRegistry) -> None:
    @_tool(server, read_only=True)
    async def alc_strategies() -> CallToolResult:
        """List the strategies that live workers offer, by name: for each its
        description, its input parameters (name, required, default, annotation) and how
        many live workers offer it. Start one with alc_run (strategy = its name, ctx = an
        object of its parameters) or alc_advice (strategy and task). An empty list means
        no worker is running: sessions cannot start until one is."""
        return await _result(fronts.strategies(reg))

    @server.resource("alc://strategies", name="strategies", mime_type="application/json",
                     description=paragraph("""
                        The strategies live workers offer, with their description and input
                        parameters: the same JSON as the alc_strategies tool."""))
    async def strategies_resource() -> str:
        return json.dumps(await fronts.strategies(reg), ensure_ascii=False)


async def run_stdio(settings: Settings, *, modules: list[str] | None = None) -> None:
    """Serve on stdin/stdout until the host closes stdin."""
    if settings.url is None:
        from .embedded import embedded

        async with embedded(settings, modules=modules) as reg:
            await build_server(reg).run_stdio_async()
        return
    transport = Transport.from_url(settings.url, timeout_s=settings.redis_timeout_s,
                                   allow_eviction=settings.allow_eviction)
    async with SessionRegistry(transport, settings=settings) as reg:
        await build_server(reg).run_stdio_async()
