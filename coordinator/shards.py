"""Sharded namespaces: where a session's namespace-wide keys live, so every script touches
one Redis Cluster slot.

Each script touches one session's keys and its namespace's jobs stream, registry, deadlines
and dead letters (and the channels it publishes on). On a Cluster those must share a slot,
and one slot is one primary's core; so a namespace has **S shards**, each with its own copy
of those keys, tagged to one slot (``coordinator.keys.Keys`` with a ``tag``), and a session
belongs to one shard: its id is chosen so that its own hash tag (``ns:{sid}``) lands in its
shard's slot. Any process finds a session's shard from its id alone (the slot of the id),
without asking Redis.

S is chosen once, when the namespace is first used, and stored in Redis (``ns:shards``), as
Temporal stores its shard count: ``ALC_SHARDS`` (``--shards``) chooses it, else 1 on a
standalone or Sentinel Redis (the unsharded layout: today's key names, no tags) and 4 per
primary on a Cluster. A process asked for another S than the stored one refuses to start
(``Misconfigured``) instead of silently splitting the namespace. Shard slots are spread
evenly over the primaries the Cluster has when the namespace is created.

Session ids keep their shape (``s-<ms hex>-<32 hex>``): on a sharded namespace the last 5
hex digits are not random but chosen so that CRC16 of the whole id lands in the shard's
slot (CRC16 is linear, so one table of 16384 suffixes answers any prefix: 108 random bits
remain). A suffix table built once per process costs ~0.1 s.
"""

from __future__ import annotations

import asyncio
import binascii
import functools
import hashlib
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .codec import pack, unpack
from .errors import CorruptState, InvalidInput, Misconfigured, NotFound
from .keys import Keys
from .transport import Transport

SLOTS = 16384
#: Shards per primary when a namespace is created on a Cluster with no ``ALC_SHARDS``.
PER_PRIMARY = 4
#: Most shards a namespace may have: each costs every worker a few subscriptions and polls.
MAX_SHARDS = 256
_TABLE_VERSION = 1
_SUFFIX_LEN = 5


def key_slot(key: str) -> int:
    """The Cluster slot of ``key`` (CRC16 of its hash tag, as Redis computes it)."""
    raw = key.encode()
    start = raw.find(b"{")
    if start >= 0:
        end = raw.find(b"}", start + 1)
        if end > start + 1:
            raw = raw[start + 1:end]
    return binascii.crc_hqx(raw, 0) & (SLOTS - 1)


@functools.cache
def _suffixes() -> dict[int, str]:
    """14-bit CRC value -> a 5-hex-digit string with that CRC (every value has one)."""
    table: dict[int, str] = {}
    for n in range(16**_SUFFIX_LEN):
        s = f"{n:05x}"
        table.setdefault(binascii.crc_hqx(s.encode(), 0) & (SLOTS - 1), s)
        if len(table) == SLOTS:
            break
    return table


def id_in_slot(prefix: str, slot: int) -> str:
    """``prefix`` plus 5 hex digits, the whole in ``slot``. CRC16 (init 0) is linear:
    crc(prefix + suffix) = crc(prefix + NULs) ^ crc(suffix), so the suffix is a lookup."""
    base = binascii.crc_hqx(prefix.encode() + b"\0" * _SUFFIX_LEN, 0) & (SLOTS - 1)
    return prefix + _suffixes()[base ^ slot]


