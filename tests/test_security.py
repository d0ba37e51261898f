"""Security (issue 3, "Security"):

(a) **Least-privilege ACL**: the whole flow (a worker process and a registry) runs as a Redis
    user that may touch only its namespace's keys and channels and only the commands the
    coordinator sends (``ACL_COMMANDS``: the rule set docs/guarantees.md gives), with the
    default user disabled; the ACL log stays empty; the same user cannot read or write
    outside the namespace, or run admin commands.
(b) **TLS**: a throwaway CA and server certificate (``openssl``), ``redis-server`` listening
    on TLS only, the flow over ``rediss://...?ssl_cert_reqs=required&ssl_ca_certs=...``;
    plain TCP and an untrusted certificate are refused.
(c) **Namespaces isolate tenants**: two namespaces on one Redis never see each other's
    sessions, and workers of one namespace never run the other's jobs.
(d) **Nothing read from Redis is unpickled or evaluated**: a pickle planted in a session
    hash, a pending query, a job entry or an event channel is treated as corrupt bytes or a
    plain wake-up, never executed; workers run only registered strategies, whatever a
    session or queue entry names; no module of the coordinator imports a deserialiser that
    can run code.
"""

from __future__ import annotations

import ast
import asyncio
import os
import pickle
import shutil
import subprocess
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
from redis.exceptions import AuthenticationError, NoPermissionError, ResponseError

from coordinator import (
    CorruptState,
    Finished,
    NotFound,
    Paused,
    Phase,
    SessionError,
    SessionRegistry,
)
from coordinator.keys import Keys
from coordinator.settings import Settings
from tests.conftest import FakeCluster
from tests.helpers import assert_eventually
from tests.procs import FAST_SETTINGS, WorkerPool, answer_for
from tests.redis_proc import RedisProcess, RedisStartError
from workers import strategy
from workers.context import Context

ROOT = Path(__file__).resolve().parents[1]
WAIT_S = 30.0

# -- (a) least-privilege ACL --------------------------------------------------------------------

#: Every command the coordinator sends, directly or from its Lua scripts (ACL rules apply to
#: commands a script calls too), through its transport (EVALSHA, and SCRIPT LOAD on NOSCRIPT;
#: PING; SSUBSCRIBE / SUNSUBSCRIBE on the pub/sub connection; on a cluster, CLUSTER SLOTS for
#: the slot map and ASKING before a command redirected by ASK). Found by running the flow under
#: ``-@all`` plus this list, with the ACL log empty.
ACL_COMMANDS = (
    # scripts (registered once, called by SHA; redis-py loads them on NOSCRIPT)
    "evalsha", "script|load", "script|exists",
    # strings, keys, server time
    "get", "mget", "set", "del", "exists", "rename", "pexpire", "pttl", "incr", "time", "ping",
    # ctx.state counters (state_op.lua) and its index of keys (workers/kv.py)
    "incrby", "srem",
    # the server's maxmemory policy, read once per connection; WAIT for ALC_WAIT_REPLICAS
    "info", "wait",
    # session hashes
    "hget", "hmget", "hgetall", "hkeys", "hset", "hdel", "hexists", "hincrby",
    # journal and logs, strategy names (LLEN: the rounds a history's exchanges belong to)
    "llen", "lrange", "rpush", "ltrim", "sadd", "smembers",
    # registry / deadlines / workers indexes, and the phase indexes (listing, counts)
    "zadd", "zrange", "zrangebyscore", "zrevrangebyscore", "zrem", "zremrangebyscore",
    "zcard", "zcount",
    # the job stream and dead letters
    "xadd", "xack", "xdel", "xlen", "xrevrange", "xreadgroup", "xautoclaim", "xgroup|create",
    "xpending", "xgroup|delconsumer", "xinfo|consumers", "xclaim",
    # wake-ups (sharded pub/sub); which workers' connections are gone (their jobs and locks
    # are taken over)
    "spublish", "ssubscribe", "sunsubscribe", "pubsub|shardnumsub",
    # a cluster's slot map, and following an ASK redirection
    "cluster|slots", "asking",
)


