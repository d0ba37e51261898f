"""docker-compose.yml, docker-compose.sentinel.yml, deploy/ and the Dockerfile, checked
without a Docker engine (none runs here): the compose keys a deployment relies on, that every
command of a service built from our image is a real ``coordinator`` command (parsed by the
CLI's own parser), that every environment name a file sets is one the code actually reads
(and its value a valid setting), and that the Sentinel variant hangs together: the Redis
config files it mounts, the sentinels' quorum and monitored primary, and a ``REDIS_URL`` that
parses and names every sentinel.
"""

from __future__ import annotations

import ast
import os
import re
import shlex
import subprocess
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import pytest
import yaml

from coordinator.cli import _parser
from coordinator.settings import Settings
from coordinator.transport.target import SENTINEL_PORT, Target

ROOT = Path(__file__).resolve().parents[1]
#: ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?error}, ${VAR?error}
INTERPOLATION = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}")
#: Knobs of the compose file itself (they never reach a process as themselves).
COMPOSE_ONLY = {"WORKER_CONCURRENCY", "API_PORT"}
STANDALONE = "docker-compose.yml"
SENTINEL = "docker-compose.sentinel.yml"
COMPOSE_FILES = (STANDALONE, SENTINEL)


def load(name: str) -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((ROOT / name).read_text())
    return data


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return load(STANDALONE)


@pytest.fixture(scope="module")
def sentinel_compose() -> dict[str, Any]:
    return load(SENTINEL)


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


def check_structure(data: dict[str, Any], file: str) -> None:
    """What compose itself would refuse, or a deployment would trip over, in any file."""
    services = data["services"]
    declared_volumes = set(data.get("volumes") or {})
    for name, svc in services.items():
        assert "image" in svc or "build" in svc, f"{file} {name}: needs image or build"
        for dep, spec in (svc.get("depends_on") or {}).items():
            assert dep in services, f"{file}: {name} depends on unknown service {dep}"
            if spec.get("condition") == "service_healthy":
                assert "healthcheck" in services[dep], f"{file}: {dep} has no healthcheck"
        for vol in svc.get("volumes") or []:
            source = vol.split(":", 1)[0]
            if source.startswith((".", "/")):
                assert (ROOT / source).exists(), f"{file} {name}: mounts missing {source}"
            else:
                assert source in declared_volumes, f"{file} {name}: undeclared volume {source}"
        if "healthcheck" in svc:
            assert svc["healthcheck"]["test"][0] in ("CMD", "CMD-SHELL", "NONE")
        for port in svc.get("ports") or []:
            assert re.fullmatch(r"[\d.:\-]+", interpolate(str(port))), port


