"""``coordinator``: run workers, drive sessions as a host, observe them.

JSON goes to stdout where a program reads it (``start``, ``continue``, ``wait``, ``cancel``,
``status SESSION``, and ``status``/``sessions``/``strategies`` with ``--json``), errors
included, as ``{"status": "error", "error", "type", "session_id", ...}``; people get
tables (``status``, ``sessions``, ``strategies``) and the live view of ``run`` on stderr.
The exit code is the error's (``SessionError.exit_code``): 0 done, 1 the session failed or
was cancelled, 2 the call was refused, 3 not found, 4 try again later, 5 fix the
deployment, 130 interrupted.

The Redis URL comes from ``--redis`` or ``REDIS_URL``; with neither, only ``run`` and
``mcp`` work, on an embedded in-process Redis with its own workers.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.metadata
import json
import math
import os
import shlex
import signal
import sys
from collections.abc import AsyncIterator, Callable
from typing import Any, NoReturn

from . import fronts
from .console import (
    RunView,
    counts_line,
    dead_letters_text,
    session_details,
    sessions_table,
    stdout_console,
    strategies_table,
    workers_text,
)
from .errors import InvalidInput, NoPendingQuery, SessionError
from .logs import FORMATS, configure_logging
from .models import Paused, PendingFilter
from .registry import SessionRegistry
from .responders import DEFAULT_PARALLEL, make_responder
from .runner import INTERRUPTED, HostRun, RunOptions, emit, error_json, event_json, outcome
from .settings import Settings
from .states import Phase
from .transport import Transport

DISTRIBUTION = "alc-coordinator"


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors as the CLI's other errors: the usage line for people on
    stderr, then ``InvalidInput``, which ``main`` prints as JSON with its exit code (argparse
    itself would print only text, which a program driving the CLI cannot parse).
    Subcommand parsers are made of this class too (argparse uses the parent's type)."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        raise InvalidInput(f"{self.prog}: {message}")


#: The most strategy steps one worker may run at once; more is a typo, not a plan.
MAX_CONCURRENCY = 10_000
DEFAULT_CONCURRENCY = 8
#: The most responder commands ``run`` starts at once.
MAX_PARALLEL = 256
#: What ``--log-level`` takes (uvicorn's names too, for ``serve``).
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


def version() -> str:
    try:
        return importlib.metadata.version(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        return "unknown (not installed: pip install -e .)"


def _log_level(value: str) -> str:
    level = value.strip().lower()
    if level not in LOG_LEVELS:
        raise argparse.ArgumentTypeError(
            f"{value!r} is not a log level; use one of {', '.join(LOG_LEVELS)}")
    return level.upper()


def _int_in(lo: int, hi: int) -> Callable[[str], int]:
    """An integer from ``lo`` to ``hi``: 0 or -3 is a mistake to say, not to round quietly."""
    def parse(value: str) -> int:
        try:
            n = int(value)
        except ValueError:
            n = lo - 1
        if not lo <= n <= hi:
            raise argparse.ArgumentTypeError(
                f"must be an integer from {lo} to {hi}, got {value!r}")
        return n
    return parse


_concurrency = _int_in(1, MAX_CONCURRENCY)


def _shard_list(value: str) -> tuple[int, ...]:
    """``0,3,5-7``: the shards a worker serves (checked against the namespace at start)."""
    out: list[int] = []
    try:
        for part in value.split(","):
            lo, sep, hi = part.strip().partition("-")
            first, last = int(lo), int(hi) if sep else int(lo)
            if not 0 <= first <= last < 4096:
                raise ValueError
            out.extend(range(first, last + 1))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"must be shard numbers and ranges such as 0,3,5-7, got {value!r}") from None
    return tuple(sorted(set(out)))


def _seconds(value: str) -> float:
    """A wait in seconds: finite and >= 0 (argparse's float would take 'nan' and '-1')."""
    try:
        seconds = float(value)
    except ValueError:
        seconds = math.nan
    if not 0 <= seconds < 1e9:
        raise argparse.ArgumentTypeError(
            f"must be a number of seconds >= 0 and < 1e9, got {value!r}")
    return seconds


def _ttl(value: str) -> float:
    """A session's idle ttl in seconds: finite and > 0 (the registry bounds it above)."""
    try:
        seconds = float(value)
    except ValueError:
        seconds = math.nan
    if not 0 < seconds < math.inf:
        raise argparse.ArgumentTypeError(f"must be a number of seconds > 0, got {value!r}")
    return seconds


def _port(value: str) -> int:
    try:
        port = int(value)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"must be a TCP port from 0 to 65535, got {value!r}")
    return port


