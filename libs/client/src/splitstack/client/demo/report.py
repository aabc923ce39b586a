"""What the demo measured, and how it is shown: a facts record per version and the summary table.

The summary is also written as JSON (`<state dir>/summary.json`) so scripts and the demo's test
read the same numbers people see.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rich.table import Table

from splitstack.client.demo.traffic import TrafficReport


@dataclass
class CandidateFacts:
    """One conversion candidate: its gate accuracy on the sample and its batch-1 latency."""

    format: str
    accepted: bool
    accuracy: float
    p50_ms: float
    p99_ms: float


@dataclass
class VersionFacts:
    """Everything measured about one model version, from its data to its serving."""

    version: int
    dataset_version: int
    dataset_rows: int
    started_by: str
    train_seconds: float
    val_accuracy: float
    serving_format: str = "-"
    candidates: list[CandidateFacts] = field(default_factory=list)
    promotion: str = "-"
    holdout_accuracy: float = math.nan

    def candidate(self, fmt: str) -> CandidateFacts | None:
        return next((c for c in self.candidates if c.format == fmt), None)


@dataclass
class Summary:
    """The demo's outcome: per version facts, the client's traffic during the swap, wall time."""

    model: str
    versions: list[VersionFacts] = field(default_factory=list)
    promoted_version: int = 0
    served_version: int = 0
    swap_requests: int = 0
    swap_failures: int = 0
    swap_errors: dict[str, int] = field(default_factory=dict)
    client_p50_ms: float = math.nan
    client_p99_ms: float = math.nan
    client_accuracy: float = math.nan
    triton_client: str = "-"
    wall_seconds: float = 0.0

    def record_traffic(self, report: TrafficReport) -> None:
        self.swap_requests, self.swap_failures = report.requests, report.failures
        self.swap_errors = dict(report.errors.most_common(5))
        self.client_p50_ms, self.client_p99_ms = report.percentile(50), report.percentile(99)
        self.client_accuracy = report.accuracy

    def write(self, path: Path) -> None:
        path.write_text(json.dumps(_finite(asdict(self)), indent=2) + "\n")


def _finite(value: Any) -> Any:
    """NaN (nothing measured) as null, so the JSON is standard."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def _num(value: float, fmt: str) -> str:
    return "-" if value is None or math.isnan(value) else format(value, fmt)


def _candidate(facts: VersionFacts, fmt: str, fact: str) -> str:
    c = facts.candidate(fmt)
    if c is None:
        return "-"
    text = f"{_num(c.p50_ms, '.3f')} ms" if fact == "p50" else _num(c.accuracy, ".4f")
    return text if c.accepted else f"{text} (rejected)"


def summary_table(summary: Summary) -> Table:
    """One column per version, one row per measured fact (fits 80 columns)."""
    table = Table("", *(f"version {v.version}" for v in summary.versions), title=f"splitstack demo: {summary.model}")
    rows = [("dataset version (rows)", lambda v: f"{v.dataset_version} ({v.dataset_rows})"),
            ("trained by", lambda v: v.started_by),
            ("training job time", lambda v: f"{v.train_seconds:.1f} s"),
            ("validation accuracy", lambda v: _num(v.val_accuracy, ".4f")),
            ("FP32 p50, batch 1", lambda v: _candidate(v, "ONNX_FP32", "p50")),
            ("INT8 p50, batch 1", lambda v: _candidate(v, "ONNX_INT8", "p50")),
            ("FP32 accuracy (gate)", lambda v: _candidate(v, "ONNX_FP32", "accuracy")),
            ("INT8 accuracy (gate)", lambda v: _candidate(v, "ONNX_INT8", "accuracy")),
            ("serving choice", lambda v: v.serving_format),
            ("promotion", lambda v: v.promotion),
            ("held-out acc. (OIP)", lambda v: _num(v.holdout_accuracy, ".4f"))]
    for label, cell in rows:
        table.add_row(label, *(cell(v) for v in summary.versions))
    return table


def traffic_lines(summary: Summary) -> list[str]:
    """The client's view of the swap, and where things ended."""
    lines = [f"promoted (production): version {summary.promoted_version}; serving answers with version "
             f"{summary.served_version}",
             f"client during the swap: {summary.swap_requests} requests, {summary.swap_failures} failed",
             f"client latency, one row per request: p50 {_num(summary.client_p50_ms, '.2f')} ms, "
             f"p99 {_num(summary.client_p99_ms, '.2f')} ms; accuracy {_num(summary.client_accuracy, '.4f')}"]
    lines += [f"  failure: {count} x {message}" for message, count in summary.swap_errors.items()]
    if summary.triton_client != "-":
        lines.append(f"tritonclient: {summary.triton_client}")
    lines.append(f"demo wall time: {summary.wall_seconds:.0f} s")
    return lines
