"""A client that keeps predicting while the platform swaps versions, and counts what happened.

One thread sends one row at a time (batch 1, the latency case) through the SDK's `predict` at a
bounded rate, records each request's latency and counts failures with their messages, so the demo
can show that a hot swap fails no request.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

log = logging.getLogger(__name__)

Predict = Callable[[np.ndarray], dict[str, np.ndarray]]


@dataclass
class TrafficReport:
    """What the client saw: requests, failures (by message), latencies in ms, correct answers."""

    requests: int = 0
    failures: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    latencies_ms: list[float] = field(default_factory=list)
    correct: int = 0
    seconds: float = 0.0

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.latencies_ms, q)) if self.latencies_ms else float("nan")

    @property
    def accuracy(self) -> float:
        answered = self.requests - self.failures
        return self.correct / answered if answered else float("nan")


class Traffic:
    """Continuous single-row predictions on a background thread, between `start()` and `stop()`."""

    def __init__(self, predict: Predict, inputs: np.ndarray, labels: np.ndarray, interval_s: float = 0.005) -> None:
        self.predict, self.inputs, self.labels, self.interval_s = predict, inputs, labels, interval_s
        self.report = TrafficReport()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="demo-traffic", daemon=True)

    def start(self) -> Traffic:
        self._thread.start()
        return self

    def stop(self) -> TrafficReport:
        self._stop.set()
        self._thread.join(timeout=30)
        return self.report

    def _run(self) -> None:
        began = time.perf_counter()
        row = 0
        while not self._stop.is_set():
            self._one(row % len(self.labels))
            row += 1
            self._stop.wait(self.interval_s)
        self.report.seconds = time.perf_counter() - began

    def _one(self, row: int) -> None:
        start = time.perf_counter()
        try:
            outputs = self.predict(self.inputs[row:row + 1])
        except Exception as exc:   # every failure counts, whatever it is; the message is kept
            self.report.failures += 1
            self.report.errors[str(exc)] += 1
            log.debug("request %d failed: %s", self.report.requests, exc)
        else:
            self.report.latencies_ms.append((time.perf_counter() - start) * 1000.0)
            logits = next(iter(outputs.values()))
            self.report.correct += int(np.argmax(logits[0]) == self.labels[row])
        finally:
            self.report.requests += 1
