"""``coordinator run`` never abandons its session silently, and shows people what happens.

- Ctrl-C typed on the terminal (a pseudo-terminal that is the run's controlling terminal,
  so it is a real SIGINT), at the prompt or while the session runs, cancels the session and
  exits 130 within 2 s, printing the cancelled JSON;
- a closed stdin or a failing ``cmd:`` responder cancels it too (exit 1, an error JSON
  naming the session and the query); with ``--leave-paused`` the session is left paused
  and the printed commands pick it up;
- the session id is printed at once; each prompt is shown once and a typed answer is not
  echoed; progress and log lines show once each; nothing but text when stderr is no tty;
- ``cmd:`` answers the queries of a batch at once, at most ``--parallel`` at a time.

Against a real redis-server and real worker processes (``worker_pool``), except the
``cmd:`` concurrency tests, which run on the embedded Redis with its in-process workers.
"""

from __future__ import annotations

import asyncio
import json
import shlex
import signal
from pathlib import Path

import pytest
import redis

from tests.procs import STRATEGIES, WAIT_S, WorkerPool, run_cli
from tests.strategies_mp import expected_rounds, hold_keys, prompt_for
from tests.test_cli_support import cli, conn, session_phase

pytestmark = pytest.mark.slow

#: The issue's bound on a run's exit after Ctrl-C.
CTRL_C_BOUND_S = 2.0
ESC = "\x1b["


def final_json(out: str) -> dict[str, object]:
    body: dict[str, object] = json.loads(out)
    return body


def last_json_line(err: str) -> dict[str, object]:
    body: dict[str, object] = json.loads(err.strip().splitlines()[-1])
    return body


# -- Ctrl-C ----------------------------------------------------------------------------------


async def test_ctrl_c_at_the_prompt_cancels_the_session_and_exits_130_at_once(
    redis_url: str, namespace: str, worker_pool: WorkerPool
) -> None:
    await worker_pool.start()
    async with cli("run", "reflect", "--task", "x", *conn(redis_url, namespace),
                   tty=True) as run:
        sid = (await run.read_err_until("session ")).split()[1]
        await run.read_err_until("your answer")  # blocked reading the terminal now
        run.ctrl_c()
        result = await run.finish(timeout=CTRL_C_BOUND_S)
    assert result.code == 130, str(result)
    assert final_json(result.stdout)["status"] == "cancelled", str(result)
    assert final_json(result.stdout)["session_id"] == sid
    assert "Traceback" not in result.stderr, str(result)
    assert await session_phase(redis_url, namespace, sid) == "cancelled"


async def test_ctrl_c_while_the_session_runs_cancels_it_and_exits_130_at_once(
    redis_url: str, namespace: str, worker_pool: WorkerPool
) -> None:
    """The run waits on a step held mid-way (``mp-hold``) when ^C comes."""
    await worker_pool.start()
    keys = hold_keys("ctrl-c")
    client = redis.Redis.from_url(redis_url)
    try:
        async with cli("run", "mp-hold", "--input",
                       json.dumps({"tag": "ctrl-c", "url": redis_url}), "--responder", "echo",
                       *conn(redis_url, namespace), tty=True) as run:
            sid = (await run.read_err_until("session ")).split()[1]
            held = await asyncio.to_thread(client.blpop, [keys["entered"]], int(WAIT_S))
            assert held, f"the step was never held\n{worker_pool.logs()}"
            assert await session_phase(redis_url, namespace, sid) == "running"
            run.ctrl_c()
            result = await run.finish(timeout=CTRL_C_BOUND_S)
    finally:
        client.rpush(keys["go"], "go")  # let the held step end
        client.close()
    assert result.code == 130, str(result)
    body = final_json(result.stdout)
    assert (body["status"], body["session_id"]) == ("cancelled", sid), str(result)
    assert await session_phase(redis_url, namespace, sid) == "cancelled"


async def test_sigterm_cancels_the_session_as_ctrl_c_does(
    redis_url: str, namespace: str, worker_pool: WorkerPool
) -> None:
    """A run stopped by its supervisor (a CI job's timeout, ``kill``) ends its session too."""
    await worker_pool.start()
    async with cli("run", "cot", "--task", "x", *conn(redis_url, namespace),
                   stdin=asyncio.subprocess.PIPE) as run:
        sid = (await run.read_err_until("session ")).split()[1]
        await run.read_err_until("your answer")
        run.proc.send_signal(signal.SIGTERM)
        result = await run.finish(timeout=CTRL_C_BOUND_S)
    assert result.code == 128 + signal.SIGTERM, str(result)
    assert final_json(result.stdout)["status"] == "cancelled", str(result)
    assert await session_phase(redis_url, namespace, sid) == "cancelled"