# -- the parser ----------------------------------------------------------------------------

_SID = "s-1a227b221e9-2d89e98d559f93f90ee229edd45062c0"  # as `start` prints one


def _parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="coordinator", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Distributed coordinator for pausable strategy sessions, on Redis.",
        epilog="examples:\n"
               "  coordinator run reflect --task 'Design a rate limiter' --responder echo\n"
               "  coordinator worker --redis redis://127.0.0.1:6379/0\n"
               "  coordinator sessions --redis redis://127.0.0.1:6379/0\n"
               "Run `coordinator COMMAND --help` for a command's options and examples.",
    )
    p.add_argument("--version", action="version", version=f"%(prog)s {version()}",
                   help="print the version and exit")
    sub = p.add_subparsers(dest="command", required=True)

    def command(name: str, summary: str, details: str, *examples: str) -> argparse.ArgumentParser:
        return sub.add_parser(
            name, help=summary, description=f"{summary[:1].upper()}{summary[1:]}.\n\n{details}",
            epilog="examples:\n" + "\n".join(f"  {e}" for e in examples),
            formatter_class=argparse.RawDescriptionHelpFormatter)

    _worker_parser(command)
    _run_parser(command)
    _host_parsers(command)
    _observer_parsers(command)
    _front_parsers(command)
    return p


_Command = Callable[..., argparse.ArgumentParser]


def _connection(sp: argparse.ArgumentParser, *, embedded: bool = False) -> None:
    fallback = ("without either, an embedded in-process Redis with its own workers, gone "
                "when the command ends" if embedded else "one of the two is required")
    sp.add_argument("--redis", default=None, metavar="URL",
                    help=f"Redis URL, e.g. redis://127.0.0.1:6379/0 (default: $REDIS_URL; "
                         f"{fallback})")
    sp.add_argument("--namespace", default=None, metavar="NS",
                    help="key namespace, so several deployments can share one Redis "
                         "(default: $ALC_NAMESPACE or alc)")
    sp.add_argument("--shards", type=int, default=None, metavar="S",
                    help="shards of a new namespace (default: $ALC_SHARDS, else 1 on "
                         "one Redis, 4 per primary on a Cluster); fixed once created")


def _log_options(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--log-level", type=_log_level, default="INFO", metavar="LEVEL",
                    help=f"one of {', '.join(LOG_LEVELS)} (default info)")
    sp.add_argument("--log-format", choices=FORMATS, default="text",
                    help="text (default) for people, json for log shippers: one object "
                         "per line with ts, level, logger, message, session_id")


