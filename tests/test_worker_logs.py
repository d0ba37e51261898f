"""Logs an operator can use: a failure at ERROR with the strategy's traceback; replays,
claims, rescues, takeovers and fence rejections at INFO/WARNING; each step at DEBUG; the
session id on every line about a session (in the text, and as ``session_id``);
``--log-format json`` one JSON object per line.

The formatters are checked directly; the worker's lines in-process (``caplog``), each made
to happen the way it does in production; and a real worker process started by the CLI with
``--log-format json`` must leave the ERROR line (file and line of the raise, session id) for
a strategy dividing by zero, while its host sees ``type: strategy_error``.
"""

from __future__ import annotations

import io
import json
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from coordinator import Finished, Paused, SessionRegistry
from coordinator.keys import JOB_GROUP
from coordinator.logs import JsonFormatter, TextFormatter, about, configure_logging
from tests.conftest import FakeCluster
from tests.helpers import assert_eventually, line_of, shard_keys
from tests.procs import WAIT_S, WorkerPool
from workers import strategy
from workers.context import Context
from workers.runtime import Done

HERE = Path(__file__)
MODULE = "tests.test_worker_logs"


@strategy("twl-divide")
async def twl_divide(ctx: Context, **_: Any) -> float:
    divisor = await ctx.llm("divide 1 by?")
    return 1 / int(divisor)  # TWL-DIVIDE


@strategy("twl-ask")
async def twl_ask(ctx: Context, tag: str = "", **_: Any) -> list[str]:
    first = await ctx.llm(f"{tag} first")
    return [first, await ctx.llm(f"{tag} second")]


