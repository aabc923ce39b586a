"""Running a candidate: one interface for ONNX Runtime sessions and TensorRT engines.

A `Runner` takes a float32 batch and returns the logits as a NumPy array. The gate and the
profiler only see this interface, so every candidate format is judged and measured the same way.
ONNX Runtime sessions use the thread counts of the target's serving pool (measurements must
reflect how the artifact will be served) and the execution providers the target offers.
"""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import onnxruntime as ort

from splitstack.common.v1 import common_pb2

CPU_PROVIDER = "CPUExecutionProvider"
GPU_PROVIDERS = ("CUDAExecutionProvider",)


class Runner(Protocol):
    """A loaded candidate."""

    runtime: str

    def run(self, batch: np.ndarray) -> np.ndarray: ...

    def device_memory_bytes(self) -> int | None:
        """Accelerator memory the candidate holds at its peak, or None when it runs in host memory."""

    def close(self) -> None: ...


@dataclass(frozen=True)
class OrtOptions:
    """How ONNX Runtime sessions are built for a target."""

    intra_op_threads: int = 1
    inter_op_threads: int = 1
    accelerator: int = common_pb2.CPU


def providers_for(accelerator: int) -> list[str]:
    """CPU only on CPU targets; on GPU targets the GPU providers this build has, then CPU."""
    if accelerator != common_pb2.GPU:
        return [CPU_PROVIDER]
    available = ort.get_available_providers()
    return [p for p in GPU_PROVIDERS if p in available] + [CPU_PROVIDER]


class OrtRunner:
    """An ONNX Runtime session over one model file."""

    def __init__(self, path: Path, options: OrtOptions) -> None:
        session_options = ort.SessionOptions()
        session_options.intra_op_num_threads = options.intra_op_threads
        session_options.inter_op_num_threads = options.inter_op_threads
        session_options.log_severity_level = 3
        self._session = ort.InferenceSession(str(path), session_options, providers=providers_for(options.accelerator))
        self._input = self._session.get_inputs()[0].name
        providers = ",".join(self._session.get_providers())
        self.runtime = f"onnxruntime {ort.__version__} ({providers})"

    def run(self, batch: np.ndarray) -> np.ndarray:
        return self._session.run(None, {self._input: batch})[0]

    def device_memory_bytes(self) -> int | None:
        return None

    def close(self) -> None:
        self._session = None


def open_runner(fmt: int, path: Path, options: OrtOptions) -> Runner:
    """A runner for a candidate file of format `fmt` (ONNX formats: ONNX Runtime; else TensorRT)."""
    if fmt in (common_pb2.ONNX_FP32, common_pb2.ONNX_INT8):
        return OrtRunner(path, options)
    from splitstack_converter.pipeline import tensorrt

    trt = tensorrt.import_tensorrt()
    if trt is None:
        raise RuntimeError("TensorRT is not installed")
    return tensorrt.TensorRtRunner(trt, path)


def cpu_description() -> str:
    """The CPU model and core count of this machine, e.g. 'Intel(R) Xeon(R) ... x2'."""
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name} x{os.cpu_count() or 1}"
