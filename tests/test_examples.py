"""The programs in ``examples/`` run as their headers say, and print what they promise.

Each runs as a subprocess from the repository root: ``host_loop.py`` on the embedded default
and on a redis-server with a real worker process; ``custom_strategy.py`` served by a real
``coordinator worker --import examples.custom_strategy`` and driven by a host, and by its own
``__main__`` on the embedded default; ``http_client.py`` against a real ``coordinator serve``
with a real worker. The assertions are on the results printed: an example that exits 0 but
prints the wrong thing fails.
"""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from coordinator.registry import SessionRegistry
from tests.helpers import assert_eventually, free_port
from tests.procs import WAIT_S, clean_env, run_argv

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
#: The installed console script, as a user runs it (not ``python -m coordinator``).
COORDINATOR = str(Path(sys.executable).with_name("coordinator"))


@dataclass
class Ran:
    code: int
    stdout: str
    stderr: str

    def json(self) -> Any:
        assert self.code == 0, self
        try:
            return json.loads(self.stdout)
        except json.JSONDecodeError:
            raise AssertionError(f"stdout is not one JSON document:\n{self}") from None

    def __str__(self) -> str:
        return f"rc={self.code}\nstdout:\n{self.stdout}\nstderr:\n{self.stderr[-3000:]}"


async def run(*argv: str, **env: str) -> Ran:
    """Run ``python ARGV...`` from the repository root to its end (killed after WAIT_S)."""
    done = await run_argv([sys.executable, *argv], env=clean_env(**env), timeout=WAIT_S)
    return Ran(done.code, done.stdout, done.stderr)


@dataclass
class Services:
    """Long-running processes of a test (workers, an API); all stopped at teardown."""

    log_dir: Path
    procs: list[tuple[subprocess.Popen[bytes], Path]] = field(default_factory=list)

    def start(self, *argv: str, **env: str) -> subprocess.Popen[bytes]:
        log = self.log_dir / f"service-{len(self.procs)}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(argv, cwd=ROOT, env=clean_env(**env),
                                    stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=subprocess.STDOUT)
        self.procs.append((proc, log))
        return proc

    def logs(self) -> str:
        return "\n".join(f"--- {p.args!r} rc={p.poll()}\n"
                         f"{log.read_text(errors='replace')[-2000:]}" for p, log in self.procs)

    def close(self) -> None:
        for proc, _ in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc, _ in self.procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture
def services(tmp_path: Path) -> Iterator[Services]:
    running = Services(tmp_path)
    try:
        yield running
    finally:
        running.close()


@pytest.fixture
def ns() -> str:
    return f"ex{secrets.token_hex(4)}"


async def worker(services: Services, url: str, ns: str, *imports: str,
                 offers: str = "cot") -> None:
    """Start ``coordinator worker`` and return once a registry sees it offer ``offers``."""
    proc = services.start(COORDINATOR, "worker", "--redis", url, "--namespace", ns,
                          *[arg for m in imports for arg in ("--import", m)])
    reg = SessionRegistry.from_url(url, namespace=ns)

    async def ready() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"the worker exited:\n{services.logs()}")
        return offers in await reg.strategies()

    try:
        await assert_eventually(ready, timeout=WAIT_S, interval=0.05,
                                message=f"a live worker offering {offers}")
    finally:
        await reg.aclose()


async def test_host_loop_on_the_embedded_default() -> None:
    ran = await run("examples/host_loop.py", "reflect", "Design a cache", '{"max_rounds": 2}')
    out = ran.json()
    echo = "echo: Task: Design a cache"
    assert out["status"] == "completed" and out["session_id"].startswith("s-")
    assert out["result"] == {"output": echo, "total_rounds": 2, "converged": False, "rounds": [
        {"round": n, "critique": echo, "converged": False} for n in (1, 2)]}
    assert out["stats"]["auto"]["llm_calls"] == 5
    assert ran.stderr.count(" -> ") == 5  # each exchange shown


async def test_host_loop_answers_a_batch() -> None:
    out = (await run("examples/host_loop.py", "sc", "2+2", '{"n": 3}')).json()
    assert out["status"] == "completed"
    assert out["result"]["vote_counts"] == {"echo: original question: 2+2": 3}
    assert out["result"]["paths"] == [{"reasoning": "echo: Question: 2+2",
                                       "answer": "echo: Original question: 2+2"}] * 3


@pytest.mark.slow
@pytest.mark.redis
async def test_host_loop_on_redis_with_a_worker_process(
    redis_url: str, ns: str, services: Services
) -> None:
    await worker(services, redis_url, ns)
    out = (await run("examples/host_loop.py", "cot", "What is 2+2?",
                     REDIS_URL=redis_url, ALC_NAMESPACE=ns)).json()
    echo = "echo: Task: What is 2+2?"
    assert out["status"] == "completed"
    assert out["result"] == {"chain": [echo] * 3, "conclusion": echo}
    reg = SessionRegistry.from_url(redis_url, namespace=ns)
    try:  # the session lives in that Redis, not in the host
        status = await reg.status(out["session_id"])
    finally:
        await reg.aclose()
    assert status["phase"] == "completed" and status["result"] == out["result"]


