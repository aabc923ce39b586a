"""Prometheus metrics every service exposes, and the HTTP endpoint that serves them.

The server interceptor records one count (by gRPC service, method and status code) and one
latency observation (by service and method) per RPC. Label children are looked up once per
method and cached in `MethodMetrics`, so the per-call cost is two increments. Services add
their own metrics with prometheus_client's default registry; they show up on the same endpoint.
"""

from __future__ import annotations

import logging
import socket
import threading
from dataclasses import dataclass
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import Counter, Histogram, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer

log = logging.getLogger(__name__)

# From sub-millisecond inference calls to minutes-long conversions.
SHUTDOWN_POLL_SECONDS = 0.05
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                   1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)

RPCS_HANDLED = Counter(
    "splitstack_grpc_server_handled", "RPCs completed by the server, by final status code",
    ["service", "method", "code"])
RPC_SECONDS = Histogram(
    "splitstack_grpc_server_handling_seconds", "Time from handler start to its final status",
    ["service", "method"], buckets=LATENCY_BUCKETS)


class MethodMetrics:
    """The cached metric children of one gRPC method."""

    __slots__ = ("service", "method", "_latency", "_counts")

    def __init__(self, service: str, method: str) -> None:
        self.service = service
        self.method = method
        self._latency = RPC_SECONDS.labels(service, method)
        self._counts = {"OK": RPCS_HANDLED.labels(service, method, "OK")}

    def observe(self, code: str, seconds: float) -> None:
        """Count one finished RPC with status `code` (e.g. "OK", "NOT_FOUND") taking `seconds`."""
        counter = self._counts.get(code)
        if counter is None:
            counter = self._counts[code] = RPCS_HANDLED.labels(self.service, self.method, code)
        counter.inc()
        self._latency.observe(seconds)


class _QuietHandler(WSGIRequestHandler):
    """No access log line per scrape."""

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - stdlib signature
        return


@dataclass
class MetricsEndpoint:
    """A running Prometheus HTTP endpoint (GET /metrics) on a daemon thread."""

    host: str
    port: int
    _httpd: WSGIServer
    _thread: threading.Thread

    def close(self, timeout: float = 5.0) -> None:
        """Stop serving and release the port."""
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout)


def start_metrics_server(host: str, port: int) -> MetricsEndpoint:
    """Serve the default registry on `host:port` (0 = a free port); `.port` is the bound port."""
    family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]
    server_class = type("MetricsHTTPServer", (ThreadingWSGIServer,), {"address_family": family})
    httpd = make_server(host, port, make_wsgi_app(), server_class, handler_class=_QuietHandler)
    # A short poll interval keeps close() (and so service shutdown) quick.
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": SHUTDOWN_POLL_SECONDS},
                              name="metrics-http", daemon=True)
    thread.start()
    endpoint = MetricsEndpoint(host, httpd.server_port, httpd, thread)
    log.debug("metrics endpoint on http://%s:%d/metrics", host, endpoint.port)
    return endpoint
