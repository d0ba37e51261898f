"""The transport on a real Redis Cluster: cluster URLs, routing by slot, MOVED, sharded pub/sub
per primary, and a primary's SIGKILL (its replica takes over within the call's budget)."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Iterator

import pytest
import redis

from coordinator.errors import InvalidInput
from coordinator.transport import RESYNC, Target, Transport
from coordinator.transport.slots import key_slot, routing_key
from tests.helpers import assert_eventually
from tests.topology import ClusterGroup, running

BOUND_S = 15.0


# -- URLs and slots (no server) -----------------------------------------------------------------


@pytest.mark.parametrize(("url", "seeds", "safe"), [
    ("redis+cluster://10.0.0.1:7000,10.0.0.2:7001", (("10.0.0.1", 7000), ("10.0.0.2", 7001)),
     "redis+cluster://10.0.0.1:7000,10.0.0.2:7001"),
    ("rediss+cluster://app:s3cret@h1:7000/0?client_name=w", (("h1", 7000),),
     "rediss+cluster://app:***@h1:7000/0?client_name=w"),
    ("redis+cluster://h1,[::1]:7002", (("h1", 6379), ("::1", 7002)),
     "redis+cluster://h1,[::1]:7002"),
])
def test_cluster_urls_name_their_seeds(url: str, seeds: tuple[tuple[str, int], ...],
                                       safe: str) -> None:
    target = Target.parse(url)
    assert target.is_cluster and target.seeds == seeds and target.db == 0
    assert target.safe_url == safe


@pytest.mark.parametrize(("url", "says"), [
    ("redis+cluster://u:s3cret@h1:7000/2", "only database 0"),
    ("redis+cluster://u:s3cret@h1:7000?db=1", "only database 0"),
    ("redis+cluster://u:s3cret@h1:x", "not a cluster node host:port"),
    ("redis+cluster://u:s3cret@h1:70000", "not a cluster node host:port"),
    ("redis+cluster://u:s3cret@h1:7000,", "not a cluster node host:port"),
    ("redis+cluster://u:s3cret@h1:7000?colour=red", "unknown option(s) colour"),
])
def test_bad_cluster_urls_are_refused_with_the_password_masked(url: str, says: str) -> None:
    with pytest.raises(InvalidInput) as caught:
        Target.parse(url)
    assert says in str(caught.value)
    assert "s3cret" not in str(caught.value) and "***" in str(caught.value)
    with pytest.raises(InvalidInput):
        Transport.from_url(url)


def test_unknown_schemes_are_told_the_cluster_scheme() -> None:
    with pytest.raises(InvalidInput, match=r"redis\+cluster://"):
        Target.parse("cluster://h1:7000")


def test_commands_route_by_the_key_redis_would_hash() -> None:
    assert key_slot("{user1000}.following") == key_slot("user1000")
    assert key_slot("foo{}{bar}") == key_slot(b"foo{}{bar}") != key_slot("bar")
    assert key_slot("foo{{bar}}zap") == key_slot("{bar")
    assert routing_key(("EVALSHA", "ab", 2, "k1", "k2", "arg")) == "k1"
    assert routing_key(("EVALSHA", "ab", 0, "arg")) is None
    assert routing_key(("XREADGROUP", "GROUP", "g", "c", "COUNT", 1, "STREAMS", "s", ">")) == "s"
    assert routing_key(("XGROUP", "CREATE", "s", "g", "$")) == "s"
    assert routing_key(("WAIT", 1, 100)) is None
    assert routing_key(("HSET", "h", "f", 1)) == "h"


# -- on a real cluster ----------------------------------------------------------------------------

def port_of(node: str) -> int:
    return int(node.rpartition(":")[2])


def plain(port: int) -> redis.Redis:
    return redis.Redis(host="127.0.0.1", port=port, socket_timeout=5)


def key_on(ranges: list[tuple[int, int]], prefix: str) -> str:
    """A key whose slot is in ``ranges``."""
    for n in itertools.count():
        key = f"{prefix}:{n}"
        if any(lo <= key_slot(key) <= hi for lo, hi in ranges):
            return key
    raise AssertionError("unreachable")


@pytest.fixture
async def transport(redis_cluster: ClusterGroup) -> AsyncIterator[Transport]:
    t = Transport.from_url(redis_cluster.url, timeout_s=5.0)
    try:
        yield t
    finally:
        await t.aclose()


@pytest.fixture
def cluster_keys(redis_cluster: ClusterGroup) -> Iterator[None]:
    yield
    for node in redis_cluster.primaries():
        with plain(node.port) as client:
            client.flushall()


@pytest.mark.redis
@pytest.mark.cluster
async def test_each_command_runs_on_the_primary_that_owns_its_key(
    transport: Transport, cluster_keys: None
) -> None:
    primaries = await transport.primaries()
    assert transport.is_cluster and len(primaries) == 3
    assert sorted(r for _, ranges in primaries for r in ranges)[0][0] == 0
    sha = await transport.execute("SCRIPT", "LOAD", "return 1", node=primaries[0][0])
    for i, (node, ranges) in enumerate(primaries):
        key, scripted = key_on(ranges, f"rt{i}"), key_on(ranges, f"sc{i}")
        assert await transport.execute("SET", key, f"v{i}") in (b"OK", "OK")
        script = "return redis.call('SET', KEYS[1], ARGV[1])"
        await transport.evalsha(_sha(script), script, [scripted], [f"s{i}"])
        with plain(port_of(node)) as owner:  # on the owner itself: no MOVED, no redirect
            assert owner.get(key) == f"v{i}".encode()
            assert owner.get(scripted) == f"s{i}".encode()
        info = await transport.execute_on(node, "INFO", "server")
        assert f"tcp_port:{port_of(node)}" in info.decode()
        assert await transport.client.get(key) == f"v{i}".encode()  # the admin RedisCluster
    assert sha
    # Every command went straight to its owner: the slot map was read once, never refreshed.
    assert transport._topology is not None and transport._topology.refreshes == 1


def _sha(script: str) -> str:
    import hashlib

    return hashlib.sha1(script.encode()).hexdigest()


@pytest.mark.redis
@pytest.mark.cluster
async def test_a_batch_over_every_primary_answers_in_order(
    transport: Transport, cluster_keys: None
) -> None:
    primaries = await transport.primaries()
    keys = [key_on(ranges, f"b{i}") for i, (_, ranges) in enumerate(primaries)]
    commands: list[tuple[object, ...]] = []
    for n, key in enumerate(keys * 3):
        commands.append(("RPUSH", key, n))
    commands += [("LRANGE", key, 0, -1) for key in keys]
    commands.append(("HGET", keys[1], "f"))  # WRONGTYPE: an error reply stays in its place
    replies = await transport.execute_many(commands)
    assert replies[:9] == [1, 1, 1, 2, 2, 2, 3, 3, 3]
    assert replies[9:12] == [[b"0", b"3", b"6"], [b"1", b"4", b"7"], [b"2", b"5", b"8"]]
    assert isinstance(replies[12], redis.ResponseError) and "WRONGTYPE" in str(replies[12])


@pytest.mark.redis
@pytest.mark.cluster
async def test_moved_is_followed_after_a_slot_moves(
    redis_cluster: ClusterGroup, transport: Transport, cluster_keys: None
) -> None:
    primaries = await transport.primaries()
    (old, old_ranges), (new, _) = primaries[0], primaries[1]
    key = key_on(old_ranges, "mv")
    slot = key_slot(key)
    nodes = {n.port: n for n in redis_cluster.live()}
    new_id = redis_cluster.node_id(nodes[port_of(new)])
    old_id = redis_cluster.node_id(nodes[port_of(old)])

    def move(to: str) -> None:  # the slot is empty: SETSLOT NODE on every primary moves it
        for node in redis_cluster.primaries():
            with plain(node.port) as client:
                client.execute_command("CLUSTER", "SETSLOT", slot, "NODE", to)

    assert transport._topology is not None
    before = transport._topology.refreshes
    move(new_id)
    try:
        assert await transport.execute("SET", key, "moved") in (b"OK", "OK")
        with plain(port_of(new)) as owner:
            assert owner.get(key) == b"moved"
        assert transport._topology.refreshes > before  # it learnt the new map
        assert await transport.execute("GET", key) == b"moved"
    finally:
        with plain(port_of(new)) as owner:
            owner.delete(key)
        move(old_id)
        await assert_eventually(lambda: redis_cluster._ready(), timeout=BOUND_S)


@pytest.mark.redis
@pytest.mark.cluster
async def test_a_subscription_on_each_primary_hears_spublish(transport: Transport) -> None:
    primaries = await transport.primaries()
    mux = transport.multiplexer(key_on(primaries[0][1], "home"))
    subs = []
    for i, (node, ranges) in enumerate(primaries):
        channel = key_on(ranges, f"ch{i}")
        subs.append(await mux.subscribe(channel))
        with plain(port_of(node)) as owner:
            assert owner.pubsub_shardnumsub(channel) == [(channel.encode(), 1)]
    for i, sub in enumerate(subs):
        assert await transport.execute("SPUBLISH", sub.channel, f"m{i}") == 1
    for i, sub in enumerate(subs):
        assert await sub.get(BOUND_S) == f"m{i}".encode()
        sub.close()


@pytest.mark.redis
@pytest.mark.cluster
async def test_a_subscription_follows_its_slot_to_the_new_owner(
    redis_cluster: ClusterGroup, transport: Transport
) -> None:
    """Redis drops a shard channel's subscribers when its slot moves (``sunsubscribe``
    nobody asked for): the multiplexer subscribes it on the new owner, then says RESYNC."""
    primaries = await transport.primaries()
    (old, old_ranges), (new, _) = primaries[0], primaries[2]
    channel = key_on(old_ranges, "mvch")
    slot = key_slot(channel)
    ids = {n.port: redis_cluster.node_id(n) for n in redis_cluster.primaries()}

    def move(to: str) -> None:
        for node in redis_cluster.primaries():
            with plain(node.port) as client:
                client.execute_command("CLUSTER", "SETSLOT", slot, "NODE", to)

    mux = transport.multiplexer(key_on(primaries[1][1], "mvhome"))
    sub = await mux.subscribe(channel)
    move(ids[port_of(new)])
    try:
        assert await sub.get(BOUND_S) is RESYNC
        with plain(port_of(new)) as owner:
            assert owner.pubsub_shardnumsub(channel) == [(channel.encode(), 1)]
        assert await transport.execute("SPUBLISH", channel, "there") == 1
        assert await sub.get(BOUND_S) == b"there"
    finally:
        sub.close()
        move(ids[port_of(old)])
        await assert_eventually(lambda: redis_cluster._ready(), timeout=BOUND_S)


# -- failover: a private cluster (it is left with a primary down) --------------------------------


@pytest.fixture
def private_cluster() -> Iterator[ClusterGroup]:
    with running(ClusterGroup()) as group:
        yield group


@pytest.mark.redis
@pytest.mark.cluster
@pytest.mark.slow
async def test_a_killed_primarys_slots_work_again_once_its_replica_took_over(
    private_cluster: ClusterGroup,
) -> None:
    t = Transport.from_url(private_cluster.url, timeout_s=10.0)
    try:
        primaries = await t.primaries()
        victim_node, ranges = primaries[1]
        victim = next(n for n in private_cluster.nodes if n.port == port_of(victim_node))
        replica = private_cluster.replica_of(victim)
        key, channel = key_on(ranges, "fo"), key_on(ranges, "fo-ch")
        await t.execute("SET", key, "before")
        await t.execute("WAIT", 1, 2000, node=victim_node)  # the replica has it
        mux = t.multiplexer(key_on(primaries[0][1], "fo-home"))
        sub = await mux.subscribe(channel)

        private_cluster.kill(victim)
        # Within the budget: connection errors, then the replica is promoted and serves.
        assert await t.execute("INCR", f"{key}:n") == 1
        assert await t.execute("GET", key) == b"before"
        assert victim_node not in [n for n, _ in await t.primaries()]
        await asyncio.to_thread(private_cluster.wait_failover, victim)

        with plain(replica.port) as promoted:
            await assert_eventually(
                lambda: promoted.pubsub_shardnumsub(channel) == [(channel.encode(), 1)],
                timeout=BOUND_S, message="not re-subscribed on the promoted replica")
        assert await t.execute("SPUBLISH", channel, "after") == 1
        # RESYNC (once re-subscribed: a waiter re-checks what it may have missed; more may
        # come earlier, while the node was unreachable), then the new message.
        got = [await sub.get(BOUND_S)]
        while got[-1] is RESYNC:
            got.append(await sub.get(BOUND_S))
        assert got[-1] == b"after" and got[-2] is RESYNC, got
        assert mux.reconnects >= 1
        sub.close()
    finally:
        await t.aclose()
