"""The CLI's commands as a user meets them: ``--version``, help with a description and
examples for every command and help for every option, ``wait``, ``sessions``,
``strategies``, ``status`` (counts, ``--pending``, ``--history``), ``start`` printing the
session id at once or failing at once without a worker, ``continue``'s messages and exit
codes, ``cancel``'s JSON, and ``worker --log-format json --metrics-port``.

Help and version run in this process; the rest are real CLI processes against a real
redis-server, with real worker processes where a session must run.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import redis

from coordinator import cli
from coordinator.errors import WaitTimeout
from coordinator.models import Paused
from tests.helpers import assert_eventually, free_port
from tests.procs import WAIT_S, CliResult, WorkerPool, new_namespace, run_cli
from tests.strategies_mp import hold_keys, prompt_for
from tests.test_cli_support import cli as cli_proc
from tests.test_cli_support import conn, registry, session_phase

COMMANDS = ("worker", "run", "start", "continue", "wait", "cancel", "status", "sessions",
            "strategies", "serve", "mcp")
#: The commands that fall back to the embedded in-process Redis without a URL.
EMBEDDED = {"run", "serve", "mcp"}


def in_process(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exit_:
        cli.main(list(argv))
    out, err = capsys.readouterr()
    assert isinstance(exit_.value.code, int), (exit_.value.code, out, err)
    return exit_.value.code, out


# -- version and help ------------------------------------------------------------------------


def test_version_prints_the_installed_distributions_version(
    capsys: pytest.CaptureFixture[str]
) -> None:
    code, out = in_process(capsys, "--version")
    assert code == 0
    assert out == f"coordinator {importlib.metadata.version('alc-coordinator')}\n"


def _entries(help_text: str, section: str) -> list[tuple[str, str]]:
    """(invocation, help) of each entry of a section of argparse's help (the help may be
    on the invocation's line, after two spaces, or indented on the next lines)."""
    if f"\n{section}:\n" not in help_text:
        return []
    body = help_text.split(f"\n{section}:\n", 1)[1].split("\n\n", 1)[0].splitlines()
    entries: list[tuple[str, str]] = []
    for line in body:
        if re.match(r"^  \S", line):
            invocation, _, text = line.strip().partition("  ")
            entries.append((invocation, text.strip()))
        elif entries and line.startswith("      "):
            invocation, text = entries[-1]
            entries[-1] = (invocation, f"{text} {line.strip()}".strip())
    return entries


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_a_description_examples_and_help_for_every_option(
    capsys: pytest.CaptureFixture[str], command: str
) -> None:
    code, text = in_process(capsys, command, "--help")
    assert code == 0
    description = text.split("\n\n")[1]
    assert description.strip() and not description.startswith(("options", "positional")), text
    examples = text.split("\nexamples:\n", 1)[1].splitlines()
    assert examples and all(e.startswith(f"  coordinator {command}") for e in examples), text
    options = _entries(text, "options") + _entries(text, "positional arguments")
    assert {"--redis URL", "--namespace NS"} <= {o for o, _ in options}, options
    missing = [o for o, helptext in options if not helptext]
    assert not missing, f"`coordinator {command}` options without help: {missing}\n{text}"
    redis_help = dict(options)["--redis URL"]
    if command in EMBEDDED:
        assert "embedded" in redis_help, redis_help
    else:
        assert "embedded" not in redis_help and "required" in redis_help, redis_help


def test_the_top_level_help_lists_every_command_with_examples(
    capsys: pytest.CaptureFixture[str]
) -> None:
    code, text = in_process(capsys, "--help")
    assert code == 0
    listed = re.findall(r"^    (\S+)", text, flags=re.M)
    assert set(listed) == set(COMMANDS), listed
    assert "--version" in text and "\nexamples:\n  coordinator run " in text, text


# -- helpers for the commands against Redis --------------------------------------------------


