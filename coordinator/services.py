"""The collaborators a registry or a worker needs, wired once over one transport.

Both sides of the system build the same graph (the typed scripts, the process's pub/sub
multiplexer, the lock factory, the ways to end a session, the GC sweeper) from one
``Transport`` and one ``Settings``; building it here means neither reaches into another
object's transport, and a new topology (issue: Sentinel, Cluster) changes one constructor.
"""

from __future__ import annotations

from .gc import Sweeper
from .keys import Keys
from .locks import LockFactory
from .scripts import Scripts, Terminate
from .settings import Settings
from .shards import ShardMap, Shards
from .transport import Multiplexer, Transport


class Services:
    def __init__(self, transport: Transport, settings: Settings, *, process_id: str) -> None:
        self.transport = transport
        self.settings = settings
        #: The namespace's global keys (and, unsharded, its one shard's).
        self.keys = Keys(settings.namespace)
        #: Its shards: the unsharded layout until ``ready()`` read the stored table.
        self.shards = ShardMap(settings.namespace)
        self.scripts = Scripts(transport, self.shards,
                               wait_replicas=settings.wait_replicas,
                               wait_replicas_timeout_ms=settings.wait_replicas_timeout_ms)
        #: This process's one subscribed connection (its home channel keeps it subscribed).
        self.mux: Multiplexer = transport.multiplexer(self.keys.process_channel(process_id))
        self.locks = LockFactory(self.shards, self.scripts, self.mux,
                                 lease_ms=settings.lease_ms, wait_s=settings.lock_wait_s)
        self.terminate = Terminate(self.scripts, settings.retention_ms)
        self.sweeper = Sweeper(transport, self.keys, self.shards, self.locks, self.terminate,
                               self.scripts, settings)

    async def ready(self) -> Shards:
        """The namespace's shards, read (or chosen and stored) on first use."""
        return await self.shards.ready(self.transport, self.settings.shards or None)

    async def aclose(self) -> None:
        await self.transport.aclose()