def _worker_parser(command: _Command) -> None:
    w = command("worker", "run a worker process",
                "Workers run the strategies' steps. Start as many as you like, on any "
                "machine that reaches the Redis;\neach serves every session whose strategy "
                "it has (the built-ins cot, reflect, sc, and those of --import).",
                "coordinator worker --redis redis://127.0.0.1:6379/0",
                "coordinator worker --redis $URL --import my_strategies --concurrency 32",
                "coordinator worker --redis $URL --log-format json --metrics-port 9100")
    _connection(w)
    w.add_argument("--import", dest="modules", action="append", default=[],
                   metavar="MODULE", help="import MODULE to register its strategies (repeatable)")
    # The environment's ALC_CONCURRENCY is read after parsing (``_check_args``), so a bad
    # one is an error of `worker`, not a crash of every command, `--help` included.
    w.add_argument("--concurrency", type=_concurrency, default=None, metavar="N",
                   help=f"strategy steps run at once, 1 to {MAX_CONCURRENCY} "
                        f"(default $ALC_CONCURRENCY or {DEFAULT_CONCURRENCY})")
    _log_options(w)
    w.add_argument("--metrics-port", type=_port, default=None, metavar="PORT",
                   help="serve Prometheus metrics (steps, latency, claims, ...) on "
                        "http://0.0.0.0:PORT/metrics (default: off)")
    w.add_argument("--serve-shards", type=_shard_list, default=None, metavar="LIST",
                   help="serve only these shards of the namespace, e.g. 0,3,5-7 (default: "
                        "all; every shard needs some worker serving it)")


