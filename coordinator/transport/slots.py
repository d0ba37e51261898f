"""Where a key lives on a Redis Cluster: its hash slot, the key a command is routed by, and the
slot map (which primary serves which slots).

- ``key_slot``: CRC16 (XMODEM) of the key, or of its ``{hash tag}`` (the part between the first
  ``{`` and the next ``}``, when that part is not empty), modulo 16384: what Redis computes.
- ``routing_key``: the key that decides a command's node (EVAL/EVALSHA: the first of KEYS;
  XREAD/XREADGROUP: the first stream after STREAMS; XINFO/XGROUP and other container commands:
  the key after the subcommand; otherwise the first argument). Keyless commands (PING, INFO,
  WAIT, SCRIPT, CLUSTER, ...) give None: the caller names their node.
- ``SlotMap``: a ``CLUSTER SLOTS`` reply as a 16384-entry owner table.
"""

from __future__ import annotations

import binascii
from collections.abc import Sequence
from typing import Any

SLOTS = 16384

#: Commands that name no key: they go to the node the caller names (or any one).
_KEYLESS = frozenset({
    b"PING", b"TIME", b"INFO", b"WAIT", b"SCRIPT", b"PUBSUB", b"CLUSTER", b"CLIENT",
    b"ECHO", b"CONFIG", b"DBSIZE", b"FLUSHALL", b"FLUSHDB", b"ASKING", b"READONLY",
    b"READWRITE", b"COMMAND", b"HELLO", b"AUTH", b"SELECT", b"LASTSAVE", b"ROLE", b"MEMORY",
    b"ACL", b"SLOWLOG", b"LATENCY", b"DEBUG", b"FUNCTION", b"WAITAOF", b"SAVE", b"BGSAVE",
    b"SHUTDOWN", b"QUIT", b"RESET", b"MONITOR", b"KEYS", b"SCAN", b"RANDOMKEY", b"SWAPDB",
})
#: Commands whose key follows a subcommand: ``XINFO STREAM key``, ``XGROUP CREATE key ...``.
_SUBCOMMAND_KEY = frozenset({b"XINFO", b"XGROUP", b"OBJECT"})


def key_slot(key: str | bytes) -> int:
    """The hash slot of ``key``, honouring a ``{hash tag}`` exactly as Redis does."""
    data = key.encode() if isinstance(key, str) else key
    start = data.find(b"{")
    if start != -1:
        end = data.find(b"}", start + 1)
        if end > start + 1:  # an empty tag "{}" does not count: the whole key is hashed
            data = data[start + 1:end]
    return binascii.crc_hqx(data, 0) % SLOTS


def _name(value: Any) -> bytes:
    if isinstance(value, bytes):
        return value.upper()
    return str(value).encode().upper()


def routing_key(command: Sequence[Any]) -> Any | None:
    """The key that decides which node runs ``command``; None for a keyless command."""
    name = _name(command[0])
    if name in (b"EVALSHA", b"EVAL", b"EVALSHA_RO", b"EVAL_RO", b"FCALL", b"FCALL_RO"):
        return command[3] if len(command) > 3 and int(command[2]) > 0 else None
    if name in (b"XREADGROUP", b"XREAD"):
        for i, arg in enumerate(command):
            if i and _name(arg) == b"STREAMS":
                return command[i + 1] if i + 1 < len(command) else None
        return None
    if name in _SUBCOMMAND_KEY:
        return command[2] if len(command) > 2 else None
    if name == b"PUBSUB" and len(command) > 2 and _name(command[1]) == b"SHARDNUMSUB":
        return command[2]  # shard channels are counted on the node owning their slot
    if name in _KEYLESS or len(command) < 2:
        return None
    return command[1]


class SlotMap:
    """Which primary (``"host:port"``) serves each slot: a ``CLUSTER SLOTS`` reply."""

    __slots__ = ("owners", "ranges")

    def __init__(self, ranges: Sequence[tuple[int, int, str]]) -> None:
        self.ranges = sorted(ranges)
        self.owners: list[str | None] = [None] * SLOTS
        for start, end, node in self.ranges:
            self.owners[start:end + 1] = [node] * (end - start + 1)

    @classmethod
    def from_reply(cls, reply: Any, asked_host: str) -> SlotMap:
        """From ``CLUSTER SLOTS``: ``[[start, end, [host, port, id, ...], replicas...], ...]``.
        An empty host (a node that does not know its own address) is the node we asked."""
        ranges: list[tuple[int, int, str]] = []
        for entry in reply:
            host = _text(entry[2][0]) or asked_host
            if host == "?":
                host = asked_host
            ranges.append((int(entry[0]), int(entry[1]), f"{host}:{int(entry[2][1])}"))
        return cls(ranges)

    def covered(self) -> bool:
        return None not in self.owners

    def primaries(self) -> list[tuple[str, list[tuple[int, int]]]]:
        """Each primary with its slot ranges, in slot order."""
        out: dict[str, list[tuple[int, int]]] = {}
        for start, end, node in self.ranges:
            out.setdefault(node, []).append((start, end))
        return list(out.items())


def split_addr(addr: str) -> tuple[str, int]:
    host, _, port = addr.rpartition(":")
    return host.strip("[]"), int(port)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