@dataclass(frozen=True, slots=True)
class Shards:
    """A namespace's shards: ``keys[k]`` names shard k's keys."""

    namespace: str
    keys: tuple[Keys, ...]
    slots: tuple[int, ...] = ()
    _by_slot: dict[int, Keys] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def single(cls, namespace: str) -> Shards:
        """One shard, untagged: the layout of a namespace on one Redis."""
        return cls(namespace, (Keys(namespace),))

    @classmethod
    def tagged(cls, namespace: str, slots: Sequence[int]) -> Shards:
        keys = tuple(Keys(namespace, tag=_suffixes()[slot], index=k)
                     for k, slot in enumerate(slots))
        return cls(namespace, keys, tuple(slots), {s: k for s, k in zip(slots, keys,
                                                                          strict=True)})

    @property
    def sharded(self) -> bool:
        return bool(self.slots)

    def __len__(self) -> int:
        return len(self.keys)

    def of(self, sid: str) -> Keys:
        """The shard of session ``sid``; ``NotFound`` for an id no shard can hold (an id
        from another namespace, or made up), which therefore names no session."""
        if not self.slots:
            return self.keys[0]
        keys = self._by_slot.get(key_slot(sid))
        if keys is None:
            raise NotFound(f"session {sid} not found: its id belongs to none of namespace "
                           f"{self.namespace!r}'s {len(self.keys)} shards", session_id=sid)
        return keys

    def new_session_id(self) -> str:
        """``s-<hex ms>-<32 hex>``, random, in a random shard (128 random bits unsharded,
        108 sharded: ids cannot be guessed either way)."""
        head = f"s-{time.time_ns() // 1_000_000:x}-"
        if not self.slots:
            return head + secrets.token_hex(16)
        slot = self.slots[secrets.randbelow(len(self.slots))]
        return id_in_slot(head + secrets.token_hex(16)[:32 - _SUFFIX_LEN], slot)

    def session_id_for(self, key: str) -> str:
        """The session id an idempotency ``key`` names in this namespace: the same key always
        gives the same id (and shard), so a start repeated with it finds the session the
        first made, which is what makes the key work on every topology with no lookup key
        of its own (one more slot to keep consistent on a Cluster)."""
        digest = hashlib.sha256(f"{self.namespace}\0{key}".encode()).hexdigest()
        head = f"s-k{digest[:10]}-"
        if not self.slots:
            return head + digest[10:42]
        slot = self.slots[int(digest[42:50], 16) % len(self.slots)]
        return id_in_slot(head + digest[10:42 - _SUFFIX_LEN], slot)

    def to_record(self) -> dict[str, Any]:
        return {"v": _TABLE_VERSION, "slots": list(self.slots), "created_at": int(time.time())}

    @classmethod
    def from_record(cls, namespace: str, raw: bytes) -> Shards:
        try:
            rec = unpack(raw, what="shard table")
            if not isinstance(rec, dict) or rec.get("v") != _TABLE_VERSION:
                raise ValueError(f"version {rec.get('v') if isinstance(rec, dict) else '?'}")
            slots = [int(s) for s in rec["slots"]]
            if len(set(slots)) != len(slots) or not all(0 <= s < SLOTS for s in slots) \
                    or len(slots) > MAX_SHARDS:
                raise ValueError(f"slots {slots[:8]}...")
        except (CorruptState, ValueError, KeyError, TypeError) as exc:
            raise CorruptState(f"the shard table of namespace {namespace!r} "
                               f"({namespace}:shards) is not one this coordinator wrote: "
                               f"{exc}") from None
        return cls.single(namespace) if not slots else cls.tagged(namespace, slots)


def spread(count: int, primaries: Sequence[Sequence[tuple[int, int]]]) -> list[int]:
    """``count`` slots spread over ``primaries`` (each a list of slot ranges): as even a
    number per primary as there can be, evenly spaced inside each primary's ranges."""
    per = [count // len(primaries) + (1 if i < count % len(primaries) else 0)
           for i in range(len(primaries))]
    chosen: list[int] = []
    for n, ranges in zip(per, primaries, strict=True):
        flat = [(lo, hi) for lo, hi in sorted(ranges)]
        total = sum(hi - lo + 1 for lo, hi in flat)
        for j in range(min(n, total)):
            offset = (2 * j + 1) * total // (2 * n)
            for lo, hi in flat:
                if offset <= hi - lo:
                    chosen.append(lo + offset)
                    break
                offset -= hi - lo + 1
    return chosen


async def load(transport: Transport, namespace: str, wanted: int | None) -> Shards:
    """The namespace's shards: read from Redis, or chosen and stored when it is new.
    ``wanted`` (``ALC_SHARDS``) must agree with a stored table."""
    if wanted is not None and not 1 <= wanted <= MAX_SHARDS:
        raise InvalidInput(f"shards must be from 1 to {MAX_SHARDS}, got {wanted}")
    key = Keys(namespace).shard_table
    raw = await transport.execute("GET", key)
    if raw is None:
        chosen = await _choose(transport, namespace, wanted)
        if await transport.execute("SET", key, pack(chosen.to_record()), "NX") is None:
            raw = await transport.execute("GET", key)  # another process was first
        else:
            return chosen
    if raw is None:
        raise CorruptState(f"the shard table {key} vanished while being read")
    stored = Shards.from_record(namespace, raw)
    if wanted is not None and wanted != len(stored):
        raise Misconfigured(
            f"namespace {namespace!r} has {len(stored)} shard(s), fixed when it was created "
            f"(stored in {key}); shards={wanted} (ALC_SHARDS / --shards) would split it. "
            "Leave the setting out to use the stored count, or use a new namespace")
    return stored


async def _choose(transport: Transport, namespace: str, wanted: int | None) -> Shards:
    cluster = transport.is_cluster
    if not cluster and (wanted is None or wanted == 1):
        return Shards.single(namespace)
    if cluster:
        primaries = [ranges for _, ranges in await transport.primaries()]
    else:
        primaries = [[(0, SLOTS - 1)]]
    count = wanted if wanted is not None else PER_PRIMARY * len(primaries)
    count = min(count, MAX_SHARDS)
    return Shards.tagged(namespace, spread(count, primaries))


class ShardMap:
    """The shards a process's components share: the unsharded layout until ``ready`` read
    the namespace's table (every entry point awaits it before it names a shard key)."""

    def __init__(self, namespace: str) -> None:
        self.current = Shards.single(namespace)
        self.loaded = False
        self._lock = asyncio.Lock()

    def of(self, sid: str) -> Keys:
        return self.current.of(sid)

    @property
    def all(self) -> tuple[Keys, ...]:
        return self.current.keys

    async def ready(self, transport: Transport, wanted: int | None) -> Shards:
        if self.loaded:
            return self.current
        async with self._lock:
            if not self.loaded:
                self.current = await load(transport, self.current.namespace, wanted)
                self.loaded = True
        return self.current
