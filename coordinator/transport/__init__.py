"""The one seam to Redis: every connection, command, script call and subscription.

Nothing outside this package imports redis-py's connection machinery, and this package uses
only its public API. Modules:

- ``target``: the URL, checked, and the pools it implies (protocol RESP2, no retries).
- ``pipe``: one pipelined command connection with a reply watchdog.
- ``pubsub``: one subscribed connection per process, fanned out to waiters.
- ``client``: ``Transport``, the budgeted, typed front of the two.
"""

from .client import Transport, checked
from .pubsub import RESYNC, Multiplexer, Subscription
from .target import Target

__all__ = ["RESYNC", "Multiplexer", "Subscription", "Target", "Transport", "checked"]
