"""Inference without transport: resolve the model version, check the inputs, batch, account.

`InferenceCore.infer` is the hot path every protocol front end calls with decoded inputs. The
version it resolves is held (`acquire`/`release`) until its result is ready, so a swap never
releases a version under a running request. Outcomes land in the version's statistics and in
the Prometheus metrics. `load_startup_models` loads the models named in the configuration and
marks the server ready once all of them are loaded and warmed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence

import numpy as np

from splitstack.chassis.errors import DomainError, NotFound

from splitstack_serving import metrics
from splitstack_serving.repository import ModelRepository, ModelVersion
from splitstack_serving.tensors import InputTensor, bind_inputs

log = logging.getLogger(__name__)

_UNKNOWN_MODEL = metrics.model_metrics(metrics.UNKNOWN_MODEL)


def outcome_of(exc: BaseException) -> str:
    """The metrics outcome of a failed request: its gRPC status, lowercased."""
    if isinstance(exc, DomainError):
        return exc.code.name.lower()
    if isinstance(exc, asyncio.CancelledError):
        return "cancelled"
    if isinstance(exc, ValueError):  # InvalidName and friends
        return "invalid_argument"
    return "internal"


def parse_model_spec(spec: str) -> tuple[str, str]:
    """'name' or 'name:version' (a startup model entry) -> (name, version or "")."""
    name, _, version = spec.partition(":")
    return name.strip(), version.strip()


class InferenceResult:
    """A request's outputs: every model output for its rows, and which of them it asked for."""

    __slots__ = ("model", "outputs", "output_indices")

    def __init__(self, model: ModelVersion, outputs: list[np.ndarray], output_indices: Sequence[int]) -> None:
        self.model = model
        self.outputs = outputs
        self.output_indices = output_indices


class InferenceCore:
    """Serves inference requests against the repository's loaded models."""

    def __init__(self, repository: ModelRepository) -> None:
        self.repository = repository
        self.ready = False

    async def load_startup_models(self, specs: Sequence[str]) -> None:
        """Load every 'name[:version]' in `specs`, then mark the server ready; a failure raises.
        A model listed more than once keeps every listed version; the last one listed is current."""
        listed: set[str] = set()
        for spec in specs:
            name, version = parse_model_spec(spec)
            await self.repository.load(name, version, keep_previous=name in listed)
            listed.add(name)
        self.ready = True
        log.info("ready: %d startup model(s) loaded and warmed", len(specs))

    async def infer(self, name: str, version: str, tensors: Sequence[InputTensor], requested: Sequence[str],
                    deadline: float | None = None, enforce_deadline: bool = False) -> InferenceResult:
        """Run one request on `name` at `version` ("" = current) and return its outputs.

        `deadline` (loop.time() seconds) bounds its time in the queue; see DynamicBatcher.submit."""
        try:
            model = self.repository.resolve(name, version)
        except NotFound:
            _UNKNOWN_MODEL.count("not_found")
            raise
        model.acquire()
        started = time.perf_counter_ns()
        try:
            bound = bind_inputs(model.signature, tensors, name)
            indices = model.signature.output_indices(requested, name)
            outputs = await model.batcher.submit(bound.arrays, bound.rows, bound.key, deadline, enforce_deadline)
        except BaseException as exc:
            self._record(model, time.perf_counter_ns() - started, outcome_of(exc))
            raise
        finally:
            model.release()
        self._record(model, time.perf_counter_ns() - started, "ok")
        return InferenceResult(model, outputs, indices)

    @staticmethod
    def _record(model: ModelVersion, elapsed_ns: int, outcome: str) -> None:
        (model.stats.success if outcome == "ok" else model.stats.fail).add(1, elapsed_ns)
        model.metrics.count(outcome)
        model.metrics.request_seconds.observe(elapsed_ns / 1e9)
