"""Native TensorRT engines (`model.plan`): an optional backend with the same interface as `OnnxModel`.

A plan is a serialized engine for one GPU product and one TensorRT version (the converter builds
it on the GPU it targets). Serving runs it through the real TensorRT Python API, imported only
when a plan is loaded, with device buffers from `torch.cuda` (no cuda-python): so this module
imports everywhere, and a replica without `tensorrt`, without torch or without a CUDA device
refuses a plan with a ModelLoadError (FAILED_PRECONDITION) that names the missing piece.

Prepared and tested on any machine (against fake engine objects): capability detection, the
mapping of TensorRT datatypes to protocol datatypes, and the model's signature and max batch
from the engine's tensor-name I/O (`num_io_tensors`, `get_tensor_name/mode/dtype/shape`) and its
first optimization profile (min/opt/max). Deserializing and running an engine
(`deserialize_cuda_engine`, `set_input_shape`, `set_tensor_address`, `execute_async_v3`) has not
run in CI: no GPU with TensorRT is available there. TensorRT 10 and 11 share this runtime API;
older releases (bindings-based I/O) are refused.
"""

from __future__ import annotations

import importlib
import logging
import re
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from splitstack_serving.backend import BackendOptions, ModelLoadError
from splitstack_serving.tensors import TensorSpec

log = logging.getLogger(__name__)

PLATFORM = "tensorrt_plan"
BACKEND = "tensorrt"
PLAN_FILE = "model.plan"
MIN_MAJOR = 10  # tensor-name I/O and execute_async_v3 (10.x, 11.x)
PROFILE = 0     # the optimization profile an execution context uses unless told otherwise

# TensorRT DataType member names -> protocol datatype (BF16, FP8, INT4, FP4 are not served).
TRT_DATATYPES: dict[str, str] = {
    "FLOAT": "FP32", "HALF": "FP16", "INT8": "INT8", "INT32": "INT32", "INT64": "INT64",
    "BOOL": "BOOL", "UINT8": "UINT8",
}

# Protocol datatype -> torch dtype attribute, for the device buffers.
TORCH_DTYPES: dict[str, str] = {
    "FP32": "float32", "FP16": "float16", "INT8": "int8", "INT32": "int32", "INT64": "int64",
    "BOOL": "bool", "UINT8": "uint8",
}


def import_tensorrt() -> ModuleType | None:
    """The `tensorrt` module, or None where it is not installed."""
    try:
        return importlib.import_module("tensorrt")
    except ImportError:
        return None


def cuda_device_missing() -> str:
    """Why torch cannot give CUDA buffers here ("" when it can)."""
    try:
        torch = importlib.import_module("torch")
    except ImportError:
        return "torch not importable (device buffers come from torch.cuda)"
    if not torch.cuda.is_available():
        return "no CUDA device (torch.cuda.is_available() is False)"
    return ""


@dataclass(frozen=True)
class TensorRtCapability:
    """Whether this replica can run plans, and if not, why."""

    available: bool
    reason: str = ""
    version: str = ""
    major: int = 0
    module: ModuleType | None = None


def detect_capability(import_module: Callable[[], ModuleType | None] = import_tensorrt,
                      device_missing: Callable[[], str] = cuda_device_missing) -> TensorRtCapability:
    """Inspect this replica: tensorrt importable, a release with the tensor-name API, a CUDA device."""
    trt = import_module()
    if trt is None:
        return TensorRtCapability(False, "tensorrt not importable")
    version = str(getattr(trt, "__version__", ""))
    found = re.match(r"(\d+)", version)
    major = int(found.group(1)) if found else 0
    if major < MIN_MAJOR:
        return TensorRtCapability(False, f"tensorrt {version or '(no version)'} is older than {MIN_MAJOR}.x "
                                  "(serving needs tensor-name I/O and execute_async_v3)", version, major)
    missing = device_missing()
    if missing:
        return TensorRtCapability(False, missing, version, major)
    return TensorRtCapability(True, "", version, major, trt)


def trt_datatype(dtype: Any, name: str, role: str) -> str:
    """The protocol datatype of a TensorRT DataType (ModelLoadError for one serving cannot carry)."""
    member = getattr(dtype, "name", str(dtype).rsplit(".", 1)[-1])
    datatype = TRT_DATATYPES.get(member)
    if datatype is None:
        raise ModelLoadError(f"{role} '{name}' has TensorRT type {member}, which serving does not support "
                             f"(supported: {', '.join(sorted(TRT_DATATYPES))})")
    return datatype


@dataclass(frozen=True)
class EngineSignature:
    """An engine's inputs and outputs, its max batch (0: not batchable) and profile-safe warm-up dims."""

    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    max_batch: int
    profile_min: dict[str, tuple[int, ...]]


def engine_signature(trt: Any, engine: Any) -> EngineSignature:
    """Read the I/O tensors of a deserialized engine by name, and its first optimization profile."""
    inputs: list[TensorSpec] = []
    outputs: list[TensorSpec] = []
    for index in range(engine.num_io_tensors):
        name = engine.get_tensor_name(index)
        is_input = engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT
        role = "input" if is_input else "output"
        shape = tuple(int(d) if int(d) >= 0 else -1 for d in engine.get_tensor_shape(name))
        spec = TensorSpec(name, trt_datatype(engine.get_tensor_dtype(name), name, role), shape)
        (inputs if is_input else outputs).append(spec)
    profiles = {spec.name: _profile(engine, spec) for spec in inputs}
    max_batch = profile_max_batch(inputs, outputs, profiles)
    return EngineSignature(tuple(inputs), tuple(outputs), max_batch,
                           {name: shapes[0] for name, shapes in profiles.items()})


