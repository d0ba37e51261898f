"""The CLI against a Redis it cannot use: unreachable, misnamed, or refusing the database.

Every command that needs Redis must end within its bound (``Settings.redis_timeout_s``, 5 s by
default, plus the interpreter's start-up), exit with its error's code (4 ``unavailable``: try
again later; 2 ``invalid_input``: fix the call; 5 ``misconfigured``: fix the deployment) and
print the typed JSON error on stdout: a message a person can act on, never a traceback, and
never the password of the URL.

The time bounds are generous upper bounds that prove each command is bounded, not speed.
"""

from __future__ import annotations

import asyncio
import signal
import time

import pytest

from coordinator.errors import vocabulary
from tests.helpers import free_port
from tests.procs import ROOT, CliResult, clean_env, cli_argv, run_cli

#: The default budget of a Redis call (5 s) plus start-up, with room for a slow box.
BOUND_S = 7.0 + 3.0
#: Each error type's exit code, as the errors module defines it.
EXIT_CODES = {code: exit_code for code, _, exit_code, _ in vocabulary()}


async def timed_cli(*args: str, **env: str) -> tuple[CliResult, float]:
    started = time.monotonic()
    result = await run_cli(*args, env=clean_env(**env), timeout=60)
    return result, time.monotonic() - started


def assert_error(result: CliResult, kind: str, *fragments: str) -> dict[str, object]:
    assert result.code == EXIT_CODES[kind], str(result)
    for out in (result.stdout, result.stderr):
        assert "Traceback" not in out, str(result)
    body = result.json()
    assert body["status"] == "error" and body["type"] == kind, body
    for fragment in fragments:
        assert fragment in str(body["error"]), body
    assert isinstance(body, dict)
    return body


async def test_status_against_a_closed_port_is_unavailable_within_the_default_bound() -> None:
    url = f"redis://127.0.0.1:{free_port()}/9"
    result, took = await timed_cli("status", "--redis", url)
    body = assert_error(result, "unavailable", url)
    assert body["redis"] == url
    assert took < BOUND_S, f"took {took:.1f} s\n{result}"


async def test_every_command_against_a_closed_port_masks_the_password() -> None:
    """The same for the other commands (with a shorter budget, so the test stays quick), and
    the URL's password never shows."""
    url = f"redis://:hunter2@127.0.0.1:{free_port()}/0"
    commands = [
        ("status", "--json"), ("status", "s-0-" + "0" * 32), ("start", "cot", "--task", "x"),
        ("continue", "s-0-" + "0" * 32, "answer"), ("cancel", "s-0-" + "0" * 32),
        ("wait", "s-0-" + "0" * 32), ("sessions",), ("sessions", "--json"), ("strategies",),
        ("status",),
    ]
    results = await asyncio.gather(*(
        timed_cli(*cmd, "--redis", url, ALC_REDIS_TIMEOUT_S="1.5") for cmd in commands))
    for cmd, (result, took) in zip(commands, results, strict=True):
        body = assert_error(result, "unavailable")
        assert "hunter2" not in result.stdout + result.stderr, (cmd, str(result))
        assert "***" in str(body["redis"]), (cmd, body)
        assert took < 1.5 + 2 + 3, (cmd, f"took {took:.1f} s", str(result))


@pytest.mark.parametrize(("url", "fragment"), [
    ("notaurl", "scheme"),
    ("redis://", "host"),
    ("redis://127.0.0.1:99999/0", "port"),
    ("redis://127.0.0.1:6379/abc", "database"),
])
async def test_a_bad_url_is_invalid_input_at_once(url: str, fragment: str) -> None:
    result, took = await timed_cli("status", "--redis", url)
    assert_error(result, "invalid_input", fragment)
    assert took < BOUND_S, f"took {took:.1f} s\n{result}"


async def test_a_host_that_does_not_resolve_is_unavailable_at_once() -> None:
    result, took = await timed_cli("status", "--redis", "redis://no-such-host.invalid:6379/0")
    assert_error(result, "unavailable", "no-such-host.invalid")
    assert took < BOUND_S, f"took {took:.1f} s\n{result}"


@pytest.mark.redis
async def test_a_database_the_server_does_not_have_is_misconfigured(redis_url: str) -> None:
    url = redis_url.rsplit("/", 1)[0] + "/99"
    result, took = await timed_cli("status", "--redis", url)
    assert_error(result, "misconfigured", "database", "/99")
    assert took < BOUND_S, f"took {took:.1f} s\n{result}"


async def test_no_url_at_all_is_invalid_input() -> None:
    result, _ = await timed_cli("status")
    assert_error(result, "invalid_input", "--redis")


async def test_a_worker_waits_for_an_unreachable_redis_saying_so_and_stops_on_sigterm() -> None:
    """A worker started before its Redis does not die: it says where it connects, logs each
    failed attempt with the cause (password masked) and retries with backoff; SIGTERM still
    stops it promptly."""
    url = f"redis://:hunter2@127.0.0.1:{free_port()}/0"
    proc = await asyncio.create_subprocess_exec(
        *cli_argv("worker", "--redis", url, "--log-level", "INFO"), cwd=ROOT,
        env=clean_env(ALC_REDIS_TIMEOUT_S="0.5"), stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT)
    assert proc.stdout is not None
    lines: list[str] = []
    try:
        async with asyncio.timeout(30):
            while sum("is unavailable" in line for line in lines) < 2:
                raw = await proc.stdout.readline()
                assert raw, f"the worker exited ({await proc.wait()}):\n{''.join(lines)}"
                lines.append(raw.decode())
        proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(15):
            rest = await proc.stdout.read()
            code = await proc.wait()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    text = "".join(lines) + rest.decode()
    assert code == 0, text
    assert "connecting to redis at redis://:***@127.0.0.1" in text, text
    assert "retrying in" in text and "Traceback" not in text, text
    assert "hunter2" not in text, text
