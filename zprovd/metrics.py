"""Prometheus metrics, and the /metrics and /healthz listener.

One ``Metrics`` per daemon, with its own registry (no global state).  The
protocol layers count what they do through it; TFTP and DHCP figures are
read from their services when Prometheus scrapes.
"""

from __future__ import annotations

from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from twisted.internet.defer import Deferred
from twisted.web import server
from twisted.web.resource import Resource

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class _ServiceCollector:
    """Figures counted in plain ints (requests answered) or owned by the
    TFTP, DHCP and document-cache code, read at scrape time."""

    def __init__(self, metrics: "Metrics"):
        self.metrics = metrics

    def collect(self):
        answered = sorted(self.metrics._answered.items())
        requests = CounterMetricFamily("zprovd_requests", "Requests answered", labels=["protocol", "status"])
        sizes = CounterMetricFamily("zprovd_response_bytes", "Bytes of responses", labels=["protocol", "status"])
        for (protocol, status), (count, size) in answered:
            requests.add_metric([protocol, str(status)], count)
            sizes.add_metric([protocol, str(status)], size)
        yield requests
        yield sizes
        tftp = self.metrics.tftp_stats() if self.metrics.tftp_stats else None
        if tftp is not None:
            yield GaugeMetricFamily("zprovd_tftp_sessions_active", "TFTP transfers in flight", value=tftp.get("active", 0))
            yield CounterMetricFamily(
                "zprovd_tftp_retransmissions", "TFTP datagrams sent again after a timeout", value=tftp.get("retransmissions", 0)
            )
        documents = self.metrics.document_stats() if self.metrics.document_stats else None
        if documents is not None:
            yield CounterMetricFamily(
                "zprovd_document_cache_hits", "Requests answered from the rendered-document cache (since the last reload)",
                value=documents["hits"],
            )
            yield CounterMetricFamily(
                "zprovd_document_cache_misses", "Requests that needed a look-up and a render (since the last reload)",
                value=documents["misses"],
            )
            yield GaugeMetricFamily("zprovd_document_cache_bytes", "Bytes of rendered documents kept", value=documents["bytes"])
        dhcp = self.metrics.dhcp_stats() if self.metrics.dhcp_stats else None
        if dhcp is not None:
            family = CounterMetricFamily("zprovd_dhcp_replies", "DHCP replies sent, by message type", labels=["type"])
            for kind, count in sorted(dhcp.items()):
                family.add_metric([kind], count)
            yield family


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.render_seconds = Histogram(
            "zprovd_render_seconds", "Template render time", ["kind"], buckets=LATENCY_BUCKETS, registry=r
        )
        self.backend_seconds = Histogram(
            "zprovd_backend_lookup_seconds", "Backend look-up latency", ["operation"], buckets=LATENCY_BUCKETS, registry=r
        )
        self.backend_errors = Counter("zprovd_backend_errors", "Failed backend look-ups", ["operation"], registry=r)
        self._answered: dict[tuple[str, int], list[int]] = {}
        """(protocol, status): [requests, response bytes]; plain ints, read at
        scrape time (a prometheus_client counter takes a lock per increment)."""
        self.tftp_stats: Callable[[], dict[str, int]] | None = None
        self.dhcp_stats: Callable[[], dict[str, int]] | None = None
        self.document_stats: Callable[[], dict[str, int]] | None = None
        r.register(_ServiceCollector(self))

    def answered(self, protocol: str, status: int, size: int) -> None:
        """Count one response (from the reactor thread)."""
        counts = self._answered.get((protocol, status))
        if counts is None:
            counts = self._answered[(protocol, status)] = [0, 0]
        counts[0] += 1
        counts[1] += size

    def timed_lookup(self, d: Deferred, operation: str, started: float, clock: Callable[[], float]) -> Deferred:
        """Observe a backend Deferred's latency and failures; returns it unchanged."""

        def ok(result):
            self.backend_seconds.labels(operation).observe(clock() - started)
            return result

        def failed(failure):
            self.backend_errors.labels(operation).inc()
            return failure

        return d.addCallbacks(ok, failed)


class MetricsResource(Resource):
    isLeaf = True

    def __init__(self, metrics: Metrics):
        super().__init__()
        self.metrics = metrics

    def render_GET(self, request):
        request.setHeader(b"content-type", b"text/plain; version=0.0.4; charset=utf-8")
        return generate_latest(self.metrics.registry)


class HealthResource(Resource):
    """200 "ok" while the backend answers a look-up; 503 with the reason otherwise."""

    isLeaf = True

    def __init__(self, check: Callable[[], Deferred]):
        super().__init__()
        self.check = check

    def render_GET(self, request):
        def ok(_):
            request.setHeader(b"content-type", b"text/plain; charset=utf-8")
            request.write(b"ok\n")
            request.finish()

        def failed(failure):
            request.setResponseCode(503)
            request.setHeader(b"content-type", b"text/plain; charset=utf-8")
            request.write(f"backend: {failure.getErrorMessage()}\n".encode())
            request.finish()

        self.check().addCallbacks(ok, failed)
        return server.NOT_DONE_YET


class MetricsSite(server.Site):
    """The /metrics and /healthz site: no access log, no tracebacks to clients."""

    noisy = False
    displayTracebacks = False

    def __init__(self, root: Resource, reactor):
        super().__init__(root, reactor=reactor)
        self.timeOut = 30

    def log(self, request) -> None:
        pass


def metrics_site_root(metrics: Metrics, health: Callable[[], Deferred]) -> Resource:
    root = Resource()
    root.putChild(b"metrics", MetricsResource(metrics))
    root.putChild(b"healthz", HealthResource(health))
    return root
