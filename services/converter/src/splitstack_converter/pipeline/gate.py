"""The accuracy gate: a candidate runs the registered sample and is compared with the reference.

Two checks against a tolerance: top-1 agreement with the reference outputs (the exported
program's own outputs) and the primary metric on the sample's labels, which may lose at most
`max_metric_drop` (in metric units: 1 point of accuracy is 0.01) against the reference's metric.
Defaults: 1 point lost at most and 97 % top-1 agreement; a model's labels
(`gate.max_metric_drop`, `gate.min_top1_agreement`) override the defaults and a request's
tolerance overrides both. A failing candidate is never servable.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

from splitstack.common.v1 import common_pb2
from splitstack_converter.pipeline import PipelineError

LABEL_MAX_METRIC_DROP = "gate.max_metric_drop"
LABEL_MIN_TOP1_AGREEMENT = "gate.min_top1_agreement"


@dataclass(frozen=True)
class Tolerance:
    """What the gate allows."""

    max_metric_drop: float = 0.01
    min_top1_agreement: float = 0.97

    def __post_init__(self) -> None:
        if not (math.isfinite(self.max_metric_drop) and self.max_metric_drop >= 0):
            raise ValueError(f"max_metric_drop must be a finite number >= 0, got {self.max_metric_drop}")
        if not 0 <= self.min_top1_agreement <= 1:
            raise ValueError(f"min_top1_agreement must be in [0, 1], got {self.min_top1_agreement}")

    def to_pb(self) -> common_pb2.GateTolerance:
        return common_pb2.GateTolerance(max_metric_drop=self.max_metric_drop,
                                        min_top1_agreement=self.min_top1_agreement)


def resolve_tolerance(defaults: Tolerance, labels: Mapping[str, str],
                      request: common_pb2.GateTolerance | None = None) -> Tolerance:
    """The tolerance for one conversion: request fields, else the model's labels, else `defaults`.

    ValueError names a malformed label or value.
    """
    drop, agreement = defaults.max_metric_drop, defaults.min_top1_agreement
    if LABEL_MAX_METRIC_DROP in labels:
        drop = _label_number(labels, LABEL_MAX_METRIC_DROP)
    if LABEL_MIN_TOP1_AGREEMENT in labels:
        agreement = _label_number(labels, LABEL_MIN_TOP1_AGREEMENT)
    if request is not None and request.max_metric_drop:
        drop = request.max_metric_drop
    if request is not None and request.min_top1_agreement:
        agreement = request.min_top1_agreement
    return Tolerance(max_metric_drop=drop, min_top1_agreement=agreement)


def _label_number(labels: Mapping[str, str], key: str) -> float:
    try:
        return float(labels[key])
    except ValueError:
        raise ValueError(f"model label {key}={labels[key]!r} is not a number") from None


def accuracy(outputs: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy of logits `outputs` against class-index `labels`."""
    return float(np.mean(np.argmax(outputs, axis=1) == labels.astype(np.int64)))


# Primary metrics the gate can compute from logits and labels: name -> (function, direction).
METRICS: dict[str, tuple[Callable[[np.ndarray, np.ndarray], float], int]] = {
    "accuracy": (accuracy, common_pb2.MAXIMIZE),
}


def check_metric(metric: common_pb2.PrimaryMetric) -> None:
    """PipelineError unless the gate can compute `metric` in its direction."""
    if metric.name not in METRICS:
        raise PipelineError("gate", f"the gate cannot compute primary metric {metric.name!r} "
                                    f"(supported: {', '.join(sorted(METRICS))})")
    direction = METRICS[metric.name][1]
    if metric.direction not in (common_pb2.METRIC_DIRECTION_UNSPECIFIED, direction):
        raise PipelineError("gate", f"primary metric {metric.name!r} is computed as "
                                    f"{common_pb2.MetricDirection.Name(direction)}, not "
                                    f"{common_pb2.MetricDirection.Name(metric.direction)}")


def run_in_batches(run: Callable[[np.ndarray], np.ndarray], inputs: np.ndarray, batch: int) -> np.ndarray:
    """Every row of `inputs` through `run`, at most `batch` rows per call."""
    return np.concatenate([np.asarray(run(inputs[i:i + batch]), dtype=np.float32)
                           for i in range(0, len(inputs), batch)])


def evaluate(outputs: np.ndarray, reference: np.ndarray, labels: np.ndarray,
             metric: common_pb2.PrimaryMetric, tolerance: Tolerance) -> common_pb2.GateResult:
    """The gate's verdict on candidate `outputs` (same rows as `reference` and `labels`)."""
    check_metric(metric)
    compute, direction = METRICS[metric.name]
    result = common_pb2.GateResult(metric_name=metric.name, max_metric_drop=tolerance.max_metric_drop,
                                   min_top1_agreement=tolerance.min_top1_agreement)
    if outputs.shape != reference.shape:
        result.reason = f"output shape {list(outputs.shape)} differs from the reference's {list(reference.shape)}"
        return result
    if not np.all(np.isfinite(outputs)):
        result.reason = "the candidate produced NaN or infinite outputs"
        return result
    result.top1_agreement = float(np.mean(np.argmax(outputs, 1) == np.argmax(reference, 1)))
    result.reference_metric = compute(reference, labels)
    result.candidate_metric = compute(outputs, labels)
    result.metric_delta = result.candidate_metric - result.reference_metric
    result.max_abs_diff = float(np.max(np.abs(outputs - reference)))
    lost = -result.metric_delta if direction == common_pb2.MAXIMIZE else result.metric_delta
    failures = []
    if result.top1_agreement < tolerance.min_top1_agreement:
        failures.append(f"top-1 agreement {result.top1_agreement:.4f} < {tolerance.min_top1_agreement:.4f}")
    if lost > tolerance.max_metric_drop + 1e-12:
        failures.append(f"{metric.name} {result.reference_metric:.4f} -> {result.candidate_metric:.4f} "
                        f"loses {lost:.4f} > {tolerance.max_metric_drop:.4f}")
    result.passed = not failures
    result.reason = "; ".join(failures) if failures else (
        f"passed: top-1 agreement {result.top1_agreement:.4f}, {metric.name} delta {result.metric_delta:+.4f}")
    return result
