"""Test support for the serving service: small ONNX models, the ONNX Runtime oracle, requests, servers.

Models are built with onnx.helper (no torch): `mlp` (x FP32 [batch, 64] -> Gemm/Relu ->
hidden FP32 [batch, 256] -> Gemm -> logits FP32 [batch, 10]; the seed picks the weights, so
versions differ) and `pair` (ids INT64 [batch, 4], scale FP32 [batch, 1] -> scaled FP32
[batch, 4] = ids * scale, total INT64 [batch, 1] = sum of ids). The oracle runs the same file
in-process with ONNX Runtime, one request at a time.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

import grpc  # noqa: E402
import numpy as np  # noqa: E402
import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from inference import grpc_service_pb2 as pb  # noqa: E402
from inference import grpc_service_pb2_grpc as pb_grpc  # noqa: E402

OPSET = 17
IR_VERSION = 8
MLP_IN, MLP_HIDDEN, MLP_OUT = 64, 256, 10
NP_TO_DATATYPE = {np.dtype(np.float32): "FP32", np.dtype(np.float64): "FP64", np.dtype(np.int64): "INT64",
                  np.dtype(np.int32): "INT32", np.dtype(np.float16): "FP16"}
DATATYPE_TO_NP = {v: k for k, v in NP_TO_DATATYPE.items()}


def _save(graph: onnx.GraphProto, path: Path) -> Path:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def build_mlp(path: Path, seed: int) -> Path:
    """An MLP 64-256-10 with a dynamic batch dim; `seed` picks its weights."""
    rng = np.random.default_rng(seed)
    weights = {"w1": rng.standard_normal((MLP_IN, MLP_HIDDEN)) * 0.1, "b1": rng.standard_normal(MLP_HIDDEN) * 0.1,
               "w2": rng.standard_normal((MLP_HIDDEN, MLP_OUT)) * 0.1, "b2": rng.standard_normal(MLP_OUT) * 0.1}
    nodes = [helper.make_node("Gemm", ["x", "w1", "b1"], ["pre"]), helper.make_node("Relu", ["pre"], ["hidden"]),
             helper.make_node("Gemm", ["hidden", "w2", "b2"], ["logits"])]
    graph = helper.make_graph(
        nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", MLP_IN])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", MLP_OUT]),
         helper.make_tensor_value_info("hidden", TensorProto.FLOAT, ["batch", MLP_HIDDEN])],
        [numpy_helper.from_array(w.astype(np.float32), name) for name, w in weights.items()])
    return _save(graph, path)


def build_pair(path: Path) -> Path:
    """Two inputs of two datatypes: scaled = ids * scale (FP32), total = sum(ids) (INT64)."""
    nodes = [helper.make_node("Cast", ["ids"], ["ids_f"], to=TensorProto.FLOAT),
             helper.make_node("Mul", ["ids_f", "scale"], ["scaled"]),
             helper.make_node("ReduceSum", ["ids", "axis"], ["total"], keepdims=1)]
    graph = helper.make_graph(
        nodes, "pair",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", 4]),
         helper.make_tensor_value_info("scale", TensorProto.FLOAT, ["batch", 1])],
        [helper.make_tensor_value_info("scaled", TensorProto.FLOAT, ["batch", 4]),
         helper.make_tensor_value_info("total", TensorProto.INT64, ["batch", 1])],
        [numpy_helper.from_array(np.array([1], np.int64), "axis")])
    return _save(graph, path)


def build_fixed(path: Path) -> Path:
    """No batch dim: y FP32 [2, 3] = Relu(x FP32 [2, 3]) (served with max_batch_size 0)."""
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "fixed",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])])
    return _save(graph, path)


def build_lookup(path: Path) -> Path:
    """row FP32 [batch, 1, 2] = table[index] for index INT64 [batch, 1]; an index past 4 makes the run fail."""
    table = np.arange(10, dtype=np.float32).reshape(5, 2)
    graph = helper.make_graph([helper.make_node("Gather", ["table", "index"], ["row"], axis=0)], "lookup",
                              [helper.make_tensor_value_info("index", TensorProto.INT64, ["batch", 1])],
                              [helper.make_tensor_value_info("row", TensorProto.FLOAT, ["batch", 1, 2])],
                              [numpy_helper.from_array(table, "table")])
    return _save(graph, path)


def build_flex(path: Path) -> Path:
    """Dynamic batch and width: y FP32 [batch, width] = Relu(x FP32 [batch, width])."""
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "flex",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "width"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "width"])])
    return _save(graph, path)


def build_narrow(path: Path) -> Path:
    """Narrow integers: sum FP32 [batch, 2] = Cast(small INT8 [batch, 2]) + Cast(byte UINT8 [batch, 2])."""
    nodes = [helper.make_node("Cast", ["small"], ["small_f"], to=TensorProto.FLOAT),
             helper.make_node("Cast", ["byte"], ["byte_f"], to=TensorProto.FLOAT),
             helper.make_node("Add", ["small_f", "byte_f"], ["sum"])]
    graph = helper.make_graph(nodes, "narrow",
                              [helper.make_tensor_value_info("small", TensorProto.INT8, ["batch", 2]),
                               helper.make_tensor_value_info("byte", TensorProto.UINT8, ["batch", 2])],
                              [helper.make_tensor_value_info("sum", TensorProto.FLOAT, ["batch", 2])])
    return _save(graph, path)


def build_model_dir(root: Path) -> Path:
    """mlp versions 1 and 2 (different weights), pair, spare (an mlp), fixed and lookup, version 1 each."""
    build_mlp(root / "mlp" / "1" / "model.onnx", seed=1)
    build_mlp(root / "mlp" / "2" / "model.onnx", seed=2)
    build_pair(root / "pair" / "1" / "model.onnx")
    build_mlp(root / "spare" / "1" / "model.onnx", seed=3)
    build_fixed(root / "fixed" / "1" / "model.onnx")
    build_lookup(root / "lookup" / "1" / "model.onnx")
    return root


class Oracle:
    """In-process ONNX Runtime on the model files: the expected results."""

    def __init__(self, model_dir: Path) -> None:
        self.model_dir = model_dir
        self._sessions: dict[tuple[str, str], ort.InferenceSession] = {}

    def session(self, name: str, version: str) -> ort.InferenceSession:
        key = (name, version)
        if key not in self._sessions:
            self._sessions[key] = ort.InferenceSession(str(self.model_dir / name / version / "model.onnx"),
                                                       providers=["CPUExecutionProvider"])
        return self._sessions[key]

    def run(self, name: str, version: str, **inputs: np.ndarray) -> dict[str, np.ndarray]:
        session = self.session(name, version)
        names = [o.name for o in session.get_outputs()]
        return dict(zip(names, session.run(names, inputs)))


def assert_outputs_match(got: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> None:
    """Element by element, allowing the float rounding differences of another batch size."""
    assert set(got) <= set(expected), f"unexpected outputs {set(got) - set(expected)}"
    for name, array in got.items():
        assert array.shape == expected[name].shape, f"{name}: shape {array.shape} vs {expected[name].shape}"
        assert array.dtype == expected[name].dtype, f"{name}: dtype {array.dtype} vs {expected[name].dtype}"
        np.testing.assert_allclose(array, expected[name], rtol=1e-5, atol=1e-6, err_msg=name)


def infer_request(model: str, version: str = "", outputs: tuple[str, ...] = (),
                  **inputs: np.ndarray) -> pb.ModelInferRequest:
    """A ModelInferRequest with every input in raw_input_contents."""
    request = pb.ModelInferRequest(model_name=model, model_version=version)
    for name, array in inputs.items():
        request.inputs.add(name=name, datatype=NP_TO_DATATYPE[array.dtype], shape=array.shape)
        request.raw_input_contents.append(np.ascontiguousarray(array).tobytes())
    for name in outputs:
        request.outputs.add(name=name)
    return request


def response_arrays(response: pb.ModelInferResponse) -> dict[str, np.ndarray]:
    """The raw outputs of a response as arrays."""
    return {tensor.name: np.frombuffer(raw, DATATYPE_TO_NP[tensor.datatype]).reshape(tuple(tensor.shape))
            for tensor, raw in zip(response.outputs, response.raw_output_contents)}


def rows(seed: int, count: int) -> np.ndarray:
    """`count` distinct rows of mlp input."""
    return np.random.default_rng(seed).standard_normal((count, MLP_IN)).astype(np.float32)


@dataclass
class ServerProcess:
    """`splitstack-serving` running as a child process."""

    proc: subprocess.Popen
    port: int
    metrics_port: int | None
    log_path: Path

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def log_text(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    def stop(self, timeout: float = 20.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def wait_until_ready(address: str, timeout: float, proc: subprocess.Popen | None = None) -> None:
    """Poll ServerReady until true (every startup model loaded and warmed)."""
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        while time.monotonic() < deadline:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"serving exited with {proc.returncode} before it was ready")
            with contextlib.suppress(grpc.RpcError):
                if stub.ServerReady(pb.ServerReadyRequest(), timeout=1.0).ready:
                    return
            time.sleep(0.05)
    raise TimeoutError(f"serving at {address} not ready within {timeout}s")


def start_server_process(work_dir: Path, model_dir: Path, env: dict[str, str], timeout: float = 60.0) -> ServerProcess:
    """Start `python -m splitstack_serving.main` with `env` on top of the model dir and free ports."""
    ready_file = work_dir / "serving.ready"
    log_path = work_dir / "serving.log"
    full_env = {**{k: v for k, v in os.environ.items() if not k.startswith("SPLITSTACK_SERVING_")},
                "SPLITSTACK_SERVING_MODEL_DIR": str(model_dir), "SPLITSTACK_SERVING_GRPC_PORT": "0",
                "SPLITSTACK_SERVING_READY_FILE": str(ready_file), "SPLITSTACK_SERVING_METRICS_PORT": "0", **env}
    with log_path.open("wb") as log_file:
        proc = subprocess.Popen([sys.executable, "-m", "splitstack_serving.main"], env=full_env,
                                stdout=log_file, stderr=subprocess.STDOUT, cwd=work_dir)
    deadline = time.monotonic() + timeout
    while not ready_file.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"serving did not start:\n{log_path.read_text()}")
        time.sleep(0.05)
    info = json.loads(ready_file.read_text())
    server = ServerProcess(proc, info["grpc_port"], info["metrics_port"], log_path)
    try:
        wait_until_ready(server.address, timeout, proc)
    except Exception:
        server.stop()
        raise RuntimeError(f"serving not ready:\n{server.log_text()}") from None
    return server


@contextlib.contextmanager
def server_process(work_dir: Path, model_dir: Path, env: dict[str, str]) -> Iterator[ServerProcess]:
    """A serving child process, stopped (SIGTERM) on exit."""
    server = start_server_process(work_dir, model_dir, env)
    try:
        yield server
    finally:
        server.stop()
