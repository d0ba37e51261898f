"""The MCP front: ``coordinator mcp`` serves algocline's session tools over stdio.

An LLM host that knows algocline drives our sessions with the same tools and the same
result shapes: ``alc_run`` / ``alc_advice`` start a session and return its first event,
``alc_continue`` answers (one response, one for ``query_id``, or a batch), ``alc_status``
observes, ``alc_cancel`` ends. Each result is the ``to_json`` shape as JSON text; an error
is the coordinator error's ``to_json()`` as text with ``isError`` set, so the host reads
the error type the same way the HTTP API's clients do. That holds for arguments the SDK
refuses against a tool's schema too (a missing ``strategy``, a budget of 1.5, an argument
the tool does not take): ``invalid_input``, not the SDK's plain-text message.

With a Redis URL (``--redis`` / ``REDIS_URL``) the tools drive the shared deployment;
without one they run on the embedded in-process Redis with in-process workers, so the
server works on a machine with nothing else installed.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable
from typing import Annotated, Any, Literal

from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.types import CallToolResult, InputRequiredResult, TextContent
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from . import fronts
from .errors import InvalidInput, SessionError
from .registry import SessionRegistry
from .settings import Settings
from .transport import Transport

INSTRUCTIONS = (
    "Run reasoning strategies that pause to ask YOU questions. alc_run / alc_advice start "
    "one; while the result's status is needs_response, answer its prompt(s) with "
    "alc_continue (response, or responses=[{query_id, response}] for several), until "
    "status is completed, error or cancelled."
)


class QueryResponse(BaseModel):
    """One answer of a batch, as in algocline's ``alc_continue``. Unknown fields are
    refused: a misspelt ``usage`` would otherwise be dropped without a word."""

    model_config = ConfigDict(extra="forbid")
    query_id: str = Field(description='Query ID, e.g. "q-0", "q-1".')
    response: str = Field(description="Your response to that query's prompt.")
    usage: dict[str, int] | None = Field(
        default=None, description='Token usage, e.g. {"completion_tokens": 42}.')


async def _result(call: Awaitable[dict[str, Any]]) -> CallToolResult:
    """The call's JSON as text; a coordinator error as its ``to_json()`` with isError."""
    try:
        out: dict[str, Any] = await call
    except SessionError as exc:
        return _text(exc.to_json(), error=True)
    return _text(out)


def _text(obj: dict[str, Any], *, error: bool = False) -> CallToolResult:
    body = json.dumps(obj, ensure_ascii=False)
    return CallToolResult(content=[TextContent(type="text", text=body)], is_error=error)


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


def _error(exc: SessionError) -> CallToolResult:
    return _text(exc.to_json(), error=True)


def build_server(reg: SessionRegistry) -> MCPServer:
    """The MCP server whose tools drive ``reg``."""
    server: MCPServer = _Server(name="alc-coordinator", instructions=INSTRUCTIONS)

    @server.tool(name="alc_run", structured_output=False)
    async def alc_run(
        strategy: Annotated[str, Field(description='Strategy name, e.g. "cot", "reflect", "sc".')],
        ctx: Annotated[dict[str, Any] | None, Field(
            description='The strategy input (JSON object), e.g. {"task": "..."}.')] = None,
        budget: Annotated[dict[str, int] | None, Field(
            description='Limits: {"llm_calls": n, "tokens": n, "elapsed_ms": n}.')] = None,
    ) -> CallToolResult:
        """Run a strategy by name with ctx as its input. Returns its first event: usually
        {"status": "needs_response", "session_id", "query_id", "prompt", ...}; answer with
        alc_continue."""
        return await _result(fronts.start(reg, strategy, ctx, budget))

    @server.tool(name="alc_advice", structured_output=False)
    async def alc_advice(
        strategy: Annotated[str, Field(description='Strategy name: "cot", "reflect", "sc", ...')],
        task: Annotated[str | None, Field(description="The task or question.")] = None,
        opts: Annotated[dict[str, Any] | None, Field(
            description='Strategy options merged into its input, e.g. {"rounds": 2}.')] = None,
    ) -> CallToolResult:
        """Apply a strategy to a task (shorthand for alc_run with ctx = {task, **opts})."""
        ctx = dict(opts or {})
        if task is not None:
            ctx["task"] = task
        return await _result(fronts.start(reg, strategy, ctx))

    @server.tool(name="alc_continue", structured_output=False)
    async def alc_continue(
        session_id: Annotated[str, Field(description="Session ID returned by alc_run.")],
        response: Annotated[str | None, Field(
            description="Single response; query_id may be omitted when one query is "
                        "pending.")] = None,
        query_id: Annotated[str | None, Field(
            description="Query ID for a partial feed; needed when several are pending.")] = None,
        responses: Annotated[list[QueryResponse] | None, Field(
            description="Batch: several {query_id, response, usage} at once.")] = None,
        usage: Annotated[dict[str, int] | None, Field(
            description='Token usage of `response`, e.g. {"completion_tokens": 42}.')] = None,
    ) -> CallToolResult:
        """Continue a paused session with your response(s). Returns {"status": "accepted",
        "remaining": n} while answers of the round remain, else the next event."""
        batch = None if responses is None else [
            fronts.Answer(r.query_id, r.response, r.usage) for r in responses]
        return await _result(fronts.feed(reg, session_id, response=response,
                                         query_id=query_id, usage=usage, responses=batch))

    @server.tool(name="alc_status", structured_output=False)
    async def alc_status(
        session_id: Annotated[str | None, Field(
            description="Session to inspect; omit to list every paused session.")] = None,
        pending_filter: Annotated[Literal["meta", "preview", "full"] | None, Field(
            description="Show pending queries: meta (ids), preview (+200 chars), full.")] = None,
        include_history: Annotated[bool, Field(
            description="Include the last 10 exchanges.")] = False,
    ) -> CallToolResult:
        """Observe sessions: one session's snapshot (with its result once finished), or
        every paused session's snapshot keyed by session id."""
        return await _result(fronts.observe(reg, session_id, pending_filter, include_history))

    @server.tool(name="alc_cancel", structured_output=False)
    async def alc_cancel(
        session_id: Annotated[str, Field(description="Session to cancel.")],
    ) -> CallToolResult:
        """Cancel a running or paused session."""
        return await _result(fronts.cancel(reg, session_id))

    return server


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