def _session_inputs(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("strategy", help="the strategy's name (`coordinator strategies` lists them)")
    sp.add_argument("--task", default=None, metavar="TEXT",
                    help="shorthand for --input '{\"task\": TEXT}'")
    sp.add_argument("--input", default=None, metavar="JSON",
                    help="the strategy's input as a JSON object")
    sp.add_argument("--budget", default=None, metavar="JSON",
                    help='limits, e.g. {"max_llm_calls": 10, "max_tokens": 5000, '
                         '"max_elapsed_ms": 60000} (the same as an input\'s "budget"; '
                         'llm_calls, tokens, elapsed_ms are taken too)')
    sp.add_argument("--timeout", type=_seconds, default=None, metavar="S",
                    help="seconds to wait for each event (default: $ALC_WAIT_TIMEOUT_S or "
                         "300); the session carries on after it")
    sp.add_argument("--ttl", type=_ttl, default=None, metavar="S",
                    help="seconds the session may wait idle for answers before it expires "
                         "(default: $ALC_SESSION_TTL_S or 3600)")
    sp.add_argument("--idempotency-key", default=None, metavar="KEY",
                    help="your own id for this start: running the command again with the "
                         "same key (and the same strategy and input) picks up the same "
                         "session instead of starting another")


def _run_parser(command: _Command) -> None:
    r = command(
        "run", "start a session and drive it to its end as the host",
        "Answers each prompt at the terminal, by echo or by a command, shows the strategy's "
        "progress and logs\non stderr, and prints the final JSON on stdout. Ctrl-C cancels "
        "the session (exit 130); so does a\nfailing responder or an ended stdin (exit 1), "
        "unless --leave-paused.",
        "coordinator run reflect --task 'Design a rate limiter'",
        "coordinator run sc --input '{\"task\": \"2+2?\", \"n\": 5}' --responder echo --json",
        "coordinator run cot --task 'x' --responder 'cmd:llm -m gpt-4o' --parallel 8 "
        "--redis $URL")
    _connection(r, embedded=True)
    _session_inputs(r)
    r.add_argument("--responder", default="terminal", metavar="WHO",
                   help="terminal (default: you type each answer), echo (the prompt is the "
                        "answer), or 'cmd:SHELL COMMAND' (prompt on stdin, answer on stdout)")
    r.add_argument("--parallel", type=_int_in(1, MAX_PARALLEL), default=DEFAULT_PARALLEL,
                   metavar="N", help=f"cmd: responder: queries of a batch answered at once "
                                     f"(default {DEFAULT_PARALLEL})")
    r.add_argument("--leave-paused", action="store_true",
                   help="when the responder fails or you press Ctrl-C, leave the session "
                        "as it is and print the commands that pick it up, instead of "
                        "cancelling it (needs --redis)")
    r.add_argument("--import", dest="modules", action="append", default=[], metavar="MODULE",
                   help="embedded mode: import MODULE for its strategies (repeatable)")
    r.add_argument("--json", action="store_true",
                   help="show no progress or logs: print only the final JSON")


def _host_parsers(command: _Command) -> None:
    s = command("start", "start a session; prints its first event as JSON",
                "Prints the session id on stderr at once, then waits for the first event.",
                "coordinator start reflect --task 'Design a rate limiter' --redis $URL",
                "coordinator start sc --input '{\"task\": \"2+2?\", \"n\": 3}' --timeout 60")
    _connection(s)
    _session_inputs(s)

    c = command("continue", "answer a pending query; prints the result as JSON",
                "Prints {\"status\": \"accepted\"} while the round has unanswered queries, "
                "else the session's next event.\nExits 1 when the session ends failed or "
                "cancelled.",
                f"coordinator continue {_SID} 'my answer' --redis $URL",
                f"coordinator continue {_SID} --query-id q-1 'second answer'")
    _connection(c)
    c.add_argument("session_id", help="the session's id, as start or run printed it")
    c.add_argument("response", help="the answer")
    c.add_argument("--query-id", default=None, metavar="Q",
                   help="the query answered (q-0, q-1, ...); needed when several are pending")
    c.add_argument("--timeout", type=_seconds, default=None, metavar="S",
                   help="seconds to wait for the next event (default: $ALC_WAIT_TIMEOUT_S or "
                        "300)")

    wt = command("wait", "wait for a session's next event; prints it as JSON",
                 "Re-attaches to a session (after a timeout, or from another shell) and "
                 "prints the same JSON as\ncontinue: its pending queries, or its end. Exits 1 "
                 "when the session ended failed or cancelled.",
                 f"coordinator wait {_SID} --redis $URL",
                 f"coordinator wait {_SID} --timeout 600")
    _connection(wt)
    wt.add_argument("session_id", help="the session's id")
    wt.add_argument("--timeout", type=_seconds, default=None, metavar="S",
                    help="seconds to wait while it runs (default: $ALC_WAIT_TIMEOUT_S or 300)")

    x = command("cancel", "cancel a session; prints it as JSON",
                "Ends a running or paused session as cancelled; a worker still stepping it "
                "is fenced out.",
                f"coordinator cancel {_SID} --redis $URL")
    _connection(x)
    x.add_argument("session_id", help="the session's id")


def _observer_parsers(command: _Command) -> None:
    st = command("status", "show one session, or the namespace at a glance",
                 "With a session id: its snapshot as JSON. Without: the sessions per phase, "
                 "the paused ones, live workers\nand dead letters (--json: the paused "
                 "sessions' snapshots by id).",
                 "coordinator status --redis $URL",
                 f"coordinator status {_SID} --pending full --history",
                 "coordinator status --pending preview --json")
    _connection(st)
    st.add_argument("session_id", nargs="?", help="the session to show (default: all paused)")
    st.add_argument("--pending", choices=[f.value for f in PendingFilter], default=None,
                    help="show the pending queries: meta (ids and max_tokens), preview (+ the "
                         "prompt's first 200 characters) or full")
    st.add_argument("--history", action="store_true",
                    help="show the last exchanges (prompt and answer) of each session")
    st.add_argument("--json", action="store_true", help="JSON instead of a table")

    ss = command("sessions", "list sessions of any phase, a page at a time",
                 "Newest activity first, with the counts per phase above; finished sessions "
                 "are listed while retained.\nThe next page's cursor is printed below the "
                 "table.",
                 "coordinator sessions --redis $URL",
                 "coordinator sessions --phase failed --limit 20",
                 "coordinator sessions --strategy reflect --cursor CURSOR --json")
    _connection(ss)
    ss.add_argument("--phase", choices=[p.value for p in Phase], default=None,
                    help="only sessions in this phase")
    ss.add_argument("--strategy", default=None, metavar="NAME",
                    help="only sessions of this strategy")
    ss.add_argument("--limit", type=_int_in(1, 1000), default=100, metavar="N",
                    help="sessions per page, 1 to 1000 (default 100)")
    ss.add_argument("--cursor", default=None, metavar="C",
                    help="the next page's cursor, as the previous page printed it")
    ss.add_argument("--json", action="store_true",
                    help='JSON: {"active_sessions", "counts", "sessions", "next_cursor"}')

    sg = command("strategies", "list the strategies live workers offer",
                 "Each with its description, its input parameters (from the strategy "
                 "function's signature)\nand how many live workers offer it.",
                 "coordinator strategies --redis $URL",
                 "coordinator strategies --json")
    _connection(sg)
    sg.add_argument("--json", action="store_true", help='JSON: {"strategies": [...]}')


def _front_parsers(command: _Command) -> None:
    sv = command("serve", "serve the HTTP API and the web console (needs the [api] extra)",
                 "The host calls over HTTP and SSE, with OpenAPI docs at /docs and "
                 "Prometheus metrics at /metrics; people open the console at /ui.",
                 "coordinator serve --redis $URL",
                 "coordinator serve --import my_strategies   # embedded, console at /ui",
                 "coordinator serve --redis $URL --host 0.0.0.0 --token $ALC_API_TOKEN "
                 "--log-format json")
    _connection(sv, embedded=True)
    sv.add_argument("--import", dest="modules", action="append", default=[], metavar="MODULE",
                    help="embedded mode: import MODULE for its strategies (repeatable)")
    sv.add_argument("--host", default="127.0.0.1",
                    help="bind address (default 127.0.0.1; any other needs a token)")
    sv.add_argument("--port", type=_port, default=8000, help="TCP port (default 8000)")
    sv.add_argument("--grace", type=_int_in(1, 3600), default=10, metavar="S",
                    help="on SIGTERM/SIGINT, seconds in-flight requests may finish; open "
                         "event streams end before it runs out (default 10)")
    sv.add_argument("--token", default=os.environ.get("ALC_API_TOKEN") or None,
                    help="bearer token clients must send (default: $ALC_API_TOKEN)")
    _log_options(sv)

    m = command("mcp", "MCP server on stdio for LLM hosts (needs the [api] extra)",
                "An LLM host (Claude Desktop, an agent SDK) starts it and drives sessions "
                "through its tools.",
                "coordinator mcp --redis $URL",
                "coordinator mcp --import my_strategies")
    _connection(m, embedded=True)
    m.add_argument("--import", dest="modules", action="append", default=[], metavar="MODULE",
                   help="embedded mode: import MODULE for its strategies (repeatable)")


# -- main ----------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> None:
    args: argparse.Namespace | None = None
    try:
        try:
            args = _parser().parse_args(argv)
            _check_args(args)
            handler = {
                "worker": _worker, "run": _run, "start": _start, "continue": _continue,
                "wait": _wait, "status": _status, "sessions": _sessions,
                "strategies": _strategies, "cancel": _cancel, "serve": _serve, "mcp": _mcp,
            }[args.command]
            code = asyncio.run(handler(args))
        except SessionError as exc:
            # on stdout, where a program reads the JSON, but for `run`: its stdout is the
            # session's final JSON only
            print(json.dumps(error_json(exc, getattr(args, "session_id", None))),
                  file=sys.stderr if getattr(args, "command", None) == "run" else sys.stdout)
            code = exc.exit_code
    except KeyboardInterrupt:
        code = INTERRUPTED
    except BrokenPipeError:
        # Whoever read our output went away (``| head``). What the command did is done; say
        # nothing more, and exit as a shell reports a SIGPIPE, without a traceback (nor one
        # from the interpreter's own flush of stdout at exit).
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = 128 + signal.SIGPIPE
    sys.exit(code)


def _check_args(args: argparse.Namespace) -> None:
    """What argparse cannot check by itself, refused before anything runs: the worker's
    concurrency from the environment, and every ``--import`` module, imported now so a typo
    or a module that fails to import is a JSON error here, not a traceback from inside the
    worker or the embedded cluster (they import them again; that is a no-op then)."""
    if args.command == "worker" and args.concurrency is None:
        raw = os.environ.get("ALC_CONCURRENCY")
        try:
            args.concurrency = DEFAULT_CONCURRENCY if raw is None else _concurrency(raw)
        except argparse.ArgumentTypeError as exc:
            raise InvalidInput(f"ALC_CONCURRENCY {exc}") from None
    modules: list[str] = getattr(args, "modules", [])
    if modules:
        _import_modules(modules)


def _import_modules(modules: list[str]) -> None:
    from workers import catalog

    catalog.load([])  # the built-ins first, as the worker loads them
    for name in modules:
        try:
            catalog.load([name])
        except ModuleNotFoundError as exc:
            raise InvalidInput(f"--import {name}: no module named {exc.name!r} (is it "
                               "installed, or its directory on PYTHONPATH?)") from None
        except Exception as exc:  # whatever the module's own code raised on import
            raise InvalidInput(f"--import {name}: importing it raised "
                               f"{type(exc).__name__}: {exc}") from None


def _settings(args: argparse.Namespace) -> Settings:
    return Settings.from_url(args.redis, namespace=args.namespace, shards=args.shards)


@contextlib.asynccontextmanager
async def _registry(args: argparse.Namespace) -> AsyncIterator[SessionRegistry]:
    settings = _settings(args)
    if settings.url is None:
        raise InvalidInput("no Redis URL: pass --redis URL or set REDIS_URL "
                           "(only `coordinator run`, `serve` and `mcp` have an embedded default)")
    transport = Transport.from_url(settings.url, timeout_s=settings.redis_timeout_s,
                                   allow_eviction=settings.allow_eviction)
    async with SessionRegistry(transport, settings=settings) as reg:
        yield reg


def _session_input(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, int] | None]:
    data: dict[str, Any] = {}
    if args.input:
        data = _json_arg("--input", args.input)
        if not isinstance(data, dict):
            raise InvalidInput("--input must be a JSON object")
    if args.task is not None:
        data["task"] = args.task
    budget = None
    if args.budget:
        budget = _json_arg("--budget", args.budget)
    return data, budget


