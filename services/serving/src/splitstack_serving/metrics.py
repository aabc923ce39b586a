"""Prometheus metrics of the serving service (on the chassis' /metrics endpoint).

Per model: inference requests by outcome (the gRPC status, lowercased), request latency and
queue time histograms, rows per model run, loaded versions, requests waiting in queues, and model
loads by outcome. Over the whole process: answers held by open streams (count and bytes), and
the artifact cache's size and evictions. Label children are looked up once per model (`ModelMetrics`), so a request
costs one counter increment and two histogram observations. Requests naming a model that is not
loaded count under model="" so clients cannot grow the label set.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import Counter, Gauge, Histogram

UNKNOWN_MODEL = ""

# Sub-millisecond to seconds: batch-1 CPU inference sits in the first buckets.
LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.00075, 0.001, 0.0025, 0.005, 0.0075, 0.01, 0.025,
                   0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)

REQUESTS = Counter("splitstack_serving_inference_requests",
                   "Inference requests by model and outcome (ok or the gRPC status, lowercased)",
                   ["model", "outcome"])
REQUEST_SECONDS = Histogram("splitstack_serving_request_seconds",
                            "Server time per inference request, from its decoded input to its result",
                            ["model"], buckets=LATENCY_BUCKETS)
QUEUE_SECONDS = Histogram("splitstack_serving_queue_seconds",
                          "Time a request waited in its model's queue before its batch ran",
                          ["model"], buckets=LATENCY_BUCKETS)
BATCH_ROWS = Histogram("splitstack_serving_batch_rows", "Rows per model run (the batch size)",
                       ["model"], buckets=BATCH_ROW_BUCKETS)
LOADED_VERSIONS = Gauge("splitstack_serving_loaded_versions", "Model versions loaded and warmed", ["model"])
PENDING_REQUESTS = Gauge("splitstack_serving_pending_requests",
                         "Requests queued for a model version and not yet running", ["model", "version"])
STREAM_ANSWERS = Gauge("splitstack_serving_stream_answers_pending",
                       "ModelStreamInfer requests admitted and not yet answered on the wire (computing, or "
                       "answered and waiting to be written), over every open stream")
STREAM_ANSWER_BYTES = Gauge("splitstack_serving_stream_answer_bytes_pending",
                            "Bytes of ModelStreamInfer answers computed and not yet written, over every open stream")
CACHE_BYTES = Gauge("splitstack_serving_artifact_cache_bytes", "Bytes of verified artifacts in the local cache")
CACHE_EVICTIONS = Counter("splitstack_serving_artifact_cache_evictions",
                          "Artifacts removed from the local cache to keep it within its size bound")
MODEL_LOADS = Counter("splitstack_serving_model_loads", "Model version loads by outcome (ok or failed)",
                      ["model", "outcome"])


class ModelMetrics:
    """The metric children of one model name."""

    __slots__ = ("model", "request_seconds", "queue_seconds", "batch_rows", "_outcomes")

    def __init__(self, model: str) -> None:
        self.model = model
        self.request_seconds = REQUEST_SECONDS.labels(model)
        self.queue_seconds = QUEUE_SECONDS.labels(model)
        self.batch_rows = BATCH_ROWS.labels(model)
        self._outcomes = {"ok": REQUESTS.labels(model, "ok")}

    def count(self, outcome: str) -> None:
        """Count one request that ended with `outcome` ("ok", "invalid_argument"...)."""
        counter = self._outcomes.get(outcome)
        if counter is None:
            counter = self._outcomes[outcome] = REQUESTS.labels(self.model, outcome)
        counter.inc()


_BY_MODEL: dict[str, ModelMetrics] = {}


def model_metrics(model: str) -> ModelMetrics:
    """The (cached) metric children of `model`."""
    found = _BY_MODEL.get(model)
    if found is None:
        found = _BY_MODEL[model] = ModelMetrics(model)
    return found


def watch_pending(model: str, version: str, pending: Callable[[], int]) -> None:
    """Report `pending()` as the queue depth of a version, read at scrape time (no per-request cost)."""
    PENDING_REQUESTS.labels(model, version).set_function(pending)


def forget_version(model: str, version: str) -> None:
    """Drop a released version's queue gauge."""
    try:
        PENDING_REQUESTS.remove(model, version)
    except KeyError:
        return


def count_load(model: str, ok: bool) -> None:
    """Count one load of a version of `model`."""
    MODEL_LOADS.labels(model, "ok" if ok else "failed").inc()


def set_loaded_versions(model: str, count: int) -> None:
    """Record how many versions of `model` are loaded and warmed."""
    LOADED_VERSIONS.labels(model).set(count)
