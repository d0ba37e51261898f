"""docker-compose.yml and the Dockerfile, checked without a Docker engine (none runs here):
the compose keys a deployment relies on, that every command of a service built from our
image is a real ``coordinator`` command (parsed by the CLI's own parser), and that every
environment name the file sets is one the code actually reads.
"""

from __future__ import annotations

import ast
import re
import tomllib
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest
import yaml

from coordinator.cli import _parser
from coordinator.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
#: ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?error}, ${VAR?error}
INTERPOLATION = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}")
#: Knobs of the compose file itself (they never reach a process as themselves).
COMPOSE_ONLY = {"WORKER_CONCURRENCY", "API_PORT"}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return data


def env_names_read_by_code() -> set[str]:
    """``os.environ.get("X")`` / ``os.environ["X"]`` literals in our packages, plus the
    ``ALC_<FIELD>`` names ``Settings.from_url`` reads for every field."""
    names = {f"ALC_{f.name.upper()}" for f in fields(Settings) if f.name != "url"}
    for path in [*ROOT.glob("coordinator/*.py"), *ROOT.glob("workers/*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            target = None
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                    and node.func.attr in ("get", "getenv") and node.args:
                owner = node.func.value
                if (isinstance(owner, ast.Attribute) and owner.attr == "environ") or \
                        (isinstance(owner, ast.Name) and owner.id == "os"):
                    target = node.args[0]
            elif isinstance(node, ast.Subscript) and isinstance(node.value, ast.Attribute) \
                    and node.value.attr == "environ":
                target = node.slice
            if isinstance(target, ast.Constant) and isinstance(target.value, str):
                names.add(target.value)
    return names


def interpolate(text: str) -> str:
    """Compose's substitution with the file's defaults (a required one gets a value)."""
    def sub(m: re.Match[str]) -> str:
        op, arg = m.group(2), m.group(3) or ""
        return arg if op in (":-", "-") else "set-by-operator"
    return INTERPOLATION.sub(sub, text)


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {str(k): str(v) for k, v in env.items()}


def test_compose_structure(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert {"redis", "worker", "api"} <= set(services)
    declared_volumes = set(compose.get("volumes") or {})
    for name, svc in services.items():
        assert "image" in svc or "build" in svc, f"{name}: needs image or build"
        for dep, spec in (svc.get("depends_on") or {}).items():
            assert dep in services, f"{name} depends on unknown service {dep}"
            if spec.get("condition") == "service_healthy":
                assert "healthcheck" in services[dep], f"{dep} has no healthcheck"
        for vol in svc.get("volumes") or []:
            source = vol.split(":", 1)[0]
            if not source.startswith((".", "/")):
                assert source in declared_volumes, f"{name}: undeclared volume {source}"
        if "healthcheck" in svc:
            assert svc["healthcheck"]["test"][0] in ("CMD", "CMD-SHELL", "NONE")
        for port in svc.get("ports") or []:
            assert re.fullmatch(r"[\d.:\-]+", interpolate(str(port))), port
    for name in ("worker", "api"):
        assert services[name]["build"] == "."
        assert services[name]["depends_on"]["redis"]["condition"] == "service_healthy"
        assert services[name].get("init") is True  # tini forwards SIGTERM to drain


def test_redis_is_durable_and_checked(compose: dict[str, Any]) -> None:
    redis = compose["services"]["redis"]
    cmd = [str(c) for c in redis["command"]]
    assert cmd[0] == "redis-server"
    options = dict(zip(cmd[1::2], cmd[2::2], strict=True))
    assert options["--appendonly"] == "yes"
    assert options["--maxmemory-policy"] == "noeviction"  # never drop a session's keys
    assert "redis-cli ping" in " ".join(redis["healthcheck"]["test"])
    assert any(v.endswith(":/data") for v in redis["volumes"])  # AOF survives the container


def test_every_command_is_a_real_cli_command(compose: dict[str, Any]) -> None:
    parser = _parser()
    parsed = {}
    for name, svc in compose["services"].items():
        if svc.get("build") != ".":
            continue
        argv = [interpolate(str(part)) for part in svc["command"]]
        assert argv[0] == "coordinator", f"{name}: runs {argv[0]}, not our CLI"
        try:
            parsed[name] = parser.parse_args(argv[1:])
        except SystemExit:
            pytest.fail(f"{name}: `{' '.join(argv)}` is not a valid coordinator command")
    assert parsed["worker"].command == "worker" and parsed["worker"].concurrency == 8
    api = parsed["api"]
    assert api.command == "serve" and api.host == "0.0.0.0"
    probe = " ".join(compose["services"]["api"]["healthcheck"]["test"])
    assert f"127.0.0.1:{api.port}/healthz" in probe


def test_env_names_are_the_ones_the_code_reads(compose: dict[str, Any]) -> None:
    known = env_names_read_by_code()
    assert {"REDIS_URL", "ALC_NAMESPACE", "ALC_API_TOKEN", "ALC_CONCURRENCY"} <= known
    for name, svc in compose["services"].items():
        if svc.get("build") != ".":
            continue
        env = environment(svc)
        assert env["REDIS_URL"] == "redis://redis:6379/0", name
        unknown = set(env) - known
        assert not unknown, f"{name} sets {unknown}, which no code reads"
    text = (ROOT / "docker-compose.yml").read_text()
    used = {m.group(1) for m in INTERPOLATION.finditer(text)}
    assert used - COMPOSE_ONLY <= known, used - COMPOSE_ONLY - known
    assert "--concurrency" in text and "${WORKER_CONCURRENCY" in text


def test_api_cannot_start_without_a_token(compose: dict[str, Any]) -> None:
    """It binds 0.0.0.0, where serve refuses to run without one: make compose say so
    up front (``:?``) instead of a restart loop."""
    raw = environment(compose["services"]["api"])["ALC_API_TOKEN"]
    m = INTERPOLATION.fullmatch(raw)
    assert m and m.group(1) == "ALC_API_TOKEN" and m.group(2) == ":?"


def test_image_installs_the_api_extra() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert re.search(r'pip install "?\.\[api\]"?', dockerfile)
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    api = " ".join(project["optional-dependencies"]["api"])
    assert all(dep in api for dep in ("fastapi", "uvicorn", "mcp"))
    assert project["scripts"]["coordinator"] == "coordinator.cli:main"
