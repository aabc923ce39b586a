"""Choosing the serving artifact: the best passing candidate by the target's selection metric.

Only accepted candidates (gate passed, profile measured) compete. FP32 ONNX is the baseline:
another candidate replaces it only when it is at least `margin` (default 10 %) better on the
selection metric at the selection batch size, so measurement noise never flips a choice and
precision is never given up for nothing. Without a passing baseline the best candidate wins.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from splitstack.common.v1 import common_pb2
from splitstack_converter.pipeline import PipelineError
from splitstack_converter.pipeline.candidates import Candidate
from splitstack_converter.pipeline.profile import point_at

BASELINE_FORMAT = common_pb2.ONNX_FP32
LOWER_IS_BETTER = {"p50_latency_ms": "p50_ms", "p99_latency_ms": "p99_ms"}
HIGHER_IS_BETTER = {"throughput_rows_per_s": "throughput_rows_per_s"}


@dataclass(frozen=True)
class Selection:
    """The chosen candidate and why."""

    chosen: Candidate
    reason: str


def metric_value(candidate: Candidate, metric: common_pb2.SelectionMetric) -> float:
    """The candidate's value of the selection metric at the metric's batch size."""
    field = LOWER_IS_BETTER.get(metric.name) or HIGHER_IS_BETTER.get(metric.name)
    if field is None:
        raise ValueError(f"unknown selection metric {metric.name!r}")
    point = point_at(candidate.profile, metric.batch_size or 1) if candidate.profile else None
    if point is None:
        raise ValueError(f"{candidate.name} has no measurement at batch {metric.batch_size or 1}")
    return getattr(point, field)


def improvement(value: float, baseline: float, metric: common_pb2.SelectionMetric) -> float:
    """How much better `value` is than `baseline`, as a fraction of the baseline (negative: worse)."""
    if baseline <= 0:
        return 0.0
    if metric.name in LOWER_IS_BETTER:
        return (baseline - value) / baseline
    return (value - baseline) / baseline


def _cost(candidate: Candidate, metric: common_pb2.SelectionMetric) -> float:
    """Lower is better, whatever the metric's direction (ties keep the candidates' order)."""
    value = metric_value(candidate, metric)
    return value if metric.name in LOWER_IS_BETTER else -value


def choose(candidates: Sequence[Candidate], metric: common_pb2.SelectionMetric, margin: float = 0.10) -> Selection:
    """Pick the serving candidate; PipelineError("gate") naming every rejection when none passed."""
    passing = [c for c in candidates if c.accepted]
    if not passing:
        reasons = "; ".join(f"{c.name}: {c.reason}" for c in candidates) or "no candidate was built"
        raise PipelineError("gate", f"no candidate passed the accuracy gate ({reasons})")
    unit = f"{metric.name} at batch {metric.batch_size or 1}"
    best = min(passing, key=lambda c: _cost(c, metric))
    baseline = next((c for c in passing if c.format == BASELINE_FORMAT), None)
    if baseline is None or best is baseline:
        return Selection(best, f"{best.name} measured best on {unit} ({metric_value(best, metric):.4g})")
    gain = improvement(metric_value(best, metric), metric_value(baseline, metric), metric)
    if gain >= margin:
        return Selection(best, f"{best.name} is {gain:.0%} better than {baseline.name} on {unit} "
                               f"({metric_value(best, metric):.4g} vs {metric_value(baseline, metric):.4g})")
    return Selection(baseline, f"{baseline.name} kept: {best.name} is only {gain:.0%} better on {unit} "
                               f"({metric_value(best, metric):.4g} vs {metric_value(baseline, metric):.4g}; "
                               f"switching needs {margin:.0%})")
