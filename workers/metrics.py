"""A worker's Prometheus metrics (``coordinator worker --metrics-port P``).

The counters are the ones the heartbeat already publishes (``WorkerStats``), read at scrape
time by a collector, so the step pays nothing for them; the one thing a step adds is an
observation of its duration into ``alc_step_seconds``, and only while a server is running.
Each server has a registry of its own (never the library's global one), so several workers in
one process (tests) do not collide.

==================================  =========  ============================================
metric                              type       what
==================================  =========  ============================================
``alc_steps_total``                 counter    steps committed (or refused at the commit)
``alc_step_seconds``                histogram  time from lock A held to the commit's reply
``alc_replays_total``               counter    executions rebuilt from the journal
``alc_claims_total``                counter    jobs claimed after ``claim_idle_ms`` idle
``alc_rescues_total``               counter    jobs taken from workers whose connection closed
``alc_fenced_rejections_total``     counter    commits refused: the lease was taken over
``alc_dead_letters_total``          counter    jobs dead-lettered by this worker
``alc_step_errors_total``           counter    steps that failed in the worker (retried)
``alc_passed_on_total``             counter    sessions passed to a worker with their strategy
``alc_steps_in_flight``             gauge      steps running now
``alc_live_executions``             gauge      paused executions held in memory
==================================  =========  ============================================
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from typing import TYPE_CHECKING
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from .worker import Worker

__all__ = ["STEP_BUCKETS_S", "MetricsServer", "WorkerCollector", "start_metrics_server"]

#: Step durations: a live step takes about a millisecond, a replay of a long session or a
#: strategy that computes far longer.
STEP_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                  10.0, 30.0, 60.0)
#: Counter name (without ``_total``) -> (``WorkerStats`` field, help).
COUNTERS = {
    "alc_steps": ("steps", "Steps this worker committed or had refused at the commit."),
    "alc_replays": ("replays", "Executions rebuilt by replaying a session's journal."),
    "alc_claims": ("claimed", "Jobs claimed after claim_idle_ms pending on another worker."),
    "alc_rescues": ("rescued", "Jobs taken over from workers whose connection closed."),
    "alc_fenced_rejections": ("fenced_rejections",
                              "Commits refused by the fence: the lease was taken over."),
    "alc_dead_letters": ("dead_letters", "Jobs this worker dead-lettered."),
    "alc_step_errors": ("step_errors", "Steps that failed in the worker and were retried."),
    "alc_passed_on": ("passed_on",
                      "Sessions passed on to a worker that has their strategy."),
}


class WorkerCollector(Collector):
    """Reads the worker's counters and gauges when scraped (from the server's thread:
    plain reads of ints and lengths)."""

    def __init__(self, worker: Worker) -> None:
        self._worker = worker

    def collect(self) -> Iterable[Metric]:
        stats = self._worker.stats
        for name, (field, text) in COUNTERS.items():
            counter = CounterMetricFamily(name, text)
            counter.add_metric([], getattr(stats, field))
            yield counter
        yield GaugeMetricFamily("alc_steps_in_flight", "Steps running now.",
                                value=self._worker.in_flight())
        yield GaugeMetricFamily("alc_live_executions",
                                "Paused executions this worker holds in memory.",
                                value=self._worker.live_executions())


class MetricsServer:
    """A running metrics endpoint; ``close()`` stops it (blocking up to half a second, the
    HTTP server's poll interval) and stops the step observations."""

    def __init__(self, worker: Worker, server: WSGIServer, thread: threading.Thread,
                 registry: CollectorRegistry) -> None:
        self._worker = worker
        self._server = server
        self._thread = thread
        self.registry = registry

    @property
    def port(self) -> int:
        """The port it listens on (the one chosen, when started with port 0)."""
        return int(self._server.server_port)

    def close(self) -> None:
        self._worker.step_observer = None
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5.0)


def start_metrics_server(worker: Worker, port: int, addr: str = "0.0.0.0") -> MetricsServer:
    """Serve ``worker``'s metrics at ``http://addr:port/metrics`` (any path answers) from a
    thread of its own; port 0 picks a free one (``.port``)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(WorkerCollector(worker))
    histogram = Histogram("alc_step_seconds", "Duration of a step, from lock A held to the "
                          "commit's reply.", buckets=STEP_BUCKETS_S, registry=registry)
    server, thread = start_http_server(port, addr, registry=registry)
    worker.step_observer = histogram.observe
    return MetricsServer(worker, server, thread, registry)
