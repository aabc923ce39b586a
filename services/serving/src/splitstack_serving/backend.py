"""ONNX Runtime: one inference session per loaded model version.

`OnnxModel.open(path, options)` builds the session (CPU provider; TensorRT and CUDA providers
first when the target is not "cpu" and this onnxruntime build has them), reads the inputs and
outputs from the model, and `warm_up` runs it once per batch size it will see at the extremes, so
the first real request pays no allocation or kernel-selection cost. Everything here blocks:
call it from a worker thread. `run` releases the GIL inside ONNX Runtime.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

# ONNX Runtime writes telemetry files into the user's cache directory on import unless told not to.
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402

from splitstack.chassis.errors import FailedPrecondition  # noqa: E402

from splitstack_serving.tensors import ORT_DATATYPES, TensorSpec  # noqa: E402

log = logging.getLogger(__name__)

PLATFORM = "onnxruntime_onnx"
BACKEND = "onnxruntime"
CPU_PROVIDER = "CPUExecutionProvider"
ACCELERATED_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")
ORT_LOG_ERRORS_ONLY = 3


class ModelLoadError(FailedPrecondition):
    """A model artifact cannot be served (unreadable, unsupported, wrong digest, fails warm-up)."""


@dataclass(frozen=True)
class BackendOptions:
    """How sessions are built: the hardware target and ONNX Runtime's thread pools."""

    target: str = "cpu"
    intra_op_threads: int = 1
    inter_op_threads: int = 1


def execution_providers(target: str) -> list[str]:
    """The providers for `target`: CPU only for "cpu", else the accelerated ones present, then CPU."""
    if target == "cpu":
        return [CPU_PROVIDER]
    available = ort.get_available_providers()
    accelerated = [p for p in ACCELERATED_PROVIDERS if p in available]
    if not accelerated:
        log.warning("target %r: this onnxruntime has no %s; running on the CPU", target,
                    " or ".join(ACCELERATED_PROVIDERS))
    return [*accelerated, CPU_PROVIDER]


def _session_options(options: BackendOptions) -> ort.SessionOptions:
    session_options = ort.SessionOptions()
    session_options.intra_op_num_threads = options.intra_op_threads
    session_options.inter_op_num_threads = options.inter_op_threads
    session_options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    session_options.log_severity_level = ORT_LOG_ERRORS_ONLY
    return session_options


def _tensor_spec(node: ort.NodeArg, role: str) -> TensorSpec:
    datatype = ORT_DATATYPES.get(node.type)
    if datatype is None:
        raise ModelLoadError(f"{role} '{node.name}' has type {node.type}, which serving does not support "
                             f"(supported: {', '.join(sorted(ORT_DATATYPES))})")
    shape = tuple(d if isinstance(d, int) and d >= 0 else -1 for d in node.shape)
    return TensorSpec(node.name, datatype, shape)


class OnnxModel:
    """One ONNX Runtime session and the model's inputs and outputs."""

    platform = PLATFORM
    backend = BACKEND

    def __init__(self, session: ort.InferenceSession) -> None:
        self._session: ort.InferenceSession | None = session
        self.providers: tuple[str, ...] = tuple(session.get_providers())
        self.inputs = tuple(_tensor_spec(node, "input") for node in session.get_inputs())
        self.outputs = tuple(_tensor_spec(node, "output") for node in session.get_outputs())
        self._output_names = [spec.name for spec in self.outputs]

    @classmethod
    def open(cls, path: Path, options: BackendOptions) -> OnnxModel:
        """Build a session for the ONNX file at `path` (blocking)."""
        try:
            session = ort.InferenceSession(str(path), _session_options(options),
                                           providers=execution_providers(options.target))
        except Exception as exc:  # noqa: BLE001 - ORT raises its own exception types for bad models
            raise ModelLoadError(f"onnxruntime cannot load {path.name}: {exc}") from None
        return cls(session)

    @property
    def batchable(self) -> bool:
        """True when dim 0 of every input and output is dynamic, so requests can be stacked on it."""
        return all(spec.shape and spec.shape[0] == -1 for spec in (*self.inputs, *self.outputs))

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Every output, in output order, for `feeds` (input name -> array); blocking, GIL released."""
        session = self._session
        if session is None:
            raise RuntimeError("the session was closed")
        return session.run(self._output_names, feeds)

    def warm_up(self, max_batch_size: int) -> None:
        """Run zeros at batch 1 and at `max_batch_size` (0: one run at the declared shapes);
        check that a batched model answers one output row per input row."""
        for rows in sorted({1, max(max_batch_size, 1)}):
            feeds = {spec.name: np.zeros(self._warm_up_shape(spec, rows, max_batch_size), spec.dtype)
                     for spec in self.inputs}
            try:
                outputs = self.run(feeds)
            except Exception as exc:  # noqa: BLE001 - ORT raises its own exception types
                raise ModelLoadError(f"warm-up run at batch {rows} failed: {exc}") from None
            if max_batch_size > 0:
                self._check_rows(outputs, rows)

    @staticmethod
    def _warm_up_shape(spec: TensorSpec, rows: int, max_batch_size: int) -> tuple[int, ...]:
        shape = [1 if d < 0 else d for d in spec.shape]
        if max_batch_size > 0:
            shape[0] = rows
        return tuple(shape)

    def _check_rows(self, outputs: list[np.ndarray], rows: int) -> None:
        for spec, array in zip(self.outputs, outputs):
            if array.ndim == 0 or array.shape[0] != rows:
                raise ModelLoadError(f"output '{spec.name}' has shape {list(array.shape)} for a batch of {rows} "
                                     "rows: the model does not batch along dim 0")

    def close(self) -> None:
        """Release the session (its memory goes once no run holds it)."""
        self._session = None