def _json_arg(flag: str, raw: str) -> Any:
    """A flag's JSON. json.loads raises more than JSONDecodeError on hostile text: a
    RecursionError when nested too deeply, a ValueError for an integer of over 4300
    digits; each is the user's mistake, said as one."""
    try:
        return json.loads(raw)
    except RecursionError:
        raise InvalidInput(f"{flag} is nested too deeply to parse as JSON") from None
    except json.JSONDecodeError as exc:
        raise InvalidInput(f"{flag} is not valid JSON: {exc}") from None
    except ValueError:  # Python's limit on int() of a long digit string
        raise InvalidInput(f"{flag} holds an integer of over 4300 digits; send it as a "
                           "string") from None


# -- worker ------------------------------------------------------------------------------

async def _worker(args: argparse.Namespace) -> int:
    from workers import catalog, supervisor
    from workers.metrics import start_metrics_server
    from workers.watchdog import Watchdog, block_limit
    from workers.worker import Worker

    configure_logging(args.log_level, args.log_format)
    settings = _settings(args)
    if settings.url is None:
        raise InvalidInput("a worker needs Redis: pass --redis URL or set REDIS_URL")
    if supervisor.wanted():
        # The worker runs as our child, replaced when strategy code wedges it; the URL goes
        # to it by environment, never on a command line others can read.
        argv = [sys.executable, "-m", "coordinator", "worker",
                "--concurrency", str(args.concurrency), "--log-level", args.log_level,
                "--log-format", args.log_format,
                *(f"--import={m}" for m in args.modules),
                *(["--namespace", args.namespace] if args.namespace else []),
                *(["--shards", str(args.shards)] if args.shards is not None else []),
                *(["--metrics-port", str(args.metrics_port)]
                  if args.metrics_port is not None else []),
                *(["--serve-shards", ",".join(map(str, args.serve_shards))]
                  if args.serve_shards else [])]
        env = {**os.environ, "REDIS_URL": settings.url}
        return await supervisor.Supervisor(argv, env, settings).run()
    catalog.load(args.modules)
    transport = Transport.from_url(settings.url, timeout_s=settings.redis_timeout_s,
                                   allow_eviction=settings.allow_eviction)
    worker = Worker(transport, settings, concurrency=args.concurrency,
                    serve_shards=args.serve_shards)
    metrics = None
    if args.metrics_port is not None:
        try:
            metrics = start_metrics_server(worker, args.metrics_port)
        except OSError as exc:
            raise InvalidInput(f"--metrics-port {args.metrics_port}: cannot listen there "
                               f"({exc.strerror or exc}); pick a free port") from None
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, worker.stop)
    try:
        # A strategy holding the loop is interrupted (or this process ended) by the watchdog.
        with Watchdog(*block_limit(settings)), supervisor.beats(worker.stop):
            await worker.run()
    finally:
        if metrics is not None:
            metrics.close()
    return 0


