"""The benchmark's model and the in-process limit: MLP 64-1024-1024-10, FP32 and INT8 QDQ, on ONNX Runtime.

`build_models` writes the FP32 MLP (onnx.helper, seeded random weights, dynamic batch dim) and its
INT8 QDQ form (ONNX Runtime static quantization: per-channel signed weights, unsigned activations,
MinMax calibrated on random rows) into a Triton-style model directory
(`<dir>/<name>/1/model.onnx`), the layout every contender loads from. `measure_in_process` times
`session.run` in one loop on one intra-op thread: the limit a server with one model instance can
approach. This file imports no serving code, so the KServe venv can use `session_options` too.
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

import numpy as np  # noqa: E402

FEATURES, HIDDEN, CLASSES = 64, 1024, 10
INPUT_NAME, OUTPUT_NAME = "x", "logits"
OPSET, IR_VERSION = 17, 8
CALIBRATION_ROWS = 512


@dataclass(frozen=True)
class LatencyPoint:
    """Timed calls at one batch size: calls/s, rows/s and latency percentiles (ms)."""

    batch: int
    calls: int
    seconds: float
    p50_ms: float
    p99_ms: float

    @property
    def calls_per_s(self) -> float:
        return self.calls / self.seconds

    @property
    def rows_per_s(self) -> float:
        return self.calls * self.batch / self.seconds


def session_options(threads: int = 1):  # noqa: ANN201 - onnxruntime imported lazily
    """One intra-op and one inter-op thread, sequential execution: the same for every contender."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    return options


def input_rows(batch: int, seed: int = 0) -> np.ndarray:
    """`batch` rows of model input (FP32, standard normal)."""
    return np.random.default_rng(seed).standard_normal((batch, FEATURES)).astype(np.float32)


def _fp32_model():  # noqa: ANN202 - onnx imported lazily
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(64)
    sizes = [(FEATURES, HIDDEN), (HIDDEN, HIDDEN), (HIDDEN, CLASSES)]
    weights = []
    for i, (fan_in, fan_out) in enumerate(sizes):
        weights.append(numpy_helper.from_array(
            (rng.standard_normal((fan_in, fan_out)) / np.sqrt(fan_in)).astype(np.float32), f"w{i}"))
        weights.append(numpy_helper.from_array((rng.standard_normal(fan_out) * 0.01).astype(np.float32), f"b{i}"))
    nodes = [helper.make_node("Gemm", [INPUT_NAME, "w0", "b0"], ["h0"]), helper.make_node("Relu", ["h0"], ["a0"]),
             helper.make_node("Gemm", ["a0", "w1", "b1"], ["h1"]), helper.make_node("Relu", ["h1"], ["a1"]),
             helper.make_node("Gemm", ["a1", "w2", "b2"], [OUTPUT_NAME])]
    graph = helper.make_graph(
        nodes, "mlp", [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["batch", FEATURES])],
        [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["batch", CLASSES])], weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    return model


def _quantize(fp32: Path, int8: Path) -> None:
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)

    class Rows(CalibrationDataReader):
        def __init__(self) -> None:
            rows = input_rows(CALIBRATION_ROWS, seed=7)
            self._feeds = iter([{INPUT_NAME: rows[i:i + 64]} for i in range(0, len(rows), 64)])

        def get_next(self) -> dict | None:
            return next(self._feeds, None)

    quantize_static(str(fp32), str(int8), Rows(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    calibrate_method=CalibrationMethod.MinMax,
                    extra_options={"ActivationSymmetric": False, "WeightSymmetric": True})


def build_models(model_dir: Path) -> dict[str, Path]:
    """Write mlp_fp32 and mlp_int8 (version 1 each) under `model_dir`; returns name -> model.onnx."""
    import onnx

    paths = {name: model_dir / name / "1" / "model.onnx" for name in ("mlp_fp32", "mlp_int8")}
    for path in paths.values():
        path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(_fp32_model(), str(paths["mlp_fp32"]))
    with tempfile.TemporaryDirectory(prefix="bench-quantize-") as scratch:
        calibrated = Path(scratch) / "int8.onnx"
        _quantize(paths["mlp_fp32"], calibrated)
        paths["mlp_int8"].write_bytes(calibrated.read_bytes())
    return paths


def open_session(path: Path, threads: int = 1):  # noqa: ANN201
    """An ONNX Runtime CPU session on `path` with the benchmark's thread settings."""
    import onnxruntime as ort

    return ort.InferenceSession(str(path), session_options(threads), providers=["CPUExecutionProvider"])


def measure_in_process(path: Path, batch: int, seconds: float, warmup_calls: int = 200) -> LatencyPoint:
    """`session.run` in one loop for `seconds` (after warm-up): the single-instance limit."""
    session = open_session(path)
    feeds = {INPUT_NAME: input_rows(batch)}
    run = session.run
    for _ in range(warmup_calls):
        run(None, feeds)
    latencies: list[int] = []
    clock = time.perf_counter_ns
    started = clock()
    stop = started + int(seconds * 1e9)
    now = started
    while now < stop:
        run(None, feeds)
        done = clock()
        latencies.append(done - now)
        now = done
    ns = np.asarray(latencies)
    return LatencyPoint(batch, len(ns), (now - started) / 1e9, float(np.percentile(ns, 50)) / 1e6,
                        float(np.percentile(ns, 99)) / 1e6)
