"""Measured, not assumed: latency, throughput and peak memory of a candidate on this machine.

Each point (a batch size: 1, the selection metric's batch, the target's max batch) runs after a
warm-up until it has at least `min_runs` runs or `min_seconds` of runs behind it (whichever comes
first; by default 1,000 runs or 2 s), and reports p50/p99 latency and rows per second. Peak
memory is what loading and running the candidate added: for host memory, the growth of the
process's peak resident set (reset before loading where the kernel allows it); for accelerators,
what the runner reports.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from splitstack.common.v1 import common_pb2
from splitstack_converter.pipeline.runners import Runner
from splitstack_converter.pipeline.sample import batch_of

MIN_RUNS_FOR_PERCENTILES = 3


@dataclass(frozen=True)
class Floors:
    """How long each point is measured."""

    min_runs: int = 1000
    min_seconds: float = 2.0
    warmup_runs: int = 20

    def __post_init__(self) -> None:
        if self.min_runs < 1 or self.min_seconds <= 0 or self.warmup_runs < 0:
            raise ValueError("profile floors: min_runs >= 1, min_seconds > 0 and warmup_runs >= 0 are required")


def batch_sizes(max_batch: int, selection_batch: int) -> list[int]:
    """The batch sizes to measure: 1, the selection metric's batch and the max batch."""
    return sorted({1, max(1, min(selection_batch or 1, max_batch)), max_batch})


def measure_point(run: Callable[[np.ndarray], object], batch: np.ndarray, floors: Floors) -> common_pb2.LatencyPoint:
    """Warm up, then time single runs on `batch` until the floors are met."""
    for _ in range(floors.warmup_runs):
        run(batch)
    latencies: list[float] = []
    started = time.perf_counter()
    while True:
        before = time.perf_counter()
        run(batch)
        latencies.append(time.perf_counter() - before)
        enough = len(latencies) >= floors.min_runs or time.perf_counter() - started >= floors.min_seconds
        if enough and len(latencies) >= min(MIN_RUNS_FOR_PERCENTILES, floors.min_runs):
            break
    seconds = np.asarray(latencies)
    return common_pb2.LatencyPoint(batch_size=len(batch), p50_ms=float(np.percentile(seconds, 50) * 1e3),
                                   p99_ms=float(np.percentile(seconds, 99) * 1e3),
                                   throughput_rows_per_s=float(len(batch) * len(seconds) / seconds.sum()),
                                   runs=len(seconds))


def _status_bytes(field: str) -> int | None:
    """A `VmRSS`/`VmHWM`-style field of /proc/self/status, in bytes (None off Linux)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


class HostMemoryProbe:
    """The growth of this process's peak resident memory from `start()` on."""

    def __init__(self) -> None:
        self._baseline = 0
        self._resettable = False
        self._sampled = 0

    def start(self) -> None:
        try:
            Path("/proc/self/clear_refs").write_text("5")   # resets VmHWM to the current RSS
            self._resettable = True
        except OSError:
            self._resettable = False
        self._baseline = _status_bytes("VmRSS") or 0
        self._sampled = self._baseline

    def sample(self) -> None:
        self._sampled = max(self._sampled, _status_bytes("VmRSS") or 0)

    def peak_bytes(self) -> int:
        self.sample()
        peak = _status_bytes("VmHWM") if self._resettable else None
        return max(0, (peak or self._sampled) - self._baseline)


def profile_candidate(open_runner: Callable[[], Runner], inputs: np.ndarray, batches: Iterable[int],
                      floors: Floors, *, target: str, device: str) -> common_pb2.MeasuredProfile:
    """Load the candidate, measure every batch size, and report the profile (accuracy left to the gate)."""
    probe = HostMemoryProbe()
    probe.start()
    runner = open_runner()
    try:
        points = []
        for size in batches:
            points.append(measure_point(runner.run, batch_of(inputs, size), floors))
            probe.sample()
        device_bytes = runner.device_memory_bytes()
        peak = device_bytes if device_bytes is not None else probe.peak_bytes()
        return common_pb2.MeasuredProfile(target=target, device=device, points=points, peak_memory_bytes=peak,
                                          runtime=runner.runtime)
    finally:
        runner.close()


def point_at(profile: common_pb2.MeasuredProfile, batch: int) -> common_pb2.LatencyPoint | None:
    """The profile's point for `batch`, if measured."""
    return next((p for p in profile.points if p.batch_size == batch), None)
