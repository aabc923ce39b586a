"""TensorRT engines for GPU targets, through the real TensorRT Python API (optional dependency).

An engine is built on the GPU it will run on, so only a GPU pool builds one, and only for its own
GPU product. What is prepared here without TensorRT (and tested on any machine):

- capability detection: 10.x has precision builder flags (FP16, INT8) and INT8 calibrators;
  11.x removed both in favour of strongly typed networks with explicit Q/DQ. FP16 therefore
  comes from the FP16 flag (10.x) or from an FP16 ONNX model (11.x), and INT8 always from
  explicit Q/DQ: symmetric, zero-point-0 INT8 ONNX from `quantize.TENSORRT_SCHEME` (calibrated
  on the registered sample; no TensorRT calibrator is used on either version);
- the optimization profile: batch 1 .. the target's max batch, optimized for the selection batch;
- the engine cache key: ONNX digest, GPU product, TensorRT version, precision and profile.

The calls into TensorRT itself (`build_plan`, `TensorRtRunner`) run only where `tensorrt`
imports and a GPU is present; they have not run in CI (no GPU with TensorRT is available there).
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from splitstack_converter.pipeline import PipelineError

log = logging.getLogger(__name__)

WORKSPACE_BYTES = 4 * 1024 ** 3


def import_tensorrt() -> ModuleType | None:
    """The `tensorrt` module, or None where it is not installed."""
    try:
        return importlib.import_module("tensorrt")
    except ImportError:
        return None


@dataclass(frozen=True)
class Capabilities:
    """What the installed TensorRT offers."""

    version: str
    major: int
    precision_flags: bool    # BuilderFlag.FP16 / BuilderFlag.INT8 exist (10.x)
    calibrators: bool        # IInt8EntropyCalibrator2 and friends exist (<= 10.x)
    strongly_typed: bool     # NetworkDefinitionCreationFlag.STRONGLY_TYPED exists

    @property
    def fp16_from_onnx_types(self) -> bool:
        """FP16 must be in the ONNX model itself (no FP16 builder flag to ask for it)."""
        return not self.precision_flags

    def network_flags(self, trt: ModuleType) -> int:
        """Network creation flags: strongly typed wherever precision flags are gone."""
        if self.strongly_typed and not self.precision_flags:
            return 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
        return 0


def detect_capabilities(trt: ModuleType) -> Capabilities:
    """Inspect a `tensorrt` module (duck-typed, so tests can pass stand-ins of 10.x and 11.x)."""
    version = str(getattr(trt, "__version__", "0"))
    major = int(re.match(r"(\d+)", version).group(1)) if re.match(r"(\d+)", version) else 0
    flags = getattr(trt, "BuilderFlag", None)
    creation = getattr(trt, "NetworkDefinitionCreationFlag", None)
    precision_flags = flags is not None and hasattr(flags, "FP16") and hasattr(flags, "INT8")
    return Capabilities(version=version, major=major, precision_flags=precision_flags,
                        calibrators=hasattr(trt, "IInt8EntropyCalibrator2"),
                        strongly_typed=creation is not None and hasattr(creation, "STRONGLY_TYPED"))


@dataclass(frozen=True)
class ProfileShapes:
    """One optimization profile of the input tensor."""

    input_name: str
    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]

    def describe(self) -> str:
        return f"{self.input_name}:{_dims(self.min)}/{_dims(self.opt)}/{_dims(self.max)}"


def _dims(shape: tuple[int, ...]) -> str:
    return "x".join(map(str, shape))


def profile_shapes(input_name: str, features: tuple[int, ...], max_batch: int, opt_batch: int = 1) -> ProfileShapes:
    """Batch 1 .. max_batch, tuned for `opt_batch` (the selection metric's batch)."""
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    opt = max(1, min(opt_batch, max_batch))
    return ProfileShapes(input_name, (1, *features), (opt, *features), (max_batch, *features))


def cache_key(onnx_sha256: str, gpu_product: str, trt_version: str, precision: str, shapes: ProfileShapes) -> str:
    """The engine cache key: equal exactly when the same build would give the same engine."""
    material = {"onnx_sha256": onnx_sha256, "gpu_product": gpu_product, "tensorrt": trt_version,
                "precision": precision, "profile": shapes.describe()}
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()


class EngineCache:
    """Built engines on local disk, by cache key (a rebuild of the same key is skipped)."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)

    def path(self, key: str) -> Path:
        return self.directory / f"{key}.plan"

    def get(self, key: str) -> Path | None:
        found = self.path(key)
        return found if found.is_file() else None

    def put(self, key: str, plan: bytes) -> Path:
        self.directory.mkdir(parents=True, exist_ok=True)
        staging = self.directory / f".{key}.{os.getpid()}.tmp"
        staging.write_bytes(plan)
        os.replace(staging, self.path(key))
        return self.path(key)


def to_fp16_onnx(src: Path, dst: Path) -> None:
    """An FP16 copy of an FP32 model for strongly typed builds: FP16 weights and compute, with FP32
    kept at the boundary (a Cast after the input and before the output), so callers are unchanged."""
    model = onnx.load(str(src))
    graph = model.graph
    for init in graph.initializer:
        if init.data_type == TensorProto.FLOAT:
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init).astype(np.float16), init.name))
    for node in graph.node:
        _node_to_fp16(node)
    source, sink = graph.input[0].name, graph.output[0].name
    half_in, half_out = f"{source}__fp16", f"{sink}__fp16"
    for node in graph.node:
        node.input[:] = [half_in if name == source else name for name in node.input]
        node.output[:] = [half_out if name == sink else name for name in node.output]
    graph.node.insert(0, helper.make_node("Cast", [source], [half_in], to=TensorProto.FLOAT16, name="input_to_fp16"))
    graph.node.append(helper.make_node("Cast", [half_out], [sink], to=TensorProto.FLOAT, name="output_to_fp32"))
    del graph.value_info[:]
    model = onnx.shape_inference.infer_shapes(model)
    onnx.checker.check_model(model)
    onnx.save_model(model, str(dst))


def _node_to_fp16(node: onnx.NodeProto) -> None:
    """Float constants and casts to float inside a node become FP16."""
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.TENSOR and attr.t.data_type == TensorProto.FLOAT:
            attr.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(attr.t).astype(np.float16), attr.t.name))
        if node.op_type == "Cast" and attr.name == "to" and attr.i == TensorProto.FLOAT:
            attr.i = TensorProto.FLOAT16


def gpu_product() -> str:
    """This machine's first GPU product in node-label form ('Tesla T4' -> 'Tesla-T4'); '' without one."""
    name = ""
    try:
        import torch

        if torch.cuda.is_available():
            name = torch.cuda.get_device_name(0)
    except Exception:  # noqa: BLE001  a broken CUDA set-up means no usable GPU
        name = ""
    if not name and shutil.which("nvidia-smi"):
        result = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                                capture_output=True, text=True, timeout=10, check=False)
        name = result.stdout.strip().splitlines()[0] if result.returncode == 0 and result.stdout.strip() else ""
    return re.sub(r"\s+", "-", name.strip())