async def call(*args: str, code: int = 0) -> Any:
    """A JSON command: its exit code checked, its stdout parsed."""
    result = await run_cli(*args)
    assert result.code == code, f"{args}: {result}"
    assert "Traceback" not in result.stdout + result.stderr, str(result)
    return result.json()


async def table(*args: str) -> CliResult:
    result = await run_cli(*args)
    assert result.code == 0, f"{args}: {result}"
    assert "\x1b[" not in result.stdout, "control codes in a piped table"
    return result


# -- without a worker: fail at once, and say what waits ---------------------------------------


@pytest.mark.redis
async def test_without_a_worker_start_and_run_fail_at_once_and_status_says_what_waits(
    redis_url: str, namespace: str
) -> None:
    where = conn(redis_url, namespace)
    started, ran, offered = await asyncio.gather(
        run_cli("start", "cot", "--task", "x", *where),
        run_cli("run", "cot", "--task", "x", "--responder", "echo", *where),
        table("strategies", *where))
    assert started.code == 4 and started.json()["type"] == "no_worker", str(started)
    assert "coordinator worker" in started.json()["error"], str(started)
    assert ran.code == 4 and ran.stdout == "", str(ran)
    assert json.loads(ran.stderr.strip().splitlines()[-1])["type"] == "no_worker", str(ran)
    assert "no live worker offers any strategy" in offered.stdout, offered.stdout

    async with registry(redis_url, namespace) as reg:
        queued = await reg.submit("cot", {"task": "x"})  # queued for a worker to come
    status = await table("status", *where)
    assert "sessions: running 1 (1 waiting for a worker), paused 0, completed 0, failed 0, " \
           "cancelled 0" in status.stdout, status.stdout
    assert "no live worker: start one" in status.stdout, status.stdout
    assert "no paused sessions" not in status.stdout, status.stdout
    listing = await table("sessions", *where)
    assert re.search(rf"{queued}\s+cot\s+running \(waiting for a worker\)", listing.stdout), \
        listing.stdout

    timed_out = await call("wait", queued, "--timeout", "0.2", *where, code=4)
    assert (timed_out["type"], timed_out["session_id"]) == ("wait_timeout", queued), timed_out
    missing = await call("status", "s-0-" + "0" * 32, *where, code=3)
    assert missing["type"] == "not_found" and missing["session_id"] == "s-0-" + "0" * 32


# -- with a worker ----------------------------------------------------------------------------


@pytest.mark.slow
async def test_wait_prints_the_event_as_continue_does_and_exits_1_for_a_failed_or_cancelled(
    redis_url: str, namespace: str, worker_pool: WorkerPool
) -> None:
    await worker_pool.start()
    where = conn(redis_url, namespace)
    async with registry(redis_url, namespace) as reg:
        sid, first = await reg.start_execution(
            "mp-rounds", {"tag": "w", "rounds": 1, "width": 1}, timeout=WAIT_S)
        broke, _ = await reg.start_execution(
            "mp-rounds", {"tag": "b", "rounds": 2, "width": 1}, budget={"llm_calls": 1},
            timeout=WAIT_S)
        dropped, _ = await reg.start_execution("cot", {"task": "x"}, timeout=WAIT_S)
        await reg.cancel(dropped)
    assert isinstance(first, Paused)
    assert await call("wait", sid, *where) == {"session_id": sid, **first.to_json(sid)}

    done = await call("continue", sid, "the answer", *where)
    assert done["status"] == "completed" and done["session_id"] == sid, done
    assert await call("wait", sid, *where) == done  # re-attached: the same JSON

    failed = await call("continue", broke, "a", *where, code=1)
    assert (failed["status"], failed["type"], failed["session_id"]) == (
        "error", "budget_exceeded", broke), failed
    assert await call("wait", broke, *where, code=1) == failed
    cancelled = await call("wait", dropped, *where, code=1)
    assert (cancelled["status"], cancelled["session_id"]) == ("cancelled", dropped), cancelled