def _profile(engine: Any, spec: TensorSpec) -> tuple[tuple[int, ...], ...]:
    """(min, opt, max) of an input in the first profile; a fully static input is its own profile."""
    if all(d >= 0 for d in spec.shape):
        return (spec.shape, spec.shape, spec.shape)
    shapes = engine.get_tensor_profile_shape(spec.name, PROFILE)
    return tuple(tuple(int(d) for d in shape) for shape in shapes)


def profile_max_batch(inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec],
                      profiles: dict[str, tuple[tuple[int, ...], ...]]) -> int:
    """The most rows one run may take: the smallest profile max of dim 0 over the inputs; 0 when
    dim 0 is not dynamic everywhere (requests then run one by one, at their own shapes)."""
    if not all(spec.shape and spec.shape[0] == -1 for spec in (*inputs, *outputs)):
        return 0
    for spec in inputs:
        low = profiles[spec.name][0][0]
        if low > 1:
            raise ModelLoadError(f"input '{spec.name}': the optimization profile's minimum batch is {low}; "
                                 "serving needs batch 1 (a request may carry a single row)")
    return min(profiles[spec.name][2][0] for spec in inputs)


class TensorRtModel:
    """One deserialized engine, its execution context and the model's inputs and outputs."""

    platform = PLATFORM
    backend = BACKEND

    def __init__(self, engine: Any, signature: EngineSignature, version: str) -> None:
        self._torch = importlib.import_module("torch")
        self._engine = engine
        self._context: Any = engine.create_execution_context()
        self._lock = threading.Lock()  # one execution context: one run at a time
        self.providers: tuple[str, ...] = (f"TensorRT-{version}",)
        self.inputs = signature.inputs
        self.outputs = signature.outputs
        self.max_batch_limit = signature.max_batch
        self._profile_min = signature.profile_min

    @classmethod
    def open(cls, path: Path, options: BackendOptions) -> TensorRtModel:
        """Deserialize the plan at `path` (blocking); ModelLoadError when this replica cannot."""
        capability = detect_capability()
        if not capability.available:
            raise ModelLoadError(f"{path.name}: this replica cannot serve TensorRT plans: {capability.reason}")
        trt = capability.module
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        try:
            engine = runtime.deserialize_cuda_engine(path.read_bytes())
        except Exception as exc:  # noqa: BLE001 - TensorRT raises its own exception types
            raise ModelLoadError(f"tensorrt {capability.version} cannot deserialize {path.name}: {exc}") from None
        if engine is None:
            raise ModelLoadError(f"tensorrt {capability.version} cannot deserialize {path.name} (a plan runs only "
                                 "on the GPU product and TensorRT version it was built for)")
        log.info("%s: TensorRT %s engine for target %r", path.name, capability.version, options.target)
        return cls(engine, engine_signature(trt, engine), capability.version)

    @property
    def batchable(self) -> bool:
        """True when dim 0 of every input and output is dynamic (within the profile's batch range)."""
        return self.max_batch_limit > 0

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Every output, in output order, for `feeds` (input name -> array); blocking."""
        with self._lock:
            context = self._context
            if context is None:
                raise RuntimeError("the engine was closed")
            torch = self._torch
            held = [self._bind_input(context, spec, feeds[spec.name]) for spec in self.inputs]
            results = [self._bind_output(context, spec) for spec in self.outputs]
            stream = torch.cuda.current_stream()
            if not context.execute_async_v3(stream.cuda_stream):
                raise RuntimeError("TensorRT execute_async_v3 failed")
            stream.synchronize()
            del held
            return [result.cpu().numpy() for result in results]

    def _bind_input(self, context: Any, spec: TensorSpec, array: np.ndarray) -> Any:
        device = self._torch.from_numpy(np.ascontiguousarray(array)).to("cuda")
        context.set_input_shape(spec.name, tuple(device.shape))
        context.set_tensor_address(spec.name, device.data_ptr())
        return device

    def _bind_output(self, context: Any, spec: TensorSpec) -> Any:
        shape = tuple(int(d) for d in context.get_tensor_shape(spec.name))
        device = self._torch.empty(shape, dtype=getattr(self._torch, TORCH_DTYPES[spec.datatype]), device="cuda")
        context.set_tensor_address(spec.name, device.data_ptr())
        return device

    def warm_up(self, max_batch_size: int) -> None:
        """Run zeros at batch 1 and at `max_batch_size` (0: once at the profile's minimum shapes);
        check that a batched engine answers one output row per input row."""
        for rows in sorted({1, max(max_batch_size, 1)}):
            feeds = {spec.name: np.zeros(self.warm_up_shape(spec, rows, max_batch_size), spec.dtype)
                     for spec in self.inputs}
            try:
                outputs = self.run(feeds)
            except Exception as exc:  # noqa: BLE001 - TensorRT and torch raise their own types
                raise ModelLoadError(f"warm-up run at batch {rows} failed: {exc}") from None
            for spec, array in zip(self.outputs, outputs):
                if max_batch_size > 0 and (array.ndim == 0 or array.shape[0] != rows):
                    raise ModelLoadError(f"output '{spec.name}' has shape {list(array.shape)} for a batch of "
                                         f"{rows} rows: the engine does not batch along dim 0")

    def warm_up_shape(self, spec: TensorSpec, rows: int, max_batch_size: int) -> tuple[int, ...]:
        """Zeros the profile accepts: dynamic dims at the profile minimum, dim 0 at `rows` when batched."""
        low = self._profile_min.get(spec.name, spec.shape)
        shape = [lo if d < 0 else d for d, lo in zip(spec.shape, low)]
        if max_batch_size > 0:
            shape[0] = rows
        return tuple(shape)

    def close(self) -> None:
        """Release the context and engine (their device memory goes once no run holds them)."""
        with self._lock:
            self._context = None
            self._engine = None
