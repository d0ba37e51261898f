"""``GET /metrics`` of ``coordinator serve``: Prometheus text, with the official client.

Two kinds of numbers, one page:

- the cluster's, read from Redis at scrape time and bounded whatever the load (three
  reads: ``counts()``, the live workers' heartbeat reports, the dead-letter streams' length):
  ``alc_sessions{phase}``, ``alc_live_workers``, ``alc_dead_letters`` and, per live worker,
  the counters its heartbeat carries (``alc_worker_steps_total{worker}``, ...). Any number
  of API processes report the same values, so a dashboard takes one (``max``) per series;
- this API process's own: ``alc_api_feeds_total`` (answers recorded through it) and
  ``alc_api_requests_total{method,route,status}`` (route is the path template, so ids do
  not make a series each). Sum them over the API processes.

The Redis values go into a fresh ``CollectorRegistry`` per scrape rather than gauges kept
and set: nothing stale survives a worker that left, and the process holds no state but its
two counters.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .registry import SessionRegistry

#: Per live worker: metric name -> the heartbeat report's counter (``Worker.report``).
WORKER_COUNTERS = {
    "alc_worker_steps": ("steps", "strategy steps the worker applied"),
    "alc_worker_replays": ("replays", "sessions the worker rebuilt by replaying their journal"),
    "alc_worker_claims": ("claimed", "jobs the worker took over from a stalled or dead one"),
    "alc_worker_fenced_rejections": (
        "fenced_rejections", "steps refused because another worker had taken the session"),
    "alc_worker_dead_letters": ("dead_letters", "jobs the worker dead-lettered"),
}
#: The route label of a request no route matched (a 404): one series, not one per path.
UNMATCHED = "<unmatched>"


class ApiMetrics(Collector):
    """This API process's counters. A collector of its own (not the global default
    registry), so several apps in one process (tests) keep separate counts."""

    def __init__(self) -> None:
        self.feeds = Counter("alc_api_feeds", "answers recorded through this API process",
                             registry=None)
        self.requests = Counter("alc_api_requests", "HTTP requests this API process answered",
                                ["method", "route", "status"], registry=None)

    def collect(self) -> Iterable[Metric]:
        yield from self.feeds.collect()
        yield from self.requests.collect()


class _ClusterSnapshot(Collector):
    """What Redis said at this scrape, as metric families."""

    def __init__(self, counts: Mapping[str, int], workers: Mapping[str, Mapping[str, Any]],
                 dead_letters: int) -> None:
        self._counts = counts
        self._workers = workers
        self._dead = dead_letters

    def collect(self) -> Iterator[Metric]:
        sessions = GaugeMetricFamily("alc_sessions", "sessions by phase (finished ones while "
                                     "retained)", labels=["phase"])
        for phase, n in sorted(self._counts.items()):
            sessions.add_metric([phase], n)
        yield sessions
        yield GaugeMetricFamily("alc_live_workers", "workers whose heartbeat is live",
                                value=len(self._workers))
        yield GaugeMetricFamily("alc_dead_letters", "jobs in the dead-letter streams",
                                value=self._dead)
        for name, (field, doc) in WORKER_COUNTERS.items():
            family = CounterMetricFamily(name, f"{doc}, since it started (from its heartbeat)",
                                         labels=["worker"])
            for wid, report in sorted(self._workers.items()):
                value = report.get(field)
                if isinstance(value, int | float) and not isinstance(value, bool):
                    family.add_metric([wid], value)
            yield family


async def scrape(reg: SessionRegistry, api: ApiMetrics) -> bytes:
    """The exposition text (``CONTENT_TYPE_LATEST``) for one scrape."""
    counts = await reg.counts()
    workers = await reg.worker_stats()
    dead, _ = await reg.dead_letters(1)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_ClusterSnapshot(counts, workers, dead))
    registry.register(api)
    return generate_latest(registry)


class CountRequests:
    """ASGI middleware: count each answered request by method, route template and status
    when its response starts (a server-sent event stream counts at once, not at its end)."""

    def __init__(self, app: ASGIApp, metrics: ApiMetrics,
                 routes: Callable[[], Sequence[BaseRoute]]) -> None:
        self.app = app
        self.metrics = metrics
        self.routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def counting_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                self.metrics.requests.labels(scope["method"], self._route(scope),
                                             str(message["status"])).inc()
            await send(message)

        await self.app(scope, receive, counting_send)

    def _route(self, scope: Scope) -> str:
        """The matched route's path template: the router notes it in the scope; a request
        answered before routing (a body refused by its size) is matched here."""
        route = scope.get("route")
        if route is None:
            for candidate in self.routes():
                if candidate.matches(scope)[0] is Match.FULL:
                    route = candidate
                    break
        path = getattr(route, "path", None)
        return path if isinstance(path, str) else UNMATCHED