@pytest.mark.slow
async def test_start_prints_the_session_id_while_it_still_waits(
    redis_url: str, namespace: str, worker_pool: WorkerPool
) -> None:
    """The one worker's only slot is held by a step (``mp-hold``), so ``start`` waits: the
    id is on stderr before any event, and an error of the wait names the session."""
    await worker_pool.start(concurrency=1)
    where = conn(redis_url, namespace)
    keys = hold_keys("busy")
    client = redis.Redis.from_url(redis_url)
    try:
        async with registry(redis_url, namespace) as reg:
            held, _ = await reg.start_execution("mp-hold", {"tag": "busy", "url": redis_url},
                                                timeout=WAIT_S)
            with pytest.raises(WaitTimeout):  # answered; its next step is held
                await reg.feed_response(held, "q-0", "go", timeout=0.1)
        assert await asyncio.to_thread(client.blpop, [keys["entered"]], int(WAIT_S)), \
            f"the mp-hold step was never held\n{worker_pool.logs()}"
        async with cli_proc("start", "cot", "--task", "x", *where) as start:
            line = await start.read_err_until("session ")
            sid = line.split()[1]
            assert line == f"session {sid} (cot)\n"
            assert start.proc.returncode is None  # still waiting for the first event
            assert await session_phase(redis_url, namespace, sid) == "running"
            timed_out = await call("start", "cot", "--task", "y", "--timeout", "0.3", *where,
                                   code=4)
            assert timed_out["type"] == "wait_timeout" and timed_out["session_id"], timed_out
            client.rpush(keys["go"], "go")
            result = await start.finish()
    finally:
        client.rpush(keys["go"], "go")
        client.close()
    assert result.code == 0, str(result)
    assert result.json()["session_id"] == sid and result.json()["status"] == "needs_response"


@pytest.mark.slow
async def test_sessions_lists_every_phase_a_page_at_a_time(
    redis_url: str, namespace: str, worker_pool: WorkerPool
) -> None:
    await worker_pool.start()
    where = conn(redis_url, namespace)
    async with registry(redis_url, namespace) as reg:
        paused, _ = await reg.start_execution("mp-rounds", {"tag": "p", "rounds": 1,
                                                            "width": 1}, timeout=WAIT_S)
        completed, _ = await reg.start_execution("mp-rounds", {"tag": "c", "rounds": 1,
                                                               "width": 1}, timeout=WAIT_S)
        await reg.feed_response(completed, "q-0", "a", timeout=WAIT_S)
        failed, _ = await reg.start_execution("mp-rounds", {"tag": "f", "rounds": 2,
                                                            "width": 1},
                                              budget={"llm_calls": 1}, timeout=WAIT_S)
        await reg.feed_response(failed, "q-0", "a", timeout=WAIT_S)
        cancelled, _ = await reg.start_execution("cot", {"task": "x"}, timeout=WAIT_S)
        await reg.cancel(cancelled)
    every = {paused, completed, failed, cancelled}

    page = await call("sessions", "--json", *where)
    assert set(page) == {"active_sessions", "counts", "sessions", "next_cursor"}, page
    assert page["counts"] == {"running": 0, "paused": 1, "completed": 1, "failed": 1,
                              "cancelled": 1}
    assert page["active_sessions"] == 1 and page["next_cursor"] is None
    assert {s["session_id"] for s in page["sessions"]} == every

    seen: list[str] = []
    args = ["sessions", "--limit", "3", *where]
    for _ in range(3):
        out = (await table(*args)).stdout
        assert out.startswith("sessions: running 0, paused 1, completed 1, failed 1, "
                              "cancelled 1\n"), out
        seen += [sid for sid in every if sid in out]
        more = re.search(r"^next page: (.+)$", out, flags=re.M)
        if more is None:
            break
        args = [*shlex.split(more.group(1))[1:], *where]
        assert "--limit" in args and "--cursor" in args, args
    assert sorted(seen) == sorted(every), seen

    only_failed = (await table("sessions", "--phase", "failed", *where)).stdout
    assert re.search(rf"{failed}\s+mp-rounds\s+failed \(budget_exceeded\)", only_failed), \
        only_failed
    assert paused not in only_failed and completed not in only_failed
    bad = await call("sessions", "--phase", "bogus", *where, code=2)
    assert bad["type"] == "invalid_input" and "--phase" in bad["error"], bad


