"""Per model version inference statistics, as the protocol's ModelStatistics reports them.

Plain integers updated on the event loop's thread (no locks): request outcomes with their total
durations, time queued, and per-execution compute durations split into input (stacking the
batch), infer (the model run) and output (splitting results back to requests). As in Triton, a
request's compute entries count once per request, each carrying its batch's durations;
`inference_count` counts rows computed, `execution_count` model runs, and `batches` groups runs
by their row count.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field


@dataclass
class Duration:
    """How many times something happened and the nanoseconds it took in total."""

    count: int = 0
    ns: int = 0

    def add(self, count: int, ns: int) -> None:
        """Count `count` occurrences that took `ns` nanoseconds together."""
        self.count += count
        self.ns += ns


@dataclass
class BatchStats:
    """Executions of one batch size (rows) and their compute durations."""

    count: int = 0
    compute_input_ns: int = 0
    compute_infer_ns: int = 0
    compute_output_ns: int = 0


@dataclass
class InferenceStats:
    """Everything ModelStatistics reports for one model version."""

    success: Duration = field(default_factory=Duration)
    fail: Duration = field(default_factory=Duration)
    queue: Duration = field(default_factory=Duration)
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)
    inference_count: int = 0
    execution_count: int = 0
    last_inference_ms: int = 0
    batches: dict[int, BatchStats] = field(default_factory=dict)

    def record_execution(self, rows: int, requests: int, input_ns: int, infer_ns: int, output_ns: int) -> None:
        """One model run over `rows` rows from `requests` requests."""
        self.inference_count += rows
        self.execution_count += 1
        self.last_inference_ms = time.time_ns() // 1_000_000
        self.compute_input.add(requests, input_ns * requests)
        self.compute_infer.add(requests, infer_ns * requests)
        self.compute_output.add(requests, output_ns * requests)
        batch = self.batches.get(rows)
        if batch is None:
            batch = self.batches[rows] = BatchStats()
        batch.count += 1
        batch.compute_input_ns += input_ns
        batch.compute_infer_ns += infer_ns
        batch.compute_output_ns += output_ns