# -- fronts: HTTP API and MCP server -------------------------------------------------------

async def _serve(args: argparse.Namespace) -> int:
    from .http_api import serve

    configure_logging(args.log_level, args.log_format)
    await serve(_settings(args), args.host, args.port, args.token, log_level=args.log_level,
                grace_s=args.grace, modules=args.modules)
    return 0


async def _mcp(args: argparse.Namespace) -> int:
    from .mcp_server import run_stdio

    await run_stdio(_settings(args), modules=args.modules)
    return 0


# -- host commands -----------------------------------------------------------------------

async def _start(args: argparse.Namespace) -> int:
    data, budget = _session_input(args)

    def created(sid: str) -> None:
        print(f"session {sid} ({args.strategy})", file=sys.stderr, flush=True)
        args.session_id = sid  # errors from here on name it

    async with _registry(args) as reg:
        sid, res = await reg.start_execution(
            args.strategy, data, budget=budget, ttl=args.ttl,
            idempotency_key=args.idempotency_key, timeout=args.timeout, on_created=created)
        emit(event_json(sid, res))
    return outcome(res)


async def _continue(args: argparse.Namespace) -> int:
    async with _registry(args) as reg:
        qid = args.query_id or await _sole_pending(reg, args.session_id)
        res = await reg.feed_response(args.session_id, qid, args.response, timeout=args.timeout)
        emit(event_json(args.session_id, res))
    return outcome(res)