@pytest.fixture
def root_handlers() -> Iterator[None]:
    """``configure_logging`` replaces the root logger's handlers: put them back after."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        yield
    finally:
        for h in list(root.handlers):
            root.removeHandler(h)
        for h in handlers:
            root.addHandler(h)
        root.setLevel(level)
        logging.captureWarnings(False)


def records_about(caplog: pytest.LogCaptureFixture, sid: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if getattr(r, "session_id", None) == sid]


# -- the formatters ---------------------------------------------------------------------------


def test_json_lines_carry_the_session_worker_and_traceback(root_handlers: None) -> None:
    out = io.StringIO()
    configure_logging("info", "json", stream=out)
    log = logging.getLogger("alc.test")
    log.debug("not at this level")
    try:
        1 / 0  # noqa: B018
    except ZeroDivisionError:
        log.error("session s-1 failed\nsecond line", exc_info=True,
                  extra=about("s-1", "w-1"))
    log.warning("no session here")
    lines = out.getvalue().splitlines()
    assert len(lines) == 2, lines  # one object per line, a multi-line message included
    first, second = (json.loads(line) for line in lines)
    assert first["level"] == "ERROR" and first["logger"] == "alc.test"
    assert first["message"] == "session s-1 failed\nsecond line"
    assert (first["session_id"], first["worker_id"]) == ("s-1", "w-1")
    assert first["ts"].endswith("Z") and "T" in first["ts"]
    assert "ZeroDivisionError: division by zero" in first["traceback"]
    assert f'File "{HERE}"' in first["traceback"]
    assert "session_id" not in second and "traceback" not in second


def test_text_lines_name_the_session_once(root_handlers: None) -> None:
    out = io.StringIO()
    configure_logging("DEBUG", "text", stream=out)
    configure_logging("DEBUG", "text", stream=out)  # again: the format changes, lines do not double
    log = logging.getLogger("alc.test")
    log.info("replaying", extra=about("s-2"))
    log.info("session s-3 paused", extra=about("s-3"))
    try:
        raise KeyError("k")
    except KeyError:
        log.error("failed", exc_info=True, extra=about("s-4"))
    lines = out.getvalue().splitlines()
    assert lines[0].endswith("INFO alc.test: replaying [session s-2]"), lines
    assert lines[1].endswith("INFO alc.test: session s-3 paused"), lines
    assert lines[2].endswith("ERROR alc.test: failed [session s-4]"), lines
    assert lines[3] == "Traceback (most recent call last):" and lines[-1] == "KeyError: 'k'"


def test_python_warnings_become_log_lines(root_handlers: None) -> None:
    out = io.StringIO()
    configure_logging("WARNING", "json", stream=out)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.warn("a library complains", UserWarning, stacklevel=1)
    (line,) = out.getvalue().splitlines()
    record = json.loads(line)
    assert record["logger"] == "py.warnings" and "a library complains" in record["message"]


def test_an_unknown_format_is_refused() -> None:
    with pytest.raises(ValueError, match="xml"):
        configure_logging("INFO", "xml")
    record = logging.makeLogRecord({"msg": "m", "levelname": "INFO", "name": "x"})
    assert "[session" not in TextFormatter().format(record)
    assert json.loads(JsonFormatter().format(record))["message"] == "m"


# -- what a worker logs, in-process -------------------------------------------------------------


async def test_a_failure_is_logged_at_error_with_the_strategys_traceback(
        registry: SessionRegistry, worker: Any, caplog: pytest.LogCaptureFixture) -> None:
    sid, first = await registry.start_execution("twl-divide", {})
    assert isinstance(first, Paused)
    done = await registry.feed_response(sid, "q-0", "0")
    assert isinstance(done, Finished) and done.error_type == "strategy_error"
    await assert_eventually(lambda: any(r.levelno == logging.ERROR
                                        for r in records_about(caplog, sid)))
    (error,) = [r for r in records_about(caplog, sid) if r.levelno == logging.ERROR]
    assert sid in error.getMessage() and "strategy_error" in error.getMessage()
    assert error.worker_id == worker.id  # type: ignore[attr-defined]
    assert error.exc_info is not None and isinstance(error.exc_info[1], ZeroDivisionError)
    text = logging.Formatter().formatException(error.exc_info)
    assert f'File "{HERE}", line {line_of(HERE, "TWL-DIVIDE")}, in twl_divide' in text, text


async def test_each_step_is_logged_at_debug_with_its_path(
        registry: SessionRegistry, worker: Any, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="workers.step")
    sid, _ = await registry.start_execution("twl-ask", {"tag": "d"})
    await registry.feed_response(sid, "q-0", "a")
    done = await registry.feed_response(sid, "q-0", "b")
    assert isinstance(done, Finished) and done.result == ["a", "b"]
    steps = [r.getMessage() for r in records_about(caplog, sid) if r.levelno == logging.DEBUG]
    assert len(steps) == 3, steps
    assert "by start path, outcome pause" in steps[0], steps
    assert all(" ms" in m and sid in m for m in steps), steps
    # the later rounds resume the execution kept in memory (handed over, or read live)
    assert all(("handoff path" in m or "live path" in m) for m in steps[1:]), steps
    assert "outcome complete" in steps[2], steps


async def test_a_replay_is_logged_with_the_session(
        fake_cluster: FakeCluster, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    reg = fake_cluster.registry()
    a = await fake_cluster.worker()
    sid, _ = await reg.start_execution("twl-ask", {"tag": "r"})
    await fake_cluster.stop_worker(a)  # its live execution goes with it
    await fake_cluster.worker()
    assert isinstance(await reg.feed_response(sid, "q-0", "a"), Paused)
    replays = [r for r in records_about(caplog, sid) if "replaying" in r.getMessage()]
    assert len(replays) == 1 and replays[0].levelno == logging.INFO, caplog.text
    # round 1 has no journal yet: the replay re-runs the strategy to its first question
    assert "replaying 0 round(s) of 'twl-ask'" in replays[0].getMessage()


async def test_a_claimed_job_is_logged_with_its_session(
        fake_cluster: FakeCluster, caplog: pytest.LogCaptureFixture) -> None:
    """A job delivered to a worker that never stepped it is claimed once idle."""
    caplog.set_level(logging.INFO)
    reg = fake_cluster.registry()
    w = await fake_cluster.worker(start=False, claim_idle_ms=100)
    sid = await reg.submit("twl-ask", {"tag": "c"})
    jobs = (await shard_keys(reg, sid)).jobs
    # Delivered to this worker's consumer before it ran: as if its read's reply was lost.
    await reg.client.xgroup_create(jobs, JOB_GROUP, id="0", mkstream=True)
    assert await reg.client.xreadgroup(JOB_GROUP, w.id, {jobs: ">"}, count=10)
    await w.start()
    assert isinstance(await reg.wait_event(sid, timeout=10), Paused)
    claims = [r for r in records_about(caplog, sid) if "taken over" in r.getMessage()]
    assert claims and "claimed: idle over 100 ms" in claims[0].getMessage(), caplog.text
    assert claims[0].levelno == logging.INFO
    assert w.stats.claimed >= 1


async def test_a_rescue_and_a_lock_takeover_are_logged_with_the_session(
        fake_cluster: FakeCluster, caplog: pytest.LogCaptureFixture) -> None:
    """A worker gone mid-step (its connection closed) leaves its job pending and lock A in its
    name: both are taken over at once, and said so."""
    caplog.set_level(logging.INFO)
    reg = fake_cluster.registry()
    sid = await reg.submit("twl-ask", {"tag": "g"})
    jobs = (await shard_keys(reg, sid)).jobs
    await reg.client.xgroup_create(jobs, JOB_GROUP, id="0", mkstream=True)
    assert await reg.client.xreadgroup(JOB_GROUP, "ghost", {jobs: ">"}, count=10)
    await reg.client.set(reg.keys.session(sid).lock, b"0123abcd|ghost", px=60_000)
    w = await fake_cluster.worker(claim_idle_ms=60_000)  # the rescue, not a claim
    assert isinstance(await reg.wait_event(sid, timeout=10), Paused)
    lines = {r.getMessage(): r.levelno for r in records_about(caplog, sid)}
    rescued = [m for m in lines if "taken over (rescued: its worker is gone)" in m]
    took = [m for m in lines if "lock A taken over" in m]
    assert rescued and took, caplog.text
    assert lines[took[0]] == logging.WARNING
    assert w.stats.rescued == 1


async def test_a_fence_rejection_is_logged_with_the_session(
        fake_cluster: FakeCluster, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    reg = fake_cluster.registry()
    sid = await reg.submit("twl-ask", {"tag": "f"})
    stale = reg.locks.session(sid, lease_ms=30)
    await stale.acquire()

    async def lapsed() -> bool:
        return not await reg.client.exists(reg.keys.session(sid).lock)

    await assert_eventually(lapsed, timeout=5)
    fresh = reg.locks.session(sid)
    await fresh.acquire()
    w = await fake_cluster.worker(start=False)
    await w.services.ready()
    assert await w._commit(sid, stale, asked_from=0, outcome=Done({"x": 1}),
                           journal_entry=b"", ex=None) is False
    (fenced,) = [r for r in records_about(caplog, sid) if "stale write" in r.getMessage()]
    assert fenced.levelno == logging.WARNING and sid in fenced.getMessage()
    await fresh.release()


# -- a real worker process ------------------------------------------------------------------------


@pytest.mark.slow
async def test_a_worker_process_logs_a_strategy_crash_as_a_json_line_with_its_traceback(
        redis_url: str, namespace: str, tmp_path: Path) -> None:
    pool = WorkerPool(redis_url, namespace, tmp_path, imports=(MODULE,),
                      args=("--log-level", "DEBUG", "--log-format", "json"))
    reg = SessionRegistry.from_url(redis_url, namespace=namespace)
    try:
        w = await pool.start()
        sid, first = await reg.start_execution("twl-divide", {}, timeout=WAIT_S)
        assert isinstance(first, Paused)
        done = await reg.feed_response(sid, "q-0", "0", timeout=WAIT_S)
        assert done.to_json(sid) == {"status": "error", "error": "ZeroDivisionError: "
                                     "division by zero", "type": "strategy_error"}

        def lines() -> list[dict[str, Any]]:
            text = w.log_text()
            return [json.loads(line) for line in text.splitlines() if line.strip()]

        def error_line() -> dict[str, Any] | None:
            return next((x for x in lines() if x["level"] == "ERROR"
                         and x.get("session_id") == sid), None)

        await assert_eventually(error_line, timeout=WAIT_S, message=w.log_tail())
        error = error_line()
        assert error is not None
        assert sid in error["message"] and error["worker_id"] == w.worker_id
        where = f'File "{HERE}", line {line_of(HERE, "TWL-DIVIDE")}, in twl_divide'
        assert where in error["traceback"], error
        assert error["traceback"].rstrip().endswith("ZeroDivisionError: division by zero")
        steps = [x for x in lines() if x["level"] == "DEBUG" and x.get("session_id") == sid]
        assert any("start path" in x["message"] for x in steps), steps
    finally:
        await reg.aclose()
        pool.close()