#: redis-py client methods the coordinator calls -> the command each sends (None: no command)
_METHOD_COMMANDS: dict[str, str | None] = {
    "delete": "del", "exists": "exists", "get": "get", "mget": "mget", "set": "set",
    "ping": "ping",
    "time": "time", "hget": "hget", "hset": "hset", "hgetall": "hgetall", "hkeys": "hkeys",
    "lrange": "lrange", "sadd": "sadd", "smembers": "smembers", "zadd": "zadd",
    "zrange": "zrange", "zrangebyscore": "zrangebyscore", "zrem": "zrem", "xadd": "xadd",
    "xack": "xack", "xdel": "xdel", "xlen": "xlen", "xrevrange": "xrevrange",
    "xreadgroup": "xreadgroup", "xautoclaim": "xautoclaim", "xgroup_create": "xgroup|create",
    "xinfo_consumers": "xinfo|consumers",
    "subscribe": "ssubscribe", "unsubscribe": "sunsubscribe",
    "pipeline": None, "execute": None, "pubsub": None, "register_script": None,
    "get_message": None, "aclose": None,
    # dynamic: the command is the first element of a literal tuple, collected below
    "execute_command": None,
}
_RECEIVERS = {"client", "_client", "pipe", "ps", "_ps"}


def acl_rules(namespace: str, password: str) -> list[str]:
    """``ACL SETUSER <user> <rules...>``: the least-privilege rule set for one namespace."""
    return ["reset", "on", f">{password}", "resetkeys", f"~{namespace}:*", "resetchannels",
            f"&{namespace}:*", "-@all", *(f"+{c}" for c in ACL_COMMANDS)]


async def run_whole_flow(url: str, namespace: str, tmp_path: Path) -> list[str]:
    """A worker process and a registry on ``url``: every host call, GC, cancel, status, dead
    letters, heartbeats; returns the worker's log. Fails on any wrong result."""
    pool = WorkerPool(url, namespace, tmp_path)
    try:
        worker = await pool.start(concurrency=2)
        async with SessionRegistry.from_url(url, namespace=namespace,
                                            **FAST_SETTINGS) as reg:
            sid, ev = await reg.start_execution(
                "mp-rounds", {"tag": "flow", "rounds": 2, "width": 2}, timeout=WAIT_S)
            assert isinstance(ev, Paused)
            snaps = await reg.list_snapshots("full", include_history=True)
            assert set(snaps) == {sid}
            while isinstance(ev, Paused):
                for q in ev.queries:
                    ev = await reg.feed_response(sid, q.id, answer_for(q.prompt),
                                                 timeout=WAIT_S)
            assert isinstance(ev, Finished) and ev.state is Phase.COMPLETED, ev
            assert ev.result["rounds"][1][0] == answer_for("session flow: round 1, item 0")
            status = await reg.status(sid, "full", include_history=True)
            assert status["phase"] == "completed"
            assert len(status["metrics"]["conversation_history"]) == 4

            other, ev = await reg.start_execution(
                "mp-rounds", {"tag": "one", "rounds": 1, "width": 1}, timeout=WAIT_S)
            assert await reg.resolve_sole_pending_id(other) == "q-0"
            assert (await reg.cancel(other)).state is Phase.CANCELLED
            assert await reg.gc_sweep() == []
            assert await reg.dead_letters() == (0, [])
            assert worker.worker_id in await reg.workers()
        assert worker.proc.poll() is None, pool.logs()
        return worker.log_text().splitlines()
    finally:
        pool.close()