@pytest.mark.slow
async def test_strategies_lists_what_live_workers_offer_with_their_inputs(
    redis_url: str, namespace: str, worker_pool: WorkerPool
) -> None:
    await worker_pool.start()
    where = conn(redis_url, namespace)
    offered = await call("strategies", "--json", *where)
    by_name = {s["name"]: s for s in offered["strategies"]}
    assert {"cot", "reflect", "sc", "mp-rounds"} <= set(by_name), by_name
    rounds = by_name["mp-rounds"]
    assert rounds["workers"] == 1 and rounds["description"].startswith("``rounds`` rounds")
    assert {"name": "rounds", "required": False, "default": 5, "annotation": "int"} in \
        rounds["params"], rounds
    out = (await table("strategies", *where)).stdout
    assert re.search(r"^mp-rounds\s+1\s+tag: str = \"\", rounds: int = 5, width: int = 3\s+"
                     r"``rounds`` rounds", out, flags=re.M), out
    assert re.search(r"^cot\s+1\s+task: str = \"\", depth: int = 3\s+Chain of thought",
                     out, flags=re.M), out


@pytest.mark.slow
async def test_status_shows_pending_queries_and_history_only_when_asked(
    redis_url: str, namespace: str, worker_pool: WorkerPool
) -> None:
    await worker_pool.start()
    where = conn(redis_url, namespace)
    async with registry(redis_url, namespace) as reg:
        sid, _ = await reg.start_execution("mp-rounds", {"tag": "st", "rounds": 2, "width": 2},
                                           timeout=WAIT_S)
        await reg.feed_response(sid, "q-0", "answer zero", timeout=WAIT_S)
        await reg.feed_response(sid, "q-1", "answer one", timeout=WAIT_S)
    plain = (await table("status", *where)).stdout
    assert sid in plain and "sessions: running 0, paused 1," in plain, plain
    assert "pending q-0" not in plain and "answer zero" not in plain, plain
    assert "workers: 1" in plain, plain

    full = (await table("status", "--pending", "full", "--history", *where)).stdout
    assert f"  pending q-0 (max_tokens 1024): {prompt_for('st', 1, 0)}\n" in full, full
    assert f"  pending q-1 (max_tokens 1024): {prompt_for('st', 1, 1)}\n" in full, full
    assert f"  asked q-0: {prompt_for('st', 0, 0)}\n    answer: answer zero\n" in full, full
    assert f"  asked q-1: {prompt_for('st', 0, 1)}\n    answer: answer one\n" in full, full
    meta = (await table("status", "--pending", "meta", *where)).stdout
    assert "  pending q-0 (max_tokens 1024)\n" in meta and "answer zero" not in meta, meta


@pytest.mark.slow
async def test_continue_and_cancel_say_what_happened_in_the_clis_words(
    redis_url: str, namespace: str, worker_pool: WorkerPool
) -> None:
    await worker_pool.start()
    where = conn(redis_url, namespace)
    async with registry(redis_url, namespace) as reg:
        sid, _ = await reg.start_execution("mp-rounds", {"tag": "k", "rounds": 1, "width": 2},
                                           timeout=WAIT_S)
    several = await call("continue", sid, "which?", *where, code=2)
    assert several["type"] == "no_pending_query" and several["session_id"] == sid, several
    assert "--query-id" in several["error"] and "q-0, q-1" in several["error"], several

    cancelled = await call("cancel", sid, *where)
    assert list(cancelled)[:2] == ["session_id", "status"], cancelled
    assert (cancelled["session_id"], cancelled["status"]) == (sid, "cancelled")
    assert "stats" in cancelled
    again = await call("cancel", sid, *where, code=2)
    assert again["type"] == "invalid_transition" and again["session_id"] == sid, again

    bare, named = await asyncio.gather(
        call("continue", sid, "late", *where, code=2),
        call("continue", sid, "late", "--query-id", "q-0", *where, code=2))
    for late in (bare, named):
        assert (late["type"], late["session_id"], late["state"]) == (
            "invalid_transition", sid, "cancelled"), late


