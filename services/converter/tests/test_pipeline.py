"""The pipeline stages in process, on the trained hand-offs: export, optimize, quantize, gate,
profile floors, selection and the sample checks."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from converter_models import HandOff, TinyDigitsCNN, npz_bytes

from splitstack.common.v1 import common_pb2 as common
from splitstack_converter.pipeline import PipelineError
from splitstack_converter.pipeline.candidates import Candidate
from splitstack_converter.pipeline.export import batch_axis_name, export_onnx
from splitstack_converter.pipeline.gate import Tolerance, evaluate, resolve_tolerance, run_in_batches
from splitstack_converter.pipeline.optimize import optimize_onnx
from splitstack_converter.pipeline.profile import Floors, batch_sizes, measure_point
from splitstack_converter.pipeline.quantize import (CPU_REDUCED_RANGE_SCHEME, CPU_SCHEME, cpu_scheme, quantize_int8,
                                                     x86_without_vnni)
from splitstack_converter.pipeline.runners import OrtOptions, OrtRunner
from splitstack_converter.pipeline.sample import check_declared_sizes, load_sample
from splitstack_converter.pipeline.select import choose

ACCURACY = common.PrimaryMetric(name="accuracy", direction=common.MAXIMIZE)
P50_AT_1 = common.SelectionMetric(name="p50_latency_ms", batch_size=1)


@pytest.fixture(scope="module")
def mlp_files(handoffs: dict[str, HandOff], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("mlp")
    (root / "model.pt2").write_bytes(handoffs["mlp"].program)
    (root / "sample.npz").write_bytes(handoffs["mlp"].sample)
    export_onnx(root / "model.pt2", root / "exported.onnx")
    optimize_onnx(root / "exported.onnx", root / "optimized.onnx")
    sample = load_sample(root / "sample.npz", (64,))
    quantize_int8(root / "optimized.onnx", root / "int8.onnx", sample.calibration_inputs, "x")
    return {name: root / f"{name}.onnx" for name in ("exported", "optimized", "int8")} | {"sample": root / "sample.npz"}


def outputs(path: Path, inputs: np.ndarray) -> np.ndarray:
    runner = OrtRunner(path, OrtOptions())
    return run_in_batches(runner.run, inputs, 64)


def test_export_is_one_file_with_a_batch_axis_matching_the_program(mlp_files: dict[str, Path]) -> None:
    exported = mlp_files["exported"]
    assert sorted(p.name for p in exported.parent.glob("exported*")) == ["exported.onnx"]   # no external data
    model = onnx.load(str(exported))
    onnx.checker.check_model(model, full_check=True)
    assert batch_axis_name(exported) == "batch"
    assert [o.name for o in model.graph.output] == ["logits"]
    assert model.graph.output[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    sample = load_sample(mlp_files["sample"], (64,))
    runner = OrtRunner(exported, OrtOptions())
    for rows in (1, 7, 64):
        np.testing.assert_allclose(runner.run(sample.inputs[:rows]), sample.reference_outputs[:rows], atol=1e-4)


def test_optimized_model_keeps_the_batch_axis_and_the_outputs(mlp_files: dict[str, Path]) -> None:
    assert batch_axis_name(mlp_files["optimized"]) == "batch"
    sample = load_sample(mlp_files["sample"], (64,))
    np.testing.assert_allclose(outputs(mlp_files["optimized"], sample.inputs), sample.reference_outputs, atol=1e-4)


def test_int8_is_per_channel_qdq_and_passes_the_gate(mlp_files: dict[str, Path]) -> None:
    model = onnx.load(str(mlp_files["int8"]))
    ops = [n.op_type for n in model.graph.node]
    assert "QuantizeLinear" in ops and "DequantizeLinear" in ops and "QLinearMatMul" not in ops   # QDQ format
    scales = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    weight_scales = [scales[n.input[1]] for n in model.graph.node
                     if n.op_type == "DequantizeLinear" and n.input[0] in scales and scales[n.input[0]].dtype == np.int8]
    assert weight_scales and all(s.shape == (1024,) or s.shape == (10,) for s in weight_scales)   # one per channel
    sample = load_sample(mlp_files["sample"], (64,))
    gate = evaluate(outputs(mlp_files["int8"], sample.inputs), sample.reference_outputs, sample.labels, ACCURACY,
                    Tolerance())
    assert gate.passed, gate.reason
    assert gate.top1_agreement >= 0.97 and abs(gate.metric_delta) <= 0.01 and gate.max_abs_diff > 0


def test_export_rejects_garbage_and_static_batch(tmp_path: Path) -> None:
    (tmp_path / "garbage.pt2").write_bytes(b"PK\x03\x04 not really a zip archive" * 100)
    with pytest.raises(PipelineError) as garbage:
        export_onnx(tmp_path / "garbage.pt2", tmp_path / "garbage.onnx")
    assert garbage.value.stage == "export" and "cannot load the exported program" in garbage.value.reason
    static = torch.export.export(TinyDigitsCNN().eval(), (torch.zeros(4, 64),))   # no dynamic_shapes
    torch.export.save(static, tmp_path / "static.pt2")
    with pytest.raises(PipelineError, match="dynamic batch axis"):
        export_onnx(tmp_path / "static.pt2", tmp_path / "static.onnx")


def test_gate_verdicts() -> None:
    rng = np.random.default_rng(0)
    reference = rng.normal(size=(400, 10)).astype(np.float32)
    labels = reference.argmax(1)
    labels[:40] = (labels[:40] + 1) % 10                      # reference accuracy 0.9
    same = evaluate(reference + 1e-6, reference, labels, ACCURACY, Tolerance())
    assert same.passed and same.top1_agreement == 1.0 and same.reference_metric == pytest.approx(0.9)
    assert same.max_metric_drop == 0.01 and same.min_top1_agreement == 0.97
    worse = reference.copy()
    worse[40:60] = np.roll(worse[40:60], 1, axis=1)          # 20 rows now disagree and are wrong
    verdict = evaluate(worse, reference, labels, ACCURACY, Tolerance())
    assert not verdict.passed and verdict.metric_delta < -0.01 and verdict.top1_agreement == pytest.approx(0.95)
    assert "top-1 agreement" in verdict.reason and "accuracy" in verdict.reason
    assert evaluate(worse, reference, labels, ACCURACY, Tolerance(0.1, 0.9)).passed
    nan = evaluate(np.full_like(reference, np.nan), reference, labels, ACCURACY, Tolerance())
    assert not nan.passed and "NaN" in nan.reason
    with pytest.raises(PipelineError, match="cannot compute primary metric 'bleu'"):
        evaluate(reference, reference, labels, common.PrimaryMetric(name="bleu"), Tolerance())


def test_tolerance_resolution_request_over_labels_over_defaults() -> None:
    defaults = Tolerance(0.01, 0.97)
    assert resolve_tolerance(defaults, {}) == defaults
    labels = {"gate.max_metric_drop": "0.03", "gate.min_top1_agreement": "0.9"}
    assert resolve_tolerance(defaults, labels) == Tolerance(0.03, 0.9)
    request = common.GateTolerance(max_metric_drop=0.005)
    assert resolve_tolerance(defaults, labels, request) == Tolerance(0.005, 0.9)
    with pytest.raises(ValueError, match="gate.max_metric_drop"):
        resolve_tolerance(defaults, {"gate.max_metric_drop": "lots"})
    with pytest.raises(ValueError, match="min_top1_agreement"):
        resolve_tolerance(defaults, {}, common.GateTolerance(min_top1_agreement=1.5))


def candidate(fmt: int, p50_at_1: float, accepted: bool = True, throughput: float = 0.0) -> Candidate:
    profile = common.MeasuredProfile(points=[
        common.LatencyPoint(batch_size=1, p50_ms=p50_at_1, p99_ms=p50_at_1 * 2,
                            throughput_rows_per_s=throughput or 1000 / p50_at_1),
        common.LatencyPoint(batch_size=64, p50_ms=p50_at_1 * 10, p99_ms=p50_at_1 * 20)])
    gate = common.GateResult(passed=accepted, reason="passed" if accepted else "too inaccurate")
    return Candidate(format=fmt, accepted=accepted, profile=profile, gate=gate, sha256=f"{fmt}" * 8,
                     reason=gate.reason)


def test_selection_leaves_fp32_only_for_ten_percent() -> None:
    fp32 = candidate(common.ONNX_FP32, 1.0)
    assert choose([candidate(common.ONNX_INT8, 0.95), fp32], P50_AT_1).chosen is fp32
    faster = candidate(common.ONNX_INT8, 0.5)
    selection = choose([faster, candidate(common.ONNX_FP32, 1.0)], P50_AT_1)
    assert selection.chosen is faster and "50% better" in selection.reason
    slower = candidate(common.ONNX_INT8, 1.5)
    assert choose([slower, fp32], P50_AT_1).chosen is fp32
    only = candidate(common.ONNX_INT8, 1.5)                     # FP32 failed its gate: the best passing wins
    assert choose([only, candidate(common.ONNX_FP32, 0.1, accepted=False)], P50_AT_1).chosen is only
    throughput = common.SelectionMetric(name="throughput_rows_per_s", batch_size=1)
    high = candidate(common.ONNX_INT8, 1.0, throughput=2000)
    assert choose([high, candidate(common.ONNX_FP32, 1.0, throughput=1000)], throughput).chosen is high
    assert choose([candidate(common.ONNX_INT8, 1.0, throughput=1050), fp32], throughput).chosen is fp32
    with pytest.raises(PipelineError, match="no candidate passed.*ONNX_INT8: too inaccurate"):
        choose([candidate(common.ONNX_INT8, 1.0, accepted=False)], P50_AT_1)


def test_profile_points_stop_at_the_run_or_time_floor() -> None:
    calls: list[int] = []
    batch = np.zeros((4, 2), dtype=np.float32)
    by_runs = measure_point(lambda x: calls.append(len(x)), batch, Floors(min_runs=40, min_seconds=60, warmup_runs=5))
    assert by_runs.runs == 40 and len(calls) == 45 and by_runs.batch_size == 4
    assert 0 < by_runs.p50_ms <= by_runs.p99_ms and by_runs.throughput_rows_per_s > 0
    by_time = measure_point(lambda x: sum(range(2000)), batch, Floors(min_runs=10**9, min_seconds=0.05, warmup_runs=0))
    assert 3 <= by_time.runs < 10**9
    assert batch_sizes(64, 1) == [1, 64] and batch_sizes(64, 8) == [1, 8, 64] and batch_sizes(16, 256) == [1, 16]


def test_sample_checks(tmp_path: Path, handoffs: dict[str, HandOff]) -> None:
    path = tmp_path / "sample.npz"
    path.write_bytes(npz_bytes(inputs=np.zeros((10, 64), np.float32), labels=np.zeros(10),
                               reference_outputs=np.zeros((10, 10), np.float32)))
    with pytest.raises(PipelineError, match="at least 300"):
        load_sample(path, (64,))
    path.write_bytes(handoffs["mlp"].sample)
    with pytest.raises(PipelineError, match=r"model takes \[rows, 8, 8\]"):
        load_sample(path, (8, 8))
    path.write_bytes(handoffs["mlp"].sample_with(calibration_inputs=np.ones((1000, 64), np.float32)))
    sample = load_sample(path, (64,), max_calibration_rows=100)
    assert sample.calibration_inputs.shape == (100, 64) and sample.calibration_inputs.max() == 1.0
    path.write_bytes(b"not an npz")
    with pytest.raises(PipelineError, match="not a readable .npz"):
        load_sample(path, (64,))


def test_a_sample_declaring_more_than_it_holds_is_refused_before_allocation(tmp_path: Path,
                                                                          handoffs: dict[str, HandOff]) -> None:
    """An .npy header may declare any shape; numpy would allocate it before reading (2**40 floats: 4 TiB)."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False,
                                                  "shape": (2**20, 2**20)})
    with zipfile.ZipFile(tmp_path / "bomb.npz", "w") as archive:
        archive.writestr("inputs.npy", header.getvalue() + b"\0" * 64)   # magic, header, 64 bytes
    with pytest.raises(PipelineError, match="'inputs.npy' declares 4398046511104 bytes but holds"):
        load_sample(tmp_path / "bomb.npz", (64,))
    (tmp_path / "sample.npz").write_bytes(handoffs["mlp"].sample)
    check_declared_sizes(tmp_path / "sample.npz")
    with pytest.raises(PipelineError, match="more than 1000 bytes"):
        check_declared_sizes(tmp_path / "sample.npz", limit=1000)


def test_cpu_scheme_reduces_the_weight_range_only_on_x86_without_vnni(tmp_path: Path) -> None:
    def cpuinfo(text: str) -> Path:
        path = tmp_path / f"cpuinfo-{len(list(tmp_path.iterdir()))}"
        path.write_text(text)
        return path

    assert x86_without_vnni(cpuinfo("processor\t: 0\nflags\t\t: fpu sse2 avx2 fma\n"))
    assert not x86_without_vnni(cpuinfo("processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_vnni\n"))
    assert not x86_without_vnni(cpuinfo("processor\t: 0\nflags\t\t: fpu avx2 avx_vnni\n"))
    assert not x86_without_vnni(cpuinfo("processor\t: 0\nFeatures\t: fp asimd asimddp\n"))     # ARM
    assert not x86_without_vnni(tmp_path / "absent")
    assert cpu_scheme() in (CPU_SCHEME, CPU_REDUCED_RANGE_SCHEME)
    assert CPU_REDUCED_RANGE_SCHEME.reduce_range and not CPU_SCHEME.reduce_range
