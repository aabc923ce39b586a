"""One concurrency sweep against one server: the points, and what the server did during each.

`run_sweep` drives a client through the concurrency levels against a running server; during each
point's measurement window a `WindowProbe` samples the server's CPU time and, where the server
has them, its ModelStatistics, so each `ServerPoint` knows the server's CPU per request, the model
time per request, rows per model run and time queued, next to what the client saw.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from inference import grpc_service_pb2 as pb
from loadgen import LoadResult
from servers import ServerProcess

STATISTICS_NS_FIELDS = ("success", "queue", "compute_infer")


@dataclass(frozen=True)
class StatsDelta:
    """What the server's ModelStatistics counted over one window."""

    requests: int
    request_ns: int          # core time per request summed (decoded input -> result)
    queue_ns: int
    executions: int
    rows: int
    model_ns: int            # time inside the model runs (each run once)
    failed: int

    @staticmethod
    def between(before: pb.ModelStatistics, after: pb.ModelStatistics) -> StatsDelta:
        b, a = before.inference_stats, after.inference_stats
        model_before = sum(s.compute_infer.ns for s in before.batch_stats)
        model_after = sum(s.compute_infer.ns for s in after.batch_stats)
        return StatsDelta(a.success.count - b.success.count, a.success.ns - b.success.ns, a.queue.ns - b.queue.ns,
                          after.execution_count - before.execution_count,
                          after.inference_count - before.inference_count, model_after - model_before,
                          a.fail.count - b.fail.count)


@dataclass
class ServerPoint:
    """One concurrency level: the client's view and the server's."""

    load: LoadResult
    window_s: float
    server_cpu_s: float
    stats: StatsDelta | None = None

    @property
    def server_cpu_share(self) -> float:
        """Server CPU over the window in cores (1.0 = one core busy all the time)."""
        return self.server_cpu_s / self.window_s

    @property
    def server_cpu_us_per_request(self) -> float:
        calls = self.load.requests_per_s * self.window_s
        return self.server_cpu_s / calls * 1e6 if calls else float("nan")

    @property
    def rows_per_run(self) -> float:
        return self.stats.rows / self.stats.executions if self.stats and self.stats.executions else float("nan")

    @property
    def model_us_per_request(self) -> float:
        return self.stats.model_ns / self.stats.requests / 1e3 if self.stats and self.stats.requests else float("nan")

    @property
    def queue_us_per_request(self) -> float:
        return self.stats.queue_ns / self.stats.requests / 1e3 if self.stats and self.stats.requests else float("nan")

    @property
    def model_busy_share(self) -> float:
        return self.stats.model_ns / 1e9 / self.window_s if self.stats else float("nan")


@dataclass
class Sweep:
    """A contender's points at one request size; `error` says why there are none (or fewer)."""

    contender: str
    rows_per_request: int
    points: list[ServerPoint] = field(default_factory=list)
    error: str = ""
    load_before: float = float("nan")
    load_after: float = float("nan")

    def best(self) -> ServerPoint | None:
        """The point of highest throughput (saturation)."""
        return max(self.points, key=lambda p: p.load.requests_per_s, default=None)

    def at(self, concurrency: int) -> ServerPoint | None:
        return next((p for p in self.points if p.load.concurrency == concurrency), None)


class WindowProbe:
    """Samples the server's CPU and statistics at the edges of the measurement window."""

    def __init__(self, server: ServerProcess, model: str) -> None:
        self.server = server
        self.model = model
        self.cpu_s = 0.0
        self.window_s = 0.0
        self.stats: StatsDelta | None = None

    def __call__(self, start_ns: int, stop_ns: int) -> None:
        _sleep_until(start_ns)
        cpu, stats, began = self.server.cpu_seconds(), self._statistics(), time.monotonic_ns()
        _sleep_until(stop_ns)
        cpu_after, stats_after, ended = self.server.cpu_seconds(), self._statistics(), time.monotonic_ns()
        self.cpu_s = cpu_after - cpu
        self.window_s = (ended - began) / 1e9
        if stats is not None and stats_after is not None:
            self.stats = StatsDelta.between(stats, stats_after)

    def _statistics(self) -> pb.ModelStatistics | None:
        if not self.server.has_statistics:
            return None
        response = self.server.stub().ModelStatistics(pb.ModelStatisticsRequest(name=self.model), timeout=10)
        return response.model_stats[0] if len(response.model_stats) == 1 else None


def _sleep_until(deadline_ns: int) -> None:
    remaining = deadline_ns - time.monotonic_ns()
    if remaining > 0:
        time.sleep(remaining / 1e9)


def run_sweep(client, server: ServerProcess, model: str, request: bytes, rows: int,  # noqa: ANN001
              levels: Sequence[int], warmup_s: float, measure_s: float, sweep: Sweep) -> Sweep:
    """Drive `client` through `levels` against `server`; points land in `sweep` as they finish."""
    sweep.load_before = os.getloadavg()[0]
    for concurrency in levels:
        probe = WindowProbe(server, model)
        load = client.run(server.address, request, rows, concurrency, warmup_s, measure_s, probe)
        sweep.points.append(ServerPoint(load, probe.window_s or measure_s, probe.cpu_s, probe.stats))
        if load.errors and not sweep.error:
            sweep.error = f"c={concurrency}: {load.errors} failed calls, first: {load.first_error}"
        if server.proc.poll() is not None:
            sweep.error = f"{server.name} exited with {server.proc.returncode}:\n{server.log_tail()}"
            break
    sweep.load_after = os.getloadavg()[0]
    return sweep


def response_outputs(response: pb.ModelInferResponse) -> list[np.ndarray]:
    """The raw FP32 outputs of an answer, shaped."""
    return [np.frombuffer(raw, np.float32).reshape(tuple(tensor.shape))
            for tensor, raw in zip(response.outputs, response.raw_output_contents)]