async def _sole_pending(reg: SessionRegistry, sid: str) -> str:
    """The one pending query; with several, a message in the CLI's words (``--query-id``)."""
    try:
        return await reg.resolve_sole_pending_id(sid)
    except NoPendingQuery as exc:
        event = await reg.wait_event(sid, timeout=0)
        if not isinstance(event, Paused) or len(event.queries) < 2:
            raise
        ids = ", ".join(q.id for q in event.queries)
        raise NoPendingQuery(
            f"{len(event.queries)} queries are pending ({ids}): pass --query-id to say "
            f"which one this answers, e.g. coordinator continue {sid} --query-id "
            f"{event.queries[0].id} ANSWER", session_id=sid, state="paused") from exc


async def _wait(args: argparse.Namespace) -> int:
    async with _registry(args) as reg:
        res = await reg.wait_event(args.session_id, timeout=args.timeout)
        emit(event_json(args.session_id, res))
    return outcome(res)


async def _cancel(args: argparse.Namespace) -> int:
    async with _registry(args) as reg:
        emit(await fronts.cancel(reg, args.session_id))
    return 0


# -- observing -----------------------------------------------------------------------------

async def _status(args: argparse.Namespace) -> int:
    async with _registry(args) as reg:
        if args.session_id:
            emit(await reg.status(args.session_id, args.pending, args.history))
            return 0
        if args.json:
            emit(await reg.list_snapshots(args.pending, args.history))
            return 0
        counts = await reg.counts()
        paused = await reg.list_sessions(phase="paused", pending_filter=args.pending,
                                         include_history=args.history)
        running = await reg.list_sessions(phase="running")
        workers = await reg.worker_stats()
        dead_total, dead = await reg.dead_letters(5)
    waiting = sum(1 for s in running.sessions if s.get("waiting_for_worker"))
    out = stdout_console()
    out.print(counts_line(counts, waiting))
    if waiting and not workers:
        out.print("no live worker: start one (coordinator worker --redis URL)", markup=False)
    if paused.sessions:
        out.print(sessions_table(paused.sessions))
        for line in session_details(paused.sessions):
            out.print(line, soft_wrap=True)
        if paused.next_cursor:
            out.print(f"(more paused sessions: coordinator sessions --phase paused "
                      f"--cursor {paused.next_cursor})", markup=False, soft_wrap=True)
    else:
        out.print("paused sessions: none")
    print(workers_text(workers))
    print(dead_letters_text(dead_total, dead))
    return 0