def environment_problem(expected_product: str) -> str:
    """Why this machine cannot build engines for a target on `expected_product` ('' when it can)."""
    trt = import_tensorrt()
    if trt is None:
        return "tensorrt is not installed (install splitstack-converter[tensorrt] on the GPU pool's image)"
    found = gpu_product()
    if not found:
        return "no GPU is visible to this process"
    if expected_product and found != expected_product:
        return f"this machine's GPU is {found!r}, the target's is {expected_product!r}: engines must be built " \
               "on the GPU they run on"
    return ""


def build_plan(trt: ModuleType, caps: Capabilities, onnx_path: Path, precision: str, shapes: ProfileShapes,
               workspace_bytes: int = WORKSPACE_BYTES) -> bytes:
    """Build a serialized engine (TensorRT API; runs only where TensorRT and a GPU exist)."""
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(caps.network_flags(trt))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_path.read_bytes()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise PipelineError("build", f"TensorRT cannot parse the ONNX model: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    if caps.precision_flags and not caps.network_flags(trt):
        # 10.x, weakly typed: ask for the precision; INT8 itself comes from the model's Q/DQ nodes.
        config.set_flag(trt.BuilderFlag.FP16)
        if precision == "INT8":
            config.set_flag(trt.BuilderFlag.INT8)
    profile = builder.create_optimization_profile()
    profile.set_shape(shapes.input_name, shapes.min, shapes.opt, shapes.max)
    config.add_optimization_profile(profile)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise PipelineError("build", f"TensorRT {caps.version} failed to build a {precision} engine")
    return bytes(plan)


class TensorRtRunner:
    """A deserialized engine run through torch CUDA buffers (TensorRT API; GPU machines only)."""

    def __init__(self, trt: ModuleType, plan_path: Path) -> None:
        import torch

        self._torch = torch
        torch.cuda.reset_peak_memory_stats()
        self._runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self._engine = self._runtime.deserialize_cuda_engine(plan_path.read_bytes())
        if self._engine is None:
            raise PipelineError("build", "TensorRT could not deserialize the engine it built")
        self._context = self._engine.create_execution_context()
        names = [self._engine.get_tensor_name(i) for i in range(self._engine.num_io_tensors)]
        inputs = [n for n in names if self._engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self._input, self._output = inputs[0], next(n for n in names if n not in inputs)
        self.runtime = f"tensorrt {trt.__version__}"

    def run(self, batch: np.ndarray) -> np.ndarray:
        torch = self._torch
        source = torch.from_numpy(np.ascontiguousarray(batch)).cuda()
        self._context.set_input_shape(self._input, tuple(source.shape))
        out = torch.empty(tuple(self._context.get_tensor_shape(self._output)), dtype=torch.float32, device="cuda")
        self._context.set_tensor_address(self._input, source.data_ptr())
        self._context.set_tensor_address(self._output, out.data_ptr())
        stream = torch.cuda.current_stream()
        self._context.execute_async_v3(stream.cuda_stream)
        stream.synchronize()
        return out.cpu().numpy()

    def device_memory_bytes(self) -> int | None:
        engine_bytes = getattr(self._engine, "device_memory_size_v2", None) or getattr(
            self._engine, "device_memory_size", 0)
        return int(engine_bytes) + int(self._torch.cuda.max_memory_allocated())

    def close(self) -> None:
        self._context = None
        self._engine = None
