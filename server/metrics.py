"""Prometheus metrics (prometheus-client), served on their own HTTP port (PAYMENTS_METRICS_ADDR).

Names follow the grpc-ecosystem convention for calls (`grpc_server_handled_total`,
`grpc_server_handling_seconds`), so existing gRPC dashboards read them; the rest are `payments_*`.
Everything is recorded in the process's default registry whether or not the endpoint is served:
recording is a counter increment, and a server run in-process (the tests) is measured the same way.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterable
from wsgiref.simple_server import WSGIServer

from prometheus_client import REGISTRY, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from server.config import split_addr

_LATENCY_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

CALLS = Counter("grpc_server_handled_total", "Calls completed, by method and status code",
                ("grpc_service", "grpc_method", "grpc_type", "grpc_code"))
LATENCY = Histogram("grpc_server_handling_seconds", "Time from a call's start to its status, by method",
                    ("grpc_service", "grpc_method", "grpc_type"), buckets=_LATENCY_BUCKETS_S)
GROUP_COMMIT_SIZE = Histogram("payments_group_commit_size", "Requests that shared one group-commit statement",
                              buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024))
EVENT_SUBSCRIBERS = Gauge("payments_event_stream_subscribers", "Open Subscribe streams")
EVENT_LAG = Histogram("payments_event_stream_lag_seconds",
                      "Time from an event's commit to its hand-over to the live subscribers",
                      buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 60.0))
EVENT_PUBLISHED = Gauge("payments_event_stream_published_sequence",
                        "The last event sequence handed to the live subscribers")


def observe_group_size(n: int) -> None:
    """One group-commit statement carried `n` requests (called by the batching layer)."""
    GROUP_COMMIT_SIZE.observe(n)


class CallMetrics:
    """The two call metrics of one method, with their labelled children looked up once."""

    __slots__ = ("_labels", "_latency", "_by_code")

    def __init__(self, service: str, method: str, kind: str):
        self._labels = (service, method, kind)
        self._latency = LATENCY.labels(*self._labels)
        self._by_code: dict[str, Counter] = {}

    def observe(self, code: str, duration_s: float) -> None:
        counter = self._by_code.get(code)
        if counter is None:
            counter = self._by_code[code] = CALLS.labels(*self._labels, code)
        counter.inc()
        self._latency.observe(duration_s)


class _PoolCollector(Collector):
    """Connections of each live server's SQLAlchemy pool, read when scraped."""

    def __init__(self) -> None:
        self._engines: weakref.WeakSet = weakref.WeakSet()

    def watch(self, engine: object) -> None:
        self._engines.add(engine)

    def collect(self) -> Iterable[GaugeMetricFamily]:
        checked_out = GaugeMetricFamily("payments_db_pool_checked_out", "Pool connections in use")
        size = GaugeMetricFamily("payments_db_pool_size", "Connections the pool keeps open")
        overflow = GaugeMetricFamily("payments_db_pool_overflow", "Connections open beyond the pool's size")
        used = held = extra = 0
        for engine in list(self._engines):
            pool = getattr(engine, "pool", None)
            if pool is None or not hasattr(pool, "checkedout"):
                continue
            used += pool.checkedout()
            held += pool.size()
            extra += max(pool.overflow(), 0)
        checked_out.add_metric([], used)
        size.add_metric([], held)
        overflow.add_metric([], extra)
        return [checked_out, size, overflow]


_pools = _PoolCollector()
REGISTRY.register(_pools)


def watch_pool(engine: object) -> None:
    """Report `engine`'s pool in the metrics while it is alive."""
    _pools.watch(engine)


class MetricsEndpoint:
    """`GET /metrics` on host:port in a thread of its own (prometheus-client's HTTP server)."""

    def __init__(self, addr: str):
        self.addr = addr
        self._httpd: WSGIServer | None = None
        self._thread: threading.Thread | None = None
        self.port = 0

    def start(self) -> int:
        """Serve; OSError (a busy port, say) goes to the caller."""
        host, port = split_addr(self.addr)
        self._httpd, self._thread = start_http_server(port, addr=host or "0.0.0.0")
        self.port = self._httpd.server_address[1]
        return self.port

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