async def _sessions(args: argparse.Namespace) -> int:
    async with _registry(args) as reg:
        page = await fronts.sessions(reg, args.phase, args.strategy, args.limit, args.cursor)
    if args.json:
        emit(page)
        return 0
    waiting = sum(1 for s in page["sessions"] if s.get("waiting_for_worker"))
    out = stdout_console()
    out.print(counts_line(page["counts"], waiting))
    if page["sessions"]:
        out.print(sessions_table(page["sessions"]))
    else:
        out.print("no sessions" + (" on this page" if args.cursor else ""))
    if page["next_cursor"]:
        again = ["coordinator", "sessions",
                 *(["--phase", args.phase] if args.phase else []),
                 *(["--strategy", args.strategy] if args.strategy else []),
                 *(["--limit", str(args.limit)] if args.limit != 100 else []),
                 "--cursor", page["next_cursor"]]
        out.print(f"next page: {shlex.join(again)}", markup=False, soft_wrap=True)
    return 0


async def _strategies(args: argparse.Namespace) -> int:
    async with _registry(args) as reg:
        offered = await fronts.strategies(reg)
    if args.json:
        emit(offered)
        return 0
    out = stdout_console()
    if offered["strategies"]:
        out.print(strategies_table(offered["strategies"]))
    else:
        out.print("no live worker offers any strategy: start one "
                  "(coordinator worker --redis URL [--import MODULE])", markup=False)
    return 0


# -- run: the host loop --------------------------------------------------------------------

async def _run(args: argparse.Namespace) -> int:
    data, budget = _session_input(args)
    view = RunView(quiet=args.json)
    responder = make_responder(args.responder, parallel=args.parallel, show=view.ask)
    options = RunOptions(args.strategy, timeout=args.timeout, ttl=args.ttl,
                         idempotency_key=args.idempotency_key, leave_paused=args.leave_paused,
                         connection=(*(["--redis", args.redis] if args.redis else []),
                                     *(["--namespace", args.namespace] if args.namespace
                                       else [])))
    settings = _settings(args)
    if settings.url is None:
        if args.leave_paused:
            raise InvalidInput("--leave-paused needs --redis URL (or REDIS_URL): the embedded "
                               "Redis, and every session in it, ends with this command")
        from .embedded import embedded

        view.note("no Redis URL given: using the embedded in-process Redis with 2 workers")
        async with embedded(settings, modules=args.modules) as reg:
            return await _host(HostRun(reg, options, view, responder), args, data, budget)
    async with _registry(args) as reg:
        return await _host(HostRun(reg, options, view, responder), args, data, budget)


async def _host(host: HostRun, args: argparse.Namespace, data: dict[str, Any],
                budget: dict[str, int] | None) -> int:
    try:
        return await host.run(data, budget)
    finally:
        args.session_id = host.sid  # the error ``main`` prints names the session