async def test_ctrl_c_with_leave_paused_leaves_the_session_and_says_how_to_go_on(
    redis_url: str, namespace: str, worker_pool: WorkerPool
) -> None:
    await worker_pool.start()
    where = conn(redis_url, namespace)
    async with cli("run", "cot", "--task", "x", "--leave-paused", *where, tty=True) as run:
        sid = (await run.read_err_until("session ")).split()[1]
        await run.read_err_until("your answer")
        run.ctrl_c()
        result = await run.finish(timeout=CTRL_C_BOUND_S)
    assert result.code == 130, str(result)
    assert result.stdout == "", str(result)
    error = last_json_line(result.stderr)
    assert (error["type"], error["session_id"], error["left"]) == ("interrupted", sid, "paused")
    assert error["resume"] == [
        shlex.join(["coordinator", "wait", sid, *where]),
        shlex.join(["coordinator", "continue", sid, *where, "--query-id", "q-0", "ANSWER"]),
        shlex.join(["coordinator", "cancel", sid, *where]),
    ], error
    assert await session_phase(redis_url, namespace, sid) == "paused"


# -- a responder that cannot answer ------------------------------------------------------


async def test_a_closed_stdin_cancels_the_session_and_names_it(
    redis_url: str, namespace: str, worker_pool: WorkerPool
) -> None:
    await worker_pool.start()
    result = await run_cli("run", "reflect", "--task", "x", *conn(redis_url, namespace))
    assert result.code == 1, str(result)
    error = last_json_line(result.stderr)
    assert error["type"] == "responder_failed" and error["query_id"] == "q-0", error
    assert "standard input ended" in str(error["error"]), error
    sid = str(error["session_id"])
    assert final_json(result.stdout) == {**final_json(result.stdout), "session_id": sid,
                                         "status": "cancelled"}
    assert await session_phase(redis_url, namespace, sid) == "cancelled"


async def test_a_failing_command_cancels_the_session_and_names_the_query(
    redis_url: str, namespace: str, worker_pool: WorkerPool
) -> None:
    await worker_pool.start()
    result = await run_cli(
        "run", "mp-rounds", "--input", json.dumps({"tag": "f", "rounds": 1, "width": 3}),
        "--responder", 'cmd:[ "$ALC_QUERY_ID" = q-1 ] && { echo broken >&2; exit 7; }; cat',
        *conn(redis_url, namespace))
    assert result.code == 1, str(result)
    error = last_json_line(result.stderr)
    assert error["type"] == "responder_failed" and error["query_id"] == "q-1", error
    assert "for q-1 exited with 7: broken" in str(error["error"]), error
    sid = str(error["session_id"])
    assert final_json(result.stdout)["status"] == "cancelled"
    assert await session_phase(redis_url, namespace, sid) == "cancelled"


async def test_leave_paused_leaves_the_session_and_the_printed_commands_pick_it_up(
    redis_url: str, namespace: str, worker_pool: WorkerPool
) -> None:
    await worker_pool.start()
    where = conn(redis_url, namespace)
    result = await run_cli(
        "run", "mp-rounds", "--input", json.dumps({"tag": "lp", "rounds": 1, "width": 2}),
        "--responder", 'cmd:[ "$ALC_QUERY_ID" = q-1 ] && exit 3; cat', "--parallel", "1",
        "--leave-paused", *where)
    assert result.code == 1, str(result)
    assert result.stdout == "", str(result)  # the session did not end: no final JSON
    error = last_json_line(result.stderr)
    sid = str(error["session_id"])
    assert (error["type"], error["query_id"], error["left"]) == (
        "responder_failed", "q-1", "paused"), error
    assert await session_phase(redis_url, namespace, sid) == "paused"
    resume = error["resume"]
    assert isinstance(resume, list)
    assert resume == [
        shlex.join(["coordinator", "wait", sid, *where]),
        shlex.join(["coordinator", "continue", sid, *where, "--query-id", "q-1", "ANSWER"]),
        shlex.join(["coordinator", "cancel", sid, *where]),
    ]
    for command in resume:  # people read them on stderr too
        assert f"  {command}\n" in result.stderr, str(result)

    waited = await run_cli(*shlex.split(resume[0])[1:])
    assert waited.code == 0 and waited.json()["query_id"] == "q-1", str(waited)
    fed = await run_cli(*[a if a != "ANSWER" else "by hand" for a in shlex.split(resume[1])[1:]])
    assert fed.code == 0, str(fed)
    assert fed.json()["result"] == {"tag": "lp", "rounds": [[prompt_for("lp", 0, 0), "by hand"]]}


# -- what people see -------------------------------------------------------------------


