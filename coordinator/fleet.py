"""The live workers, as their heartbeats describe them.

Hosts (``SessionRegistry.worker_stats``, the start check, ``strategies``) and workers (passing
a job to one that offers its strategy, ``workers.routing``) read the same thing: the
heartbeat index, then each listed worker's report, kept only while its heartbeat key lives.
Read here once, so both agree on who is alive and what it said.
"""

from __future__ import annotations

from typing import Any

from .codec import text, unpack
from .errors import CorruptState
from .keys import Keys
from .transport import Transport, checked


async def live_reports(transport: Transport, keys: Keys) -> dict[str, dict[str, Any]]:
    """Live workers (heartbeat key present) -> their last heartbeat's report; a report that
    does not decode shows as ``{}``."""
    ids = sorted(text(m) for m in await transport.execute("ZRANGE", keys.workers, 0, -1))
    if not ids:
        return {}
    # one GET each, not an MGET: on a Cluster the keys live in many slots
    blobs = checked(await transport.execute_many([("GET", keys.worker(wid)) for wid in ids]))
    out: dict[str, dict[str, Any]] = {}
    for wid, blob in zip(ids, blobs, strict=True):
        if blob is None:
            continue  # its heartbeat expired: dead, or cut off from Redis
        try:
            report = unpack(blob, what="worker report")
        except CorruptState:
            report = None
        out[wid] = report if isinstance(report, dict) else {}
    return out
