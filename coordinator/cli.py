"""``coordinator``: run workers, drive sessions as a host, observe them.

JSON goes to stdout where a program reads it (``start``, ``continue``, ``cancel``, ``status
SESSION``, ``status --json``); people get tables and progress lines (``status``, ``run``).
The Redis URL comes from ``--redis`` or ``REDIS_URL``; with neither, only ``run`` works, on
the embedded default.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import math
import os
import signal
import sys
from collections.abc import AsyncIterator
from typing import Any, NoReturn

from .errors import InvalidInput, SessionError
from .models import Finished, Paused, PendingFilter
from .records import server_now_ms
from .registry import SessionRegistry
from .responders import Responder, make_responder
from .settings import Settings
from .transport import Transport


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors as the CLI's other errors: the usage line for people on
    stderr, then ``InvalidInput``, which ``main`` prints as JSON with exit code 2 (argparse
    itself would print only text, which a program driving the CLI cannot parse).
    Subcommand parsers are made of this class too (argparse uses the parent's type)."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        raise InvalidInput(f"{self.prog}: {message}")


#: The most strategy steps one worker may run at once; more is a typo, not a plan.
MAX_CONCURRENCY = 10_000
DEFAULT_CONCURRENCY = 8
#: What ``--log-level`` takes (uvicorn's names too, for ``serve``).
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


def _log_level(value: str) -> str:
    level = value.strip().lower()
    if level not in LOG_LEVELS:
        raise argparse.ArgumentTypeError(
            f"{value!r} is not a log level; use one of {', '.join(LOG_LEVELS)}")
    return level.upper()


def _concurrency(value: str) -> int:
    """1 or more: 0 or -3 is a mistake to say, not to round up to 1 quietly."""
    try:
        n = int(value)
    except ValueError:
        n = 0
    if not 1 <= n <= MAX_CONCURRENCY:
        raise argparse.ArgumentTypeError(
            f"must be an integer from 1 to {MAX_CONCURRENCY}, got {value!r}")
    return n


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


def _port(value: str) -> int:
    try:
        port = int(value)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"must be a TCP port from 0 to 65535, got {value!r}")
    return port


def _parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="coordinator",
        description="Distributed coordinator for pausable strategy sessions, on Redis.",
    )
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--redis", default=None,
                        help="Redis URL (default: $REDIS_URL; `run` falls back to embedded)")
        sp.add_argument("--namespace", default=None, help="key namespace (default: alc)")
        sp.add_argument("--shards", type=int, default=None, metavar="S",
                        help="shards of a new namespace (default: $ALC_SHARDS, else 1 on "
                             "one Redis, 4 per primary on a Cluster); fixed once created")

    w = sub.add_parser("worker", help="run a worker process")
    common(w)
    w.add_argument("--import", dest="modules", action="append", default=[],
                   metavar="MODULE", help="import MODULE to register its strategies (repeatable)")
    # The environment's ALC_CONCURRENCY is read after parsing (``_check_args``), so a bad
    # one is an error of `worker`, not a crash of every command, `--help` included.
    w.add_argument("--concurrency", type=_concurrency, default=None,
                   help=f"strategy steps run at once, 1 to {MAX_CONCURRENCY} "
                        f"(default $ALC_CONCURRENCY or {DEFAULT_CONCURRENCY})")
    w.add_argument("--log-level", type=_log_level, default="INFO",
                   help=f"one of {', '.join(LOG_LEVELS)} (default info)")
    w.add_argument("--serve-shards", type=_shard_list, default=None, metavar="LIST",
                   help="serve only these shards of the namespace, e.g. 0,3,5-7 (default: "
                        "all; every shard needs some worker serving it)")

    def session_inputs(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("strategy")
        sp.add_argument("--task", default=None, help="shorthand for --input '{\"task\": TEXT}'")
        sp.add_argument("--input", default=None, help="strategy input as a JSON object")
        sp.add_argument("--budget", default=None,
                        help='JSON, e.g. {"llm_calls": 10, "tokens": 5000, "elapsed_ms": 60000}')
        sp.add_argument("--timeout", type=_seconds, default=None,
                        help="seconds to wait per event")

    r = sub.add_parser("run", help="start a session and drive it to its end as the host")
    common(r)
    session_inputs(r)
    r.add_argument("--responder", default="terminal",
                   help="terminal (default), echo, or 'cmd:SHELL COMMAND' (prompt on stdin)")
    r.add_argument("--import", dest="modules", action="append", default=[], metavar="MODULE",
                   help="embedded mode: import MODULE for its strategies (repeatable)")
    r.add_argument("--json", action="store_true", help="print only the final JSON")

    s = sub.add_parser("start", help="start a session; prints its first event as JSON")
    common(s)
    session_inputs(s)

    c = sub.add_parser("continue", help="answer a pending query; prints the result as JSON")
    common(c)
    c.add_argument("session_id")
    c.add_argument("response")
    c.add_argument("--query-id", default=None, help="needed when several queries are pending")
    c.add_argument("--timeout", type=_seconds, default=None)

    st = sub.add_parser("status", help="list paused sessions, or show one session")
    common(st)
    st.add_argument("session_id", nargs="?")
    st.add_argument("--pending", choices=[f.value for f in PendingFilter], default=None)
    st.add_argument("--history", action="store_true")
    st.add_argument("--json", action="store_true", help="JSON instead of a table")

    x = sub.add_parser("cancel", help="cancel a session")
    common(x)
    x.add_argument("session_id")

    sv = sub.add_parser("serve", help="serve the HTTP API (needs the [api] extra)")
    common(sv)
    sv.add_argument("--host", default="127.0.0.1",
                    help="bind address (default 127.0.0.1; any other needs a token)")
    sv.add_argument("--port", type=_port, default=8000)
    sv.add_argument("--token", default=os.environ.get("ALC_API_TOKEN") or None,
                    help="bearer token clients must send (default: $ALC_API_TOKEN)")
    sv.add_argument("--log-level", type=_log_level, default="INFO",
                    help=f"one of {', '.join(LOG_LEVELS)} (default info)")

    m = sub.add_parser("mcp", help="MCP server on stdio for LLM hosts (needs the [api] extra)")
    common(m)
    m.add_argument("--import", dest="modules", action="append", default=[], metavar="MODULE",
                   help="embedded mode: import MODULE for its strategies (repeatable)")
    return p


def main(argv: list[str] | None = None) -> None:
    command = None
    try:
        try:
            args = _parser().parse_args(argv)
            command = args.command
            _check_args(args)
            handler = {
                "worker": _worker, "run": _run, "start": _start, "continue": _continue,
                "status": _status, "cancel": _cancel, "serve": _serve, "mcp": _mcp,
            }[args.command]
            code = asyncio.run(handler(args))
        except SessionError as exc:
            print(json.dumps(exc.to_json()),
                  file=sys.stdout if command != "run" else sys.stderr)
            code = 2
    except KeyboardInterrupt:
        code = 130
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
                           "(only `coordinator run` has an embedded default)")
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


def _emit(obj: Any) -> None:
    print(json.dumps(obj, ensure_ascii=False, indent=2))


# -- worker ------------------------------------------------------------------------------

async def _worker(args: argparse.Namespace) -> int:
    from workers import catalog, supervisor
    from workers.watchdog import Watchdog, block_limit
    from workers.worker import Worker

    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = _settings(args)
    if settings.url is None:
        raise InvalidInput("a worker needs Redis: pass --redis URL or set REDIS_URL")
    if supervisor.wanted():
        # The worker runs as our child, replaced when strategy code wedges it; the URL goes
        # to it by environment, never on a command line others can read.
        argv = [sys.executable, "-m", "coordinator", "worker",
                "--concurrency", str(args.concurrency), "--log-level", args.log_level,
                *(f"--import={m}" for m in args.modules),
                *(["--namespace", args.namespace] if args.namespace else []),
                *(["--shards", str(args.shards)] if args.shards is not None else []),
                *(["--serve-shards", ",".join(map(str, args.serve_shards))]
                  if args.serve_shards else [])]
        env = {**os.environ, "REDIS_URL": settings.url}
        return await supervisor.Supervisor(argv, env, settings).run()
    catalog.load(args.modules)
    transport = Transport.from_url(settings.url, timeout_s=settings.redis_timeout_s,
                                   allow_eviction=settings.allow_eviction)
    worker = Worker(transport, settings, concurrency=args.concurrency,
                    serve_shards=args.serve_shards)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, worker.stop)
    # A strategy holding the loop is interrupted (or this process ended) by the watchdog.
    with Watchdog(*block_limit(settings)), supervisor.beats(worker.stop):
        await worker.run()
    return 0


# -- fronts: HTTP API and MCP server -------------------------------------------------------

async def _serve(args: argparse.Namespace) -> int:
    from .http_api import serve

    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    await serve(_settings(args), args.host, args.port, args.token, log_level=args.log_level)
    return 0


async def _mcp(args: argparse.Namespace) -> int:
    from .mcp_server import run_stdio

    await run_stdio(_settings(args), modules=args.modules)
    return 0


# -- host commands -----------------------------------------------------------------------

async def _start(args: argparse.Namespace) -> int:
    data, budget = _session_input(args)
    async with _registry(args) as reg:
        sid, res = await reg.start_execution(args.strategy, data, budget=budget,
                                             timeout=args.timeout)
        _emit({"session_id": sid, **res.to_json(sid)})
    return 0


async def _continue(args: argparse.Namespace) -> int:
    async with _registry(args) as reg:
        qid = args.query_id or await reg.resolve_sole_pending_id(args.session_id)
        res = await reg.feed_response(args.session_id, qid, args.response, timeout=args.timeout)
        _emit(res.to_json(args.session_id))
    return 0


async def _cancel(args: argparse.Namespace) -> int:
    async with _registry(args) as reg:
        res = await reg.cancel(args.session_id)
        _emit(res.to_json(args.session_id))
    return 0


async def _status(args: argparse.Namespace) -> int:
    async with _registry(args) as reg:
        if args.session_id:
            _emit(await reg.status(args.session_id, args.pending, args.history))
            return 0
        snaps = await reg.list_snapshots(args.pending, args.history)
        if args.json:
            _emit(snaps)
            return 0
        print(_table(snaps))
        print(_workers(await reg.worker_stats()))
        total, dead = await reg.dead_letters(5)
        print(f"\ndead letters: {total}")
        for d in dead:
            print(f"  {d.get('sid') or '-'}  {d.get('reason')}: {d.get('error', '')[:120]}")
    return 0


def _workers(stats: dict[str, dict[str, Any]]) -> str:
    now = server_now_ms()  # heartbeats and activity are stamped on Redis's clock
    lines = [f"\nworkers: {len(stats)}"]
    for wid, r in sorted(stats.items()):
        if not r:
            lines.append(f"  {wid}  (its report does not decode)")
            continue
        lines.append(
            f"  {wid}  heartbeat {max(0.0, now - r.get('at', now)) / 1000:.1f} s ago, "
            f"busy {r.get('busy', '?')}/{r.get('concurrency', '?')}, live {r.get('live', '?')}; "
            f"steps {r.get('steps', '?')} (replays {r.get('replays', '?')}, "
            f"claimed {r.get('claimed', '?')}, fenced {r.get('fenced_rejections', '?')}, "
            f"errors {r.get('step_errors', '?')}, dead letters {r.get('dead_letters', '?')})")
    return "\n".join(lines)


def _table(snaps: dict[str, dict[str, Any]]) -> str:
    if not snaps:
        return "no paused sessions"
    now = server_now_ms()  # heartbeats and activity are stamped on Redis's clock
    rows = [("SESSION", "STRATEGY", "PHASE", "PENDING", "ROUNDS", "CALLS", "IDLE")]
    for sid, s in sorted(snaps.items(), key=lambda kv: kv[1].get("last_activity_at", 0)):
        m = s.get("metrics", {})
        rows.append((sid, str(s.get("strategy", "?")), str(s.get("phase")),
                     str(s.get("pending_queries", "-")), str(m.get("rounds", "-")),
                     str(m.get("llm_calls", "-")),
                     f"{max(0.0, now - s.get('last_activity_at', now)) / 1000:.0f}s"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
                     for r in rows)


# -- run: the host loop --------------------------------------------------------------------

async def _run(args: argparse.Namespace) -> int:
    data, budget = _session_input(args)
    responder = make_responder(args.responder)
    settings = _settings(args)

    def say(msg: str) -> None:
        if not args.json:
            print(msg, file=sys.stderr)

    if settings.url is None:
        from .embedded import embedded

        say("no Redis URL given: using the embedded in-process Redis with 2 workers")
        async with embedded(settings, modules=args.modules) as reg:
            return await _drive(reg, args, data, budget, responder, say)
    async with _registry(args) as reg:
        return await _drive(reg, args, data, budget, responder, say)


async def _drive(
    reg: SessionRegistry, args: argparse.Namespace, data: dict[str, Any],
    budget: dict[str, int] | None, responder: Responder, say: Any,
) -> int:
    sid, res = await reg.start_execution(args.strategy, data, budget=budget,
                                         timeout=args.timeout)
    say(f"session {sid} ({args.strategy})")
    seen = _Seen()
    while isinstance(res, Paused):
        await _show_progress(reg, sid, seen, say)
        for q in res.queries:
            say(f"\n[{q.id}] {_clip(q.prompt)}")
            answer = await responder(q)
            say(f"  -> {_clip(answer)}")
            res = await reg.feed_response(sid, q.id, answer, timeout=args.timeout)
    await _show_progress(reg, sid, seen, say)
    assert isinstance(res, Finished)
    _emit({"session_id": sid, **res.to_json(sid)})
    return 0 if res.state.value == "completed" else 1


class _Seen:
    """What the run loop has shown already, so each log line and progress step shows once."""

    def __init__(self) -> None:
        self.logs: set[tuple[int, str]] = set()
        self.progress: dict[str, Any] | None = None


async def _show_progress(reg: SessionRegistry, sid: str, seen: _Seen, say: Any) -> None:
    metrics = (await reg.status(sid)).get("metrics", {})
    for entry in metrics.get("recent_logs", []):
        key = (int(entry.get("ts", 0)), str(entry.get("msg")))
        if key not in seen.logs:
            seen.logs.add(key)
            say(f"  log [{entry.get('level')}] {entry.get('msg')}")
    prog = metrics.get("progress")
    if prog and prog != seen.progress:
        seen.progress = prog
        msg = f" {prog['message']}" if prog.get("message") else ""
        say(f"  progress {prog['step']}/{prog['total']}{msg}")


def _clip(text: str, limit: int = 300) -> str:
    one = text.replace("\n", " / ")
    return one if len(one) <= limit else one[: limit - 1] + "…"


if __name__ == "__main__":
    main()