async def test_terminal_shows_each_prompt_once_and_does_not_echo_the_answer(
    redis_url: str, namespace: str, worker_pool: WorkerPool, tmp_path: Path
) -> None:
    await worker_pool.start()
    answers = ["first-typed-answer", "second-typed-answer", "third-typed-answer",
               "fourth-typed-answer"]
    (tmp_path / "answers").write_text("\n".join(answers[:3]) + "\n<<<\nfourth-typed-answer\n>>>\n")
    with (tmp_path / "answers").open("rb") as stdin:
        async with cli("run", "mp-rounds", "--input",
                       json.dumps({"tag": "tty", "rounds": 2, "width": 2}),
                       *conn(redis_url, namespace), stdin=stdin) as run:
            result = await run.finish()
    assert result.code == 0, str(result)
    body = final_json(result.stdout)
    assert body["result"] == {"tag": "tty", "rounds": [answers[:2], answers[2:]]}, body
    for r in range(2):
        for i in range(2):
            assert result.stderr.count(prompt_for("tty", r, i)) == 1, result.stderr
    for answer in answers:
        assert answer not in result.stderr, result.stderr
    assert result.stderr.count("your answer") == 4, result.stderr
    assert ESC not in result.stderr + result.stdout, "control codes in captured output"


async def test_run_prints_the_session_id_at_once_and_progress_and_logs_once_each(
    redis_url: str, namespace: str, worker_pool: WorkerPool
) -> None:
    await worker_pool.start()
    result = await run_cli("run", "reflect", "--input", json.dumps({"task": "x", "max_rounds": 2}),
                           "--responder", "echo", *conn(redis_url, namespace))
    assert result.code == 0, str(result)
    sid = final_json(result.stdout)["session_id"]
    lines = result.stderr.splitlines()
    assert lines[0] == f"session {sid} (reflect)", result.stderr
    # the echo repeats the critique prompt, NO_MAJOR_ISSUES included: reflect stops there
    for log in ("critique 1 received", "reflect: converged at round 1"):
        assert sum(line.endswith(f"log [info] {log}") for line in lines) == 1, result.stderr
    steps = ["draft", "critique 1"]
    for n, step in enumerate(steps, 1):
        assert lines.count(f"  progress {n}/5 {step}") == 1, result.stderr
    # in order: each progress step before the next, the log after its critique
    order = [lines.index(f"  progress {n}/5 {s}") for n, s in enumerate(steps, 1)]
    assert order == sorted(order), result.stderr
    assert ESC not in result.stderr + result.stdout, "control codes in captured output"

    quiet = await run_cli("run", "reflect", "--task", "x", "--responder", "echo", "--json",
                          *conn(redis_url, namespace))
    assert quiet.code == 0, str(quiet)
    assert final_json(quiet.stdout)["status"] == "completed"
    assert quiet.stderr.splitlines() == [
        f"session {final_json(quiet.stdout)['session_id']} (reflect)"], str(quiet)


# -- cmd: answers a batch concurrently, bounded ----------------------------------------------

#: A responder that proves overlap without timing: it marks its start, then waits (bounded)
#: until ``n`` commands have started, so the first ``n`` can only finish if they ran at
#: once; it marks a breach of the bound (more than ``n`` running) and a wait that ran out.
#: Its answer is its prompt, upper-cased.
BARRIER = r"""
d={dir}; n={n}; touch "$d/start.$ALC_QUERY_ID.$$"
count() {{ ls "$d" | grep -c "^$1"; }}
[ $(( $(count start) - $(count done) )) -gt "$n" ] && touch "$d/over.$ALC_QUERY_ID.$$"
i=0
while [ "$(count start)" -lt "$n" ]; do
  i=$((i+1)); [ $i -gt 600 ] && {{ touch "$d/alone.$ALC_QUERY_ID.$$"; break; }}
  sleep 0.05
done
tr a-z A-Z
touch "$d/done.$ALC_QUERY_ID.$$"
"""


@pytest.mark.parametrize(("width", "parallel"), [(3, 3), (4, 2)])
async def test_cmd_answers_a_batch_concurrently_within_parallel(
    tmp_path: Path, width: int, parallel: int
) -> None:
    marks = tmp_path / "marks"
    marks.mkdir()
    script = tmp_path / "barrier.sh"
    script.write_text(BARRIER.format(dir=shlex.quote(str(marks)), n=parallel))
    result = await run_cli(
        "run", "mp-rounds", "--input", json.dumps({"tag": "par", "rounds": 1, "width": width}),
        "--import", STRATEGIES, "--responder", f"cmd:sh {shlex.quote(str(script))}",
        "--parallel", str(parallel), "--json", timeout=60)
    assert result.code == 0, str(result)
    assert final_json(result.stdout)["result"] == {
        "tag": "par", "rounds": expected_rounds("par", 1, width, str.upper)}
    names = sorted(p.name.split(".")[0] for p in marks.iterdir())
    assert names.count("start") == names.count("done") == width, names
    assert "alone" not in names, f"a command never saw {parallel} running at once: {names}"
    assert "over" not in names, f"more than {parallel} commands ran at once: {names}"