async def test_start_and_run_take_a_ttl_and_an_idempotency_key(
    redis_url: str, namespace: str, worker_pool: WorkerPool
) -> None:
    """The same key picks up the same session (``start`` twice, ``run`` then ``start``); the
    key with another input is refused; the ttl is the session's."""
    await worker_pool.start()
    where = conn(redis_url, namespace)
    data = json.dumps({"tag": "i", "rounds": 1, "width": 1})
    first = await call("start", "mp-rounds", "--input", data, "--idempotency-key", "k1",
                       "--ttl", "90", *where)
    assert first["status"] == "needs_response", first
    assert await call("start", "mp-rounds", "--input", data, "--idempotency-key", "k1",
                      *where) == first
    clash = await call("start", "mp-rounds", "--task", "other", "--idempotency-key", "k1",
                       *where, code=2)
    assert clash["type"] == "idempotency_conflict", clash
    async with registry(redis_url, namespace) as reg:
        sk = reg.keys.session(first["session_id"])
        assert int(await reg.redis.execute("HGET", sk.session, "ttl_ms")) == 90_000

    done = await run_cli("run", "mp-rounds", "--input", data, "--responder", "echo",
                         "--idempotency-key", "k2", "--json", *where)
    assert done.code == 0, str(done)
    ran = json.loads(done.stdout)
    assert ran["status"] == "completed", ran
    assert await call("start", "mp-rounds", "--input", data, "--idempotency-key", "k2",
                      *where) == ran  # the finished session, while it is retained

    for bad in ("0", "-5", "nan", "soon"):
        refused = await call("start", "mp-rounds", "--ttl", bad, *where, code=2)
        assert refused["type"] == "invalid_input" and "--ttl" in refused["error"], refused


@pytest.mark.slow
async def test_worker_logs_json_and_serves_metrics_through_its_supervisor(
    redis_url: str,
) -> None:
    """``--log-format`` and ``--metrics-port`` reach the supervised child (the default)."""
    port = free_port()
    namespace = new_namespace()
    async with cli_proc("worker", *conn(redis_url, namespace), "--log-format", "json",
                        "--metrics-port", str(port), "--log-level", "INFO") as worker:

        def scrape() -> str:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
                return str(r.read().decode())

        async def serving() -> str | bool:
            if worker.proc.returncode is not None:
                raise AssertionError(f"the worker exited: {await worker.finish()}")
            try:
                return await asyncio.to_thread(scrape)
            except OSError:
                return False

        await assert_eventually(serving, timeout=WAIT_S, interval=0.1,
                                message="no metrics served")
        assert "alc_steps_total" in await asyncio.to_thread(scrape)
        worker.proc.send_signal(signal.SIGTERM)
        result = await worker.finish()
    assert result.code == 0, str(result)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines, str(result)
    for line in lines:
        record = json.loads(line)  # every line one JSON object
        assert {"ts", "level", "logger", "message"} <= set(record), record


def test_import_finds_a_module_in_the_current_directory(tmp_path: Path) -> None:
    """``coordinator run --import mod`` from the directory holding ``mod.py``, through the
    console script (whose import path is only its own directory and site-packages): the
    module is found there, as ``python -m`` would find it."""
    (tmp_path / "cwd_strats.py").write_text(
        "from workers import strategy\n\n\n@strategy('cwd-echo')\n"
        "async def echo(ctx, task=''):\n    return await ctx.llm('say ' + task)\n")
    script = shutil.which("coordinator", path=str(Path(sys.executable).parent))
    assert script is not None
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "REDIS_URL")}
    done = subprocess.run([script, "run", "cwd-echo", "--task", "hi", "--import", "cwd_strats",
                           "--responder", "echo", "--json"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["result"] == "say hi"