def test_acl_rule_set_covers_every_command_the_code_sends() -> None:
    """Static guard for the rule set: every command in the Lua scripts (the locks are ours
    too now), every command the coordinator and workers write raw through the transport, and
    every redis-py client method they call is granted. A new command fails here first: add
    it to ACL_COMMANDS and to docs/guarantees.md."""
    import re

    granted = set(ACL_COMMANDS)
    lua = [p.read_text() for p in ROOT.joinpath("coordinator", "scripts").glob("*.lua")]
    in_scripts = {f"{cmd.lower()}|{sub.lower()}" if cmd.lower() in CONTAINERS else cmd.lower()
                  for src in lua
                  for cmd, sub in re.findall(
                      r"redis\.p?call\(\s*'([A-Za-z]+)'(?:\s*,\s*'([A-Za-z]+)')?", src)}
    assert in_scripts, "no redis.call found: the pattern is out of date"
    missing = sorted(in_scripts - granted)
    unknown_methods = set()
    for path in [*ROOT.joinpath("coordinator").rglob("*.py"),
                 *ROOT.joinpath("workers").rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
                continue
            recv = node.func.value
            name = recv.id if isinstance(recv, ast.Name) else getattr(recv, "attr", "")
            if name not in _RECEIVERS:
                continue
            method = node.func.attr
            if method not in _METHOD_COMMANDS:
                unknown_methods.add(f"{path.relative_to(ROOT)}:{node.lineno} {name}.{method}")
            elif _METHOD_COMMANDS[method] not in (None, *granted):
                missing.append(str(_METHOD_COMMANDS[method]))
        missing += _raw_commands_not_granted(path, granted)
    assert not missing, f"commands sent but not granted by the ACL rule set: {missing}"
    assert not unknown_methods, (
        f"client calls this guard does not know (map them in _METHOD_COMMANDS): "
        f"{sorted(unknown_methods)}")


#: A container command's grant names its subcommand too (``XGROUP DELCONSUMER`` needs
#: ``xgroup|delconsumer``).
CONTAINERS = {"xgroup", "xinfo", "script", "client", "object", "config", "pubsub"}


def _raw_commands_not_granted(path: Path, granted: set[str]) -> list[str]:
    import re

    missing: list[str] = []
    # Commands written raw (``transport.execute("SMEMBERS", ...)``, batches of tuples such
    # as ``("HMGET", key, ...)``, ``pack(("EVALSHA", ...))``, ``conn.send("SUBSCRIBE", ...)``):
    # upper-case string literals opening a call's arguments or a tuple.
    # (A tuple of all-literal strings is data, such as a table header, not a command.)
    for node in ast.walk(ast.parse(path.read_text())):
        elts: list[ast.expr] = []
        if isinstance(node, ast.Tuple) and not all(
                isinstance(e, ast.Constant) for e in node.elts):
            elts = node.elts
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                and node.func.attr in ("execute", "send"):
            elts = node.args
        words = [e.value for e in elts[:2]
                 if isinstance(e, ast.Constant) and isinstance(e.value, str)]
        if words and re.fullmatch(r"[A-Z]+", words[0]):
            raw = words[0].lower()
            if raw in CONTAINERS and len(words) > 1:
                raw = f"{raw}|{words[1].lower()}"
            if raw not in granted:
                missing.append(f"{raw} ({path.relative_to(ROOT)}:{node.lineno})")
    return missing


@dataclass
class AclServer:
    server: RedisProcess
    admin: redis.Redis  # a separate all-powerful user, for the test's own checks
    url: str  # the application user's URL
    namespace: str = "alc"


@pytest.fixture
def acl_server(redis_server: RedisProcess) -> Any:
    """The private server with user ``alc-app`` (least privilege, namespace ``alc``), an
    admin user for the test, and the default user switched off."""
    setup = redis.Redis.from_url(redis_server.url)
    setup.execute_command("ACL", "SETUSER", "alc-app", *acl_rules("alc", "secret"))
    setup.execute_command("ACL", "SETUSER", "test-admin", "on", ">admin-pw", "~*", "&*",
                          "+@all")
    setup.execute_command("ACL", "SETUSER", "default", "off")
    setup.close()
    admin = redis.Redis(port=redis_server.port, username="test-admin", password="admin-pw")
    admin.acl_log_reset()
    try:
        yield AclServer(redis_server, admin,
                        f"redis://alc-app:secret@127.0.0.1:{redis_server.port}/0")
    finally:
        admin.close()


@pytest.mark.redis
@pytest.mark.slow
async def test_whole_flow_as_least_privilege_acl_user(acl_server: AclServer,
                                                      tmp_path: Path) -> None:
    # the default user is off: no anonymous access at all
    anonymous = redis.Redis(port=acl_server.server.port)
    with pytest.raises((AuthenticationError, ResponseError)):
        anonymous.ping()
    anonymous.close()

    log = await run_whole_flow(acl_server.url, acl_server.namespace, tmp_path)
    assert not [line for line in log if "NOPERM" in line or "Traceback" in line], log
    denials = acl_server.admin.acl_log()
    assert denials == [], f"the flow needed something the rule set does not grant: {denials}"


@pytest.mark.redis
def test_least_privilege_user_cannot_leave_its_namespace(acl_server: AclServer) -> None:
    app = redis.Redis.from_url(acl_server.url)
    try:
        app.set("alc:probe", "1")  # inside: fine
        assert app.get("alc:probe") == b"1"
        assert app.ping()  # health checks
        denied = [
            lambda: app.set("other:key", "1"),
            lambda: app.get("secret-of-someone-else"),
            lambda: app.hgetall("tenant2:{s-1}"),
            lambda: app.spublish("other:channel", "x"),
            lambda: app.eval("return 1", 0),  # arbitrary Lua: only registered scripts (SHA)
            lambda: app.evalsha(app.script_load("return redis.call('GET', KEYS[1])"), 1,
                                "other:key"),
            lambda: app.keys("*"),
            lambda: app.scan(0),
            lambda: app.flushall(),
            lambda: app.flushdb(),
            lambda: app.config_get("*"),
            lambda: app.execute_command("ACL", "WHOAMI"),
            lambda: app.execute_command("ACL", "LIST"),
            lambda: app.script_flush(),
            lambda: app.client_list(),
            lambda: app.execute_command("SHUTDOWN"),
        ]
        for call in denied:
            with pytest.raises(NoPermissionError):
                call()
        # a script loaded by this user may still only touch the namespace's keys
        sha = app.script_load("return redis.call('SET', KEYS[1], 'x')")
        with pytest.raises(NoPermissionError):
            app.evalsha(sha, 1, "outside:key")
        assert app.evalsha(sha, 1, "alc:inside") == b"OK"
        assert acl_server.admin.exists("other:key", "outside:key") == 0
        ps = app.pubsub()
        with pytest.raises(NoPermissionError):
            ps.ssubscribe("other:channel")
            ps.get_message(timeout=5)
        ps.close()
    finally:
        app.close()


@pytest.mark.redis
async def test_registry_on_another_namespace_is_refused_by_redis(acl_server: AclServer) -> None:
    """A registry configured with a namespace the user was not granted is refused on its
    first call, with a ``SessionError`` that says so (never redis-py's own
    ``NoPermissionError``); nothing is written."""
    async with SessionRegistry.from_url(acl_server.url, namespace="other",
                                        wait_timeout_s=5) as reg:
        with pytest.raises(SessionError, match="no permissions") as info:
            await reg.submit("mp-rounds", {"tag": "x"})
        assert not isinstance(info.value, redis.RedisError)
        assert "secret" not in str(info.value)
    assert acl_server.admin.keys("other:*") == []


# -- (b) TLS -----------------------------------------------------------------------------------


@dataclass
class Certs:
    ca: Path
    cert: Path
    key: Path
    other_ca: Path  # a CA that did not sign the server's certificate


def make_certs(d: Path) -> Certs:
    """A throwaway CA, a server certificate for 127.0.0.1 signed by it, and an unrelated CA.
    With ``openssl`` (Debian's redis-server is built with TLS; openssl comes with it)."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.fail("openssl is not installed: cannot make certificates for the TLS test "
                    "(apt-get install -y openssl)")

    def run(*args: str) -> None:
        subprocess.run([openssl, *args], cwd=d, check=True, capture_output=True, timeout=60)

    for name in ("ca", "other-ca"):
        run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-keyout",
            f"{name}.key", "-out", f"{name}.crt", "-subj", f"/CN=alc test {name}")
    run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr",
        "-subj", "/CN=127.0.0.1")
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    run("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
        "-CAcreateserial", "-days", "2", "-out", "server.crt", "-extfile", "san.ext")
    return Certs(d / "ca.crt", d / "server.crt", d / "server.key", d / "other-ca.crt")


class TlsRedisProcess(RedisProcess):
    """A ``RedisProcess`` that listens on TLS only (plain port 0), on the port it picked."""

    def __init__(self, certs: Certs) -> None:
        super().__init__()
        self.certs = certs

    @property
    def url(self) -> str:
        return (f"rediss://127.0.0.1:{self.port}/0?ssl_cert_reqs=required"
                f"&ssl_ca_certs={self.certs.ca}")

    def _command(self) -> list[str]:
        return [*super()._command(), "--port", "0", "--tls-port", str(self.port),
                "--tls-cert-file", str(self.certs.cert), "--tls-key-file", str(self.certs.key),
                "--tls-ca-cert-file", str(self.certs.ca), "--tls-auth-clients", "no"]

    def _wait_for_ping(self, proc: subprocess.Popen[bytes]) -> None:
        deadline = time.monotonic() + 10
        client = redis.Redis.from_url(self.url, socket_timeout=0.5, socket_connect_timeout=0.5)
        try:
            while True:
                if proc.poll() is not None:
                    raise RedisStartError(f"TLS redis-server exited with {proc.returncode}: "
                                          f"{self._log_tail()}")
                try:
                    if client.ping() and client.info("server")["process_id"] == proc.pid:
                        return
                except (redis.ConnectionError, redis.TimeoutError):
                    pass
                if time.monotonic() >= deadline:
                    raise RedisStartError(f"TLS redis-server did not answer: {self._log_tail()}")
                time.sleep(0.02)  # start-up polling, as RedisProcess does
        finally:
            client.close()


@pytest.fixture
def tls_server(tmp_path: Path) -> Any:
    certs_dir = tmp_path / "certs"
    certs_dir.mkdir()
    server = TlsRedisProcess(make_certs(certs_dir))
    try:
        server.start()
        yield server
    finally:
        server.close()


@pytest.mark.redis
@pytest.mark.slow
async def test_whole_flow_over_tls(tls_server: TlsRedisProcess, tmp_path: Path) -> None:
    assert tls_server.url.startswith("rediss://")
    log = await run_whole_flow(tls_server.url, "alc", tmp_path)
    assert not [line for line in log if "Traceback" in line or "SSL" in line], log

    port = tls_server.port
    plain = redis.Redis(port=port, socket_timeout=2, socket_connect_timeout=2)
    with pytest.raises((redis.ConnectionError, redis.TimeoutError)):
        plain.ping()  # no plain-text listener answers on the TLS port
    plain.close()
    untrusted = redis.Redis.from_url(
        f"rediss://127.0.0.1:{port}/0?ssl_cert_reqs=required"
        f"&ssl_ca_certs={tls_server.certs.other_ca}", socket_connect_timeout=2)
    with pytest.raises(redis.ConnectionError, match=r"CERTIFICATE_VERIFY_FAILED|certificate"):
        untrusted.ping()
    untrusted.close()


# -- (c) namespaces isolate tenants -------------------------------------------------------------


@strategy("tsec-pair")
async def sec_pair(ctx: Context, **_: Any) -> list[str]:
    return await ctx.llm_batch(["left?", "right?"])


@strategy("tsec-ask")
async def sec_ask(ctx: Context, tag: str = "", **_: Any) -> dict[str, str]:
    return {"tag": tag, "answer": await ctx.llm(f"{tag}?")}


async def test_namespaces_never_see_each_other(fake_cluster: FakeCluster) -> None:
    ns_a = fake_cluster.settings.namespace
    ns_b = ns_a + "b"
    reg_a = fake_cluster.registry()
    reg_b = fake_cluster.registry(namespace=ns_b)
    worker_a = await fake_cluster.worker()

    a_sid, a_first = await reg_a.start_execution("tsec-ask", {"tag": "a"})
    assert isinstance(a_first, Paused)
    # B has no worker yet: its session waits for one, and A's worker never takes it
    b_sid = await reg_b.submit("tsec-ask", {"tag": "b"})

    for other, sid in ((reg_b, a_sid), (reg_a, b_sid)):
        assert sid not in await other.list_snapshots()
        for call in (lambda o=other, s=sid: o.status(s),
                     lambda o=other, s=sid: o.wait_event(s, timeout=1),
                     lambda o=other, s=sid: o.feed_response(s, "q-0", "intruder"),
                     lambda o=other, s=sid: o.resolve_sole_pending_id(s),
                     lambda o=other, s=sid: o.cancel(s)):
            with pytest.raises(NotFound) as info:
                await call()
            assert info.value.session_id == sid

    done = await reg_a.feed_response(a_sid, "q-0", "for a")
    assert isinstance(done, Finished) and done.result == {"tag": "a", "answer": "for a"}
    assert worker_a.stats.steps == 2  # A's start and resume, nothing of B's
    b_status = await reg_b.status(b_sid)
    assert b_status["phase"] == "running" and b_status["metrics"]["llm_calls"] == 0
    assert set(await reg_a.workers()) == {worker_a.id}
    assert await reg_b.workers() == {}

    worker_b = await fake_cluster.worker(namespace=ns_b)
    b_first = await reg_b.wait_event(b_sid, timeout=5)
    assert isinstance(b_first, Paused) and b_first.queries[0].prompt == "b?"
    done_b = await reg_b.feed_response(b_sid, "q-0", "for b")
    assert isinstance(done_b, Finished) and done_b.result == {"tag": "b", "answer": "for b"}
    assert worker_b.stats.steps == 2 and worker_a.stats.steps == 2

    # GC of one namespace expires only its own idle sessions
    idle_a, _ = await reg_a.start_execution("tsec-ask", {"tag": "idle-a"})
    idle_b, _ = await reg_b.start_execution("tsec-ask", {"tag": "idle-b"})
    later = time.time_ns() // 1_000_000 + 10 * 3600 * 1000
    assert await reg_a.gc_sweep(now_ms=later) == [idle_a]
    assert set(await reg_b.list_snapshots()) == {idle_b}

    # every key either namespace wrote carries its own prefix
    keys = [k.decode() for k in await reg_a.client.keys("*")]
    assert keys and all(k.startswith((f"{ns_a}:", f"{ns_b}:")) for k in keys), keys
    assert any(k.startswith(f"{ns_b}:") for k in keys)


@pytest.mark.parametrize("bad", ["", "a:b", "a{b}", "a b", "tab\t"])
def test_a_namespace_cannot_reach_into_another(bad: str) -> None:
    """Namespaces cannot contain ':' (a prefix of another namespace's keys), hash-tag braces
    or whitespace."""
    with pytest.raises(ValueError, match="namespace"):
        Keys(bad)
    with pytest.raises(ValueError, match="namespace"):
        SessionRegistry(redis.asyncio.Redis(), settings=Settings(namespace=bad))


# -- (d) nothing read from Redis is unpickled ---------------------------------------------------


class _Payload:
    """Unpickling this runs ``os.mkdir(path)``."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.mkdir, (str(self.path),))


@pytest.fixture
async def poisoned(fake_cluster: FakeCluster, tmp_path: Path) -> AsyncIterator[tuple[
        SessionRegistry, Any, Path, bytes]]:
    worker = await fake_cluster.worker()
    reg = fake_cluster.registry()
    marker = tmp_path / "pickle-was-executed"
    payload = pickle.dumps(_Payload(marker))
    yield reg, worker, marker, payload
    assert not marker.exists(), "a pickle read from Redis was executed"
    pickle.loads(payload)  # the payload is live: unpickling it does run code
    assert marker.is_dir()


async def test_pickle_in_a_session_hash_is_corrupt_state_never_executed(
    poisoned: tuple[SessionRegistry, Any, Path, bytes],
) -> None:
    reg, worker, marker, payload = poisoned
    sid, _ = await reg.start_execution("tsec-ask", {"tag": "p"})
    sk = reg.keys.session(sid)
    for name in ("input", "budget", "progress"):
        await reg.client.hset(sk.session, name, payload)
    # no live holder: the next step is a replay, which decodes all of these
    await reg.client.hdel(sk.session, "holder", "holder_ch")
    with pytest.raises(CorruptState) as info:
        await reg.feed_response(sid, "q-0", "x")
    assert info.value.session_id == sid and "cannot decode" in info.value.message
    assert await reg.client.hget(sk.session, "phase") == b"failed"  # the worker failed it
    for call in (lambda: reg.wait_event(sid, timeout=1), lambda: reg.status(sid)):
        try:
            await call()
        except CorruptState as exc:
            assert exc.session_id == sid
    assert (await reg.dead_letters())[1][0]["reason"] == "corrupt state"
    assert not marker.exists()
    ok, _ = await reg.start_execution("tsec-ask", {"tag": "after"})  # the worker goes on
    assert isinstance(await reg.feed_response(ok, "q-0", "y"), Finished)
    assert all(not t.done() for t in worker._loops)


async def test_pickle_in_queries_answers_journal_jobs_and_events_is_never_executed(
    poisoned: tuple[SessionRegistry, Any, Path, bytes],
) -> None:
    reg, worker, marker, payload = poisoned
    # a pending query and a journal entry: observers and the worker's replay decode them
    sid, _ = await reg.start_execution("tsec-ask", {"tag": "q"})
    sk = reg.keys.session(sid)
    await reg.client.hset(sk.pending, "q-0", payload)
    await reg.client.rpush(sk.journal, payload)
    await reg.client.rpush(sk.logs, payload)
    for call in (lambda: reg.list_snapshots("full", include_history=True),
                 lambda: reg.status(sid, "full", include_history=True),
                 lambda: reg.wait_event(sid, timeout=1)):
        try:
            await call()
        except SessionError as exc:
            assert isinstance(exc, CorruptState), exc
    # an answer the worker decodes when it resumes the session
    sid2, _ = await reg.start_execution("tsec-pair", {})
    await reg.feed_response(sid2, "q-0", "fine")
    await reg.client.hset(reg.keys.session(sid2).answers, "q-0", payload)
    outcome: Any
    try:
        outcome = await reg.feed_response(sid2, "q-1", "fine too")
    except CorruptState as exc:
        outcome = exc
    assert isinstance(outcome, CorruptState | Finished), outcome
    assert await reg.client.hget(reg.keys.session(sid2).session, "phase") == b"failed"
    # a job whose fields are a pickle; a pickle published on a session's event channel
    await reg.client.xadd(reg.keys.jobs, {"k": payload, "sid": payload})
    sid3 = await reg.submit("tsec-ask", {"tag": "e"})
    waiter = asyncio.create_task(reg.wait_event(sid3, timeout=5))
    await reg.client.spublish(reg.keys.session(sid3).channel, payload)
    ev = await waiter
    assert isinstance(ev, Paused) and ev.queries[0].prompt == "e?"

    async def job_dead_lettered() -> bool:
        _, letters = await reg.dead_letters()
        return any(e["reason"].startswith("unknown job kind") for e in letters)

    await assert_eventually(job_dead_lettered, timeout=5,
                            message="the pickled job was not dead-lettered")
    assert not marker.exists()
    assert all(not t.done() for t in worker._loops)


async def test_workers_run_only_registered_strategies(fake_cluster: FakeCluster,
                                                      tmp_path: Path) -> None:
    """A session naming a module function (as a queue entry or a forged session could) is
    failed by name; nothing is imported or called."""
    await fake_cluster.worker()
    reg = fake_cluster.registry()
    marker = tmp_path / "ran"
    await reg.client.delete(reg.keys.strategies)  # so the registry cannot refuse the names
    for name in ("os.system", "os:mkdir", "builtins.eval", "subprocess.run",
                 "workers.builtin"):
        sid = await reg.submit(name, {"command": f"mkdir {marker}", "args": [str(marker)]})
        ev = await reg.wait_event(sid, timeout=5)
        assert isinstance(ev, Finished) and ev.state is Phase.FAILED, ev
        assert ev.error is not None and f"strategy {name!r} is not registered" in ev.error
    assert not marker.exists()


_CODE_RUNNING = {"pickle", "cPickle", "_pickle", "marshal", "shelve", "dill", "cloudpickle",
                 "jsonpickle", "joblib"}


def test_no_module_can_deserialise_code() -> None:
    """No module of the coordinator or the workers imports a deserialiser that can run code,
    calls ``eval``/``exec``, or uses ``yaml.load`` (as opposed to ``safe_load``)."""
    found = []
    for path in sorted([*ROOT.joinpath("coordinator").rglob("*.py"),
                        *ROOT.joinpath("workers").rglob("*.py")]):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name.split(".")[0] for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module.split(".")[0]]
            if _CODE_RUNNING & set(names):
                found.append(f"{path.relative_to(ROOT)}:{node.lineno} imports {names}")
            if isinstance(node, ast.Call):
                fn = node.func
                if isinstance(fn, ast.Name) and fn.id in {"eval", "exec", "__import__"}:
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno} calls {fn.id}")
                if isinstance(fn, ast.Attribute) and fn.attr in {"load", "unsafe_load"} and \
                        isinstance(fn.value, ast.Name) and fn.value.id == "yaml":
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno} yaml.{fn.attr}")
    assert not found, found