@pytest.mark.slow
@pytest.mark.redis
async def test_custom_strategy_served_by_a_worker_that_imports_it(
    redis_url: str, ns: str, services: Services
) -> None:
    """The user's module is loaded by ``--import`` into a real worker process; the host
    loop drives it by name; its logs and progress reach the session."""
    await worker(services, redis_url, ns, "examples.custom_strategy", offers="draft-vote")
    out = (await run("examples/host_loop.py", "draft-vote", "Name a cache", '{"n": 3}',
                     REDIS_URL=redis_url, ALC_NAMESPACE=ns)).json()
    drafts = [f"echo: Draft {i} of 3 for: Name a cache" for i in (1, 2, 3)]
    assert out["status"] == "completed"
    # the host loop's echo names no draft number, so the strategy keeps the first
    assert out["result"] == {"best": drafts[0], "drafts": drafts}
    assert out["stats"]["auto"]["llm_calls"] == 4 and out["stats"]["auto"]["rounds"] == 2
    reg = SessionRegistry.from_url(redis_url, namespace=ns)
    try:
        status = await reg.status(out["session_id"])
        offered = await reg.strategies()
    finally:
        await reg.aclose()
    assert [e["message"] for e in status["metrics"]["recent_logs"]] == [
        "3 drafts in", "picked draft 1"]
    assert status["metrics"]["progress"] == {"step": 2, "total": 2, "message": "choosing"}
    assert offered["draft-vote"]["description"].startswith("Draft n answers in one round")
    assert [p["name"] for p in offered["draft-vote"]["params"]] == ["task", "n"]


async def test_custom_strategy_main_drives_it_on_the_embedded_default() -> None:
    out = (await run("-m", "examples.custom_strategy", "Name a cache", "4")).json()
    drafts = [f"echo: Draft {i} of 4 for: Name a cache" for i in (1, 2, 3, 4)]
    assert out["status"] == "completed"
    assert out["result"] == {"best": drafts[1], "drafts": drafts}  # its host votes "2"
    assert out["logs"] == ["4 drafts in", "picked draft 2"]
    assert out["progress"] == {"step": 2, "total": 2, "message": "choosing"}


@pytest.mark.slow
@pytest.mark.redis
async def test_http_client_against_serve_with_a_worker(
    redis_url: str, ns: str, services: Services
) -> None:
    port = free_port()
    api = f"http://127.0.0.1:{port}"
    services.start(COORDINATOR, "serve", "--redis", redis_url, "--namespace", ns,
                   "--port", str(port))
    await worker(services, redis_url, ns)

    async def serving() -> bool:
        async with httpx.AsyncClient() as client:
            try:
                return (await client.get(f"{api}/healthz")).status_code == 200
            except httpx.TransportError:
                return False

    await assert_eventually(serving, timeout=WAIT_S, interval=0.1, message="serve is up")
    one = (await run("examples/http_client.py", "reflect", "Design a cache", ALC_API=api)).json()
    echo = "echo: Task: Design a cache"
    assert one["status"] == "completed", services.logs()
    assert one["result"] == {"output": echo, "total_rounds": 3, "converged": False, "rounds": [
        {"round": n, "critique": echo, "converged": False} for n in (1, 2, 3)]}
    batch = (await run("examples/http_client.py", "sc", "2+2", ALC_API=api)).json()
    assert batch["status"] == "completed"
    # sc asks 5 paths at once, then 5 extractions at once
    assert [p["reasoning"] for p in batch["result"]["paths"]] == ["echo: Question: 2+2"] * 5
    async with httpx.AsyncClient() as client:  # the API saw those very sessions
        seen = (await client.get(f"{api}/sessions/{batch['session_id']}")).json()
    assert seen["phase"] == "completed" and seen["result"] == batch["result"]


def test_examples_are_importable_from_the_root_but_not_installed() -> None:
    listed = (EXAMPLES / "README.md").read_text()
    for name in ("host_loop.py", "custom_strategy.py", "http_client.py"):
        assert f"`{name}`" in listed, name
        head = (EXAMPLES / name).read_text().split('"""')[1]
        assert "Run" in head or "run" in head, name  # each says how to run it
    assert (EXAMPLES / "__init__.py").is_file()
    import tomllib

    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "packages"]
    assert not any(p == "examples" or p.startswith("examples.") for p in packages)
    assert "Copyright (c) 2026 alc-coordinator contributors" in (ROOT / "LICENSE").read_text()
