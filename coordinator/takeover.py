"""Connections opened by redis-py and then driven by our own asyncio protocol.

redis-py performs the handshake (TLS, AUTH/HELLO, SELECT, every option of the URL), so the
hot paths inherit all of it; after that its per-command machinery (pool checkout with a
liveness probe, retry wrapper, Python packing) costs ~75 µs of CPU a command, which a
protocol of our own with hiredis avoids. ``coordinator.wire`` (commands) and
``coordinator.pubsub`` (pushes) take connections over through here. This leans on redis-py's
asyncio ``Connection`` keeping its streams in ``_reader``/``_writer`` (true of 5.x to 8.x).
"""

from __future__ import annotations

import asyncio
from typing import cast

from redis.asyncio import Redis
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import ConnectionError as RedisConnectionError


def on_socket(client: Redis) -> bool:
    """False for in-memory fakes (fakeredis): no socket to take over, keep redis-py."""
    conn_class = client.connection_pool.connection_class
    return issubclass(conn_class, AbstractConnection) and not conn_class.__module__.startswith(
        "fakeredis")


async def take_over(
    client: Redis, protocol: asyncio.Protocol
) -> tuple[AbstractConnection, asyncio.Transport]:
    """A fresh connection of ``client``'s pool, handshake done, its transport now feeding
    ``protocol``. Refused if the handshake left bytes we would misread as replies."""
    conn: AbstractConnection = client.connection_pool.make_connection()  # type: ignore[no-untyped-call]
    try:
        await conn.connect()  # type: ignore[no-untyped-call]
        writer, reader = conn._writer, conn._reader
        if writer is None or writer.transport.is_closing():
            raise RedisConnectionError("the connection closed right after its handshake")
        if reader is not None and len(getattr(reader, "_buffer", b"")) != 0:
            raise RedisConnectionError("unexpected data on a fresh connection")
    except BaseException:
        abandon(conn)
        raise
    transport = cast(asyncio.Transport, writer.transport)
    transport.set_protocol(protocol)
    return conn, transport


def abandon(conn: AbstractConnection | None) -> None:
    """Close ``conn`` and forget its streams, so redis-py does not warn of it as unclosed.
    Not ``conn.disconnect()``: once the transport is taken over, that waits for a
    ``connection_lost`` that goes to our protocol, not to its streams, until its timeout."""
    if conn is None:
        return
    writer, conn._writer, conn._reader = conn._writer, None, None
    if writer is not None:
        writer.close()