def test_compose_structure(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert {"redis", "worker", "api"} <= set(services)
    check_structure(compose, STANDALONE)
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


@pytest.mark.parametrize("file", COMPOSE_FILES)
def test_every_command_is_a_real_cli_command(file: str) -> None:
    data = load(file)
    parser = _parser()
    parsed = {}
    for name, svc in data["services"].items():
        if svc.get("build") != ".":
            continue
        argv = [interpolate(str(part)) for part in svc["command"]]
        assert argv[0] == "coordinator", f"{file} {name}: runs {argv[0]}, not our CLI"
        try:
            parsed[name] = parser.parse_args(argv[1:])
        except SystemExit:
            pytest.fail(f"{file} {name}: `{' '.join(argv)}` is not a valid coordinator command")
    assert parsed["worker"].command == "worker" and parsed["worker"].concurrency == 8
    api = parsed["api"]
    assert api.command == "serve" and api.host == "0.0.0.0"
    probe = " ".join(data["services"]["api"]["healthcheck"]["test"])
    assert f"127.0.0.1:{api.port}/healthz" in probe


@pytest.mark.parametrize("file", COMPOSE_FILES)
def test_env_names_are_the_ones_the_code_reads(file: str, monkeypatch: pytest.MonkeyPatch,
                                               ) -> None:
    known = env_names_read_by_code()
    assert {"REDIS_URL", "ALC_NAMESPACE", "ALC_API_TOKEN", "ALC_CONCURRENCY"} <= known
    for name, svc in load(file)["services"].items():
        if svc.get("build") != ".":
            continue
        env = environment(svc)
        if file == STANDALONE:
            assert env["REDIS_URL"] == "redis://redis:6379/0", name
        unknown = set(env) - known
        assert not unknown, f"{file} {name} sets {unknown}, which no code reads"
        # ... and what it sets is a valid setting, read the way a process reads it.
        for var in [v for v in os.environ if v.startswith("ALC_")]:
            monkeypatch.delenv(var)
        for var, value in env.items():
            monkeypatch.setenv(var, interpolate(value))
        settings = Settings.from_url()
        assert settings.url == interpolate(env["REDIS_URL"])
        Target.parse(settings.url)
    text = (ROOT / file).read_text()
    used = {m.group(1) for m in INTERPOLATION.finditer(text)}
    assert used - COMPOSE_ONLY <= known, used - COMPOSE_ONLY - known
    assert "--concurrency" in text and "${WORKER_CONCURRENCY" in text


@pytest.mark.parametrize("file", COMPOSE_FILES)
def test_api_cannot_start_without_a_token(file: str) -> None:
    """It binds 0.0.0.0, where serve refuses to run without one: make compose say so
    up front (``:?``) instead of a restart loop."""
    raw = environment(load(file)["services"]["api"])["ALC_API_TOKEN"]
    m = INTERPOLATION.fullmatch(raw)
    assert m and m.group(1) == "ALC_API_TOKEN" and m.group(2) == ":?"


def test_image_installs_the_api_extra() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert re.search(r'pip install "?\.\[api\]"?', dockerfile)
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    api = " ".join(project["optional-dependencies"]["api"])
    assert all(dep in api for dep in ("fastapi", "uvicorn", "mcp"))
    assert project["scripts"]["coordinator"] == "coordinator.cli:main"


# -- the Sentinel variant ---------------------------------------------------------------------

#: Where the Sentinel variant mounts deploy/ and keeps each node's writable copy.
TEMPLATES, DATA = "/etc/alc", "/data"
SENTINEL_SERVICES = {"redis-primary", "redis-replica", "sentinel-1", "sentinel-2", "sentinel-3",
                     "worker", "api"}
#: What must be the same on every data node: after a failover either one is the primary.
DURABILITY = ("appendonly", "appendfsync", "maxmemory-policy", "min-replicas-to-write",
              "min-replicas-max-lag")


def conf_lines(text: str) -> list[list[str]]:
    """A redis.conf as Redis reads it: one directive per line, arguments quoted as shell
    words are; comments and blank lines dropped."""
    lines = []
    for raw in text.splitlines():
        words = shlex.split(raw, comments=True)
        if words:
            lines.append([words[0].lower(), *words[1:]])
    return lines


def argv_lines(args: list[str]) -> list[list[str]]:
    """redis-server's command-line options as config lines: each ``--name`` starts one."""
    lines: list[list[str]] = []
    for arg in args:
        if arg.startswith("--"):
            lines.append([arg[2:].lower()])
        else:
            assert lines, f"argument {arg!r} before any --option"
            lines[-1].append(arg)
    return lines


def mounts(svc: dict[str, Any]) -> dict[str, tuple[str, bool]]:
    """Container path -> (source, read-only) for every volume of a service."""
    out = {}
    for vol in svc.get("volumes") or []:
        source, target, *mode = vol.split(":")
        out[target] = (source, "ro" in mode)
    return out


def host_file(svc: dict[str, Any], path: str) -> Path:
    """The file of this repository a service sees at ``path`` through a bind mount."""
    for target, (source, _) in mounts(svc).items():
        if source.startswith(".") and (path == target or path.startswith(target + "/")):
            return ROOT / source / path[len(target):].lstrip("/")
    raise AssertionError(f"{path} is not in any bind mount of {svc}")


@dataclass
class Node:
    """A redis-server service of the Sentinel variant: its template and effective config."""

    name: str
    svc: dict[str, Any]
    template: Path
    lines: list[list[str]]

    @property
    def sentinel(self) -> bool:
        return ["sentinel"] in self.lines

    def get(self, directive: str, default: str | None = None) -> str | None:
        values = [line[1:] for line in self.lines if line[0] == directive]
        return " ".join(values[-1]) if values else default

    def sentinel_lines(self, what: str) -> list[list[str]]:
        return [line[2:] for line in self.lines if line[:2] == ["sentinel", what]]

    @property
    def port(self) -> int:
        return int(self.get("port") or (SENTINEL_PORT if self.sentinel else 6379))


def redis_nodes(data: dict[str, Any]) -> dict[str, Node]:
    """Every service of ``data`` that runs redis-server through deploy/start-redis.sh on a
    template from deploy/, with the options it adds on the command line."""
    nodes = {}
    for name, svc in data["services"].items():
        if svc.get("build") == ".":
            continue
        assert svc["image"].startswith("redis:"), f"{name}: {svc['image']}"
        entry = [str(x) for x in svc["entrypoint"]]
        assert entry == ["sh", f"{TEMPLATES}/start-redis.sh"], f"{name}: entrypoint {entry}"
        template, *args = (str(x) for x in svc["command"])
        path = host_file(svc, template)
        nodes[name] = Node(name, svc, path,
                           conf_lines(path.read_text()) + argv_lines(args))
    return nodes


def test_start_script_runs_redis_on_a_writable_copy(sentinel_compose: dict[str, Any]) -> None:
    """Sentinel rewrites the config files (its own, and a data node's role after a
    failover), so every node runs on its own copy in a named volume, from a read-only
    template; and through the image's entrypoint, which drops root."""
    script = ROOT / "deploy" / "start-redis.sh"
    subprocess.run(["sh", "-n", str(script)], check=True)  # it parses as a shell script
    text = script.read_text()
    assert f'conf={DATA}/$(basename "$template")' in text
    assert '[ -f "$conf" ] || cp "$template" "$conf"' in text  # first start only
    assert 'exec docker-entrypoint.sh redis-server "$conf" "$@"' in text
    declared = set(sentinel_compose.get("volumes") or {})
    for name, node in redis_nodes(sentinel_compose).items():
        where = mounts(node.svc)
        source, read_only = where[TEMPLATES]
        assert source == "./deploy" and read_only, f"{name}: templates not mounted read-only"
        source, read_only = where[DATA]
        assert source in declared and not read_only, f"{name}: /data is not its own volume"
    data_volumes = [mounts(n.svc)[DATA][0] for n in redis_nodes(sentinel_compose).values()]
    assert len(set(data_volumes)) == len(data_volumes), "two nodes share a config copy"


def test_sentinel_variant_structure(sentinel_compose: dict[str, Any],
                                    compose: dict[str, Any]) -> None:
    services = sentinel_compose["services"]
    assert set(services) >= SENTINEL_SERVICES, SENTINEL_SERVICES - set(services)
    check_structure(sentinel_compose, SENTINEL)
    # A project of its own: never shares containers or volumes with the standalone stack.
    assert sentinel_compose.get("name") and sentinel_compose["name"] != compose.get("name")
    # worker and api are the standalone ones, on another Redis.
    for name in ("worker", "api"):
        ours, theirs = services[name], compose["services"][name]
        for key in ("build", "command", "init", "restart", "stop_grace_period", "ports",
                    "healthcheck"):
            assert ours.get(key) == theirs.get(key), f"{name}: {key} differs from {STANDALONE}"
        env, base = environment(ours), environment(theirs)
        assert {k: v for k, v in env.items() if k != "REDIS_URL"}.items() >= \
            {k: v for k, v in base.items() if k != "REDIS_URL"}.items(), name


def test_data_nodes_are_one_primary_and_its_replicas_with_the_same_durability(
    sentinel_compose: dict[str, Any],
) -> None:
    nodes = [n for n in redis_nodes(sentinel_compose).values() if not n.sentinel]
    primaries = [n for n in nodes if n.get("replicaof") is None]
    assert [n.name for n in primaries] == ["redis-primary"]
    primary = primaries[0]
    assert len(nodes) >= 2, "no replica to fail over to"
    for node in nodes:
        # Hostnames everywhere: each node announces the name the others reach it by.
        assert node.get("replica-announce-ip") == node.name, node.name
        if node is not primary:
            assert node.get("replicaof") == f"{primary.name} {primary.port}", node.name
        assert node.get("appendonly") == "yes", node.name  # a restart keeps the sessions
        assert node.get("maxmemory-policy") == "noeviction", node.name
        assert int(node.get("min-replicas-to-write") or 0) >= 1, node.name
        assert 0 < int(node.get("min-replicas-max-lag") or 0) <= 10, node.name
        assert [node.get(d) for d in DURABILITY] == [primary.get(d) for d in DURABILITY], \
            f"{node.name} and {primary.name} differ in durability"
        probe = " ".join(node.svc["healthcheck"]["test"])
        assert "role:master" in probe and "master_link_status:up" in probe, node.name


def test_sentinels_agree_and_watch_the_primary(sentinel_compose: dict[str, Any]) -> None:
    nodes = redis_nodes(sentinel_compose)
    sentinels = [n for n in nodes.values() if n.sentinel]
    assert len(sentinels) >= 3, "fewer than 3 sentinels cannot fail over after losing one"
    monitors = {tuple(line) for s in sentinels for line in s.sentinel_lines("monitor")}
    assert len(monitors) == 1, f"the sentinels monitor different things: {monitors}"
    service, host, port, quorum = next(iter(monitors))
    assert host in nodes and not nodes[host].sentinel, f"monitors {host}, not a data node"
    assert nodes[host].get("replicaof") is None, f"monitors {host}, which is a replica"
    assert int(port) == nodes[host].port
    # A quorum the sentinels can reach, and one a minority cannot.
    assert len(sentinels) // 2 < int(quorum) <= len(sentinels), (quorum, len(sentinels))
    for s in sentinels:
        order = [line[:2] for line in s.lines]
        # Hostnames: accepted (before the monitor line that names one) and handed out.
        assert ["sentinel", "resolve-hostnames"] in order
        assert order.index(["sentinel", "resolve-hostnames"]) < order.index(["sentinel",
                                                                              "monitor"])
        assert s.sentinel_lines("resolve-hostnames") == [["yes"]], s.name
        assert s.sentinel_lines("announce-hostnames") == [["yes"]], s.name
        assert s.sentinel_lines("announce-ip") == [[s.name]], s.name
        assert s.get("protected-mode") == "no", s.name  # reached from the other containers
        down_after = s.sentinel_lines("down-after-milliseconds")
        assert down_after and down_after[0][0] == service, s.name
        probe = " ".join(s.svc["healthcheck"]["test"])
        assert f"-p {s.port} sentinel ckquorum {service}" in probe, s.name
        # A sentinel resolves the monitored name when it starts.
        assert s.svc["depends_on"][host]["condition"] == "service_healthy", s.name


def test_every_coordinator_process_follows_the_primary_through_all_sentinels(
    sentinel_compose: dict[str, Any],
) -> None:
    services = sentinel_compose["services"]
    nodes = redis_nodes(sentinel_compose)
    sentinels = {(n.name, n.port) for n in nodes.values() if n.sentinel}
    data_nodes = [n for n in nodes.values() if not n.sentinel]
    (service, *_), = {tuple(line) for n in nodes.values() if n.sentinel
                      for line in n.sentinel_lines("monitor")}
    coordinators = [name for name, svc in services.items() if svc.get("build") == "."]
    assert set(coordinators) == {"worker", "api"}
    for name in coordinators:
        svc = services[name]
        env = environment(svc)
        target = Target.parse(interpolate(env["REDIS_URL"]))
        assert set(target.sentinels) == sentinels, f"{name}: {target.sentinels}"
        assert len(target.sentinels) == len(sentinels)
        assert (target.service, target.db) == (service, 0), name
        for dep in nodes:
            assert svc["depends_on"][dep]["condition"] == "service_healthy", f"{name}: {dep}"
        # Durability on: a caller hears of a change once a replica has it.
        replicas = int(interpolate(env["ALC_WAIT_REPLICAS"]))
        assert 1 <= replicas <= len(data_nodes) - 1, f"{name}: ALC_WAIT_REPLICAS={replicas}"


def test_readme_shows_how_to_run_the_sentinel_variant(sentinel_compose: dict[str, Any]) -> None:
    readme = (ROOT / "README.md").read_text()
    deploy = readme[readme.index("\n## Deploy"):]
    deploy = deploy[:deploy.index("\n## ", 1)]
    assert f"docker compose -f {SENTINEL}" in deploy
    url = environment(sentinel_compose["services"]["worker"])["REDIS_URL"]
    assert url in deploy
