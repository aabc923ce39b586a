"""The TensorRT path up to the TensorRT calls: capability detection (10.x vs 11.x), explicit Q/DQ and
FP16 model preparation, optimization profile shapes, cache keys and the engine cache. The engine
build and run themselves need TensorRT and a GPU: `test_engines_build_and_pass_the_gate_on_this_gpu`
runs only where both exist (never in CI here) and says so when skipped."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from converter_models import HandOff

from splitstack.common.v1 import common_pb2 as common
from splitstack_converter.pipeline import tensorrt
from splitstack_converter.pipeline.build import CandidateBuilder, TargetBuild
from splitstack_converter.pipeline.export import export_onnx
from splitstack_converter.pipeline.gate import Tolerance, evaluate, run_in_batches
from splitstack_converter.pipeline.optimize import optimize_onnx
from splitstack_converter.pipeline.profile import Floors
from splitstack_converter.pipeline.runners import OrtOptions
from splitstack_converter.pipeline.sample import load_sample

from splitstack.contracts.stacks import inference_targets

ACCURACY = common.PrimaryMetric(name="accuracy", direction=common.MAXIMIZE)


def trt_10() -> SimpleNamespace:
    """A stand-in with the 10.x surface the detection looks at."""
    return SimpleNamespace(__version__="10.7.0.23", BuilderFlag=SimpleNamespace(FP16=1, INT8=2, STRICT_TYPES=3),
                           NetworkDefinitionCreationFlag=SimpleNamespace(STRONGLY_TYPED=1),
                           IInt8EntropyCalibrator2=object)


def trt_11() -> SimpleNamespace:
    """11.x: no precision flags, no calibrators; strongly typed networks with explicit Q/DQ."""
    return SimpleNamespace(__version__="11.0.0.4", BuilderFlag=SimpleNamespace(REFIT=1, SPARSE_WEIGHTS=2),
                           NetworkDefinitionCreationFlag=SimpleNamespace(STRONGLY_TYPED=1))


def test_capabilities_of_10_and_11() -> None:
    ten = tensorrt.detect_capabilities(trt_10())
    assert (ten.major, ten.precision_flags, ten.calibrators, ten.strongly_typed) == (10, True, True, True)
    assert not ten.fp16_from_onnx_types and ten.network_flags(trt_10()) == 0       # weakly typed + FP16 flag
    eleven = tensorrt.detect_capabilities(trt_11())
    assert (eleven.major, eleven.precision_flags, eleven.calibrators) == (11, False, False)
    assert eleven.fp16_from_onnx_types and eleven.network_flags(trt_11()) == 1 << 1


def test_profile_shapes_and_cache_keys() -> None:
    shapes = tensorrt.profile_shapes("x", (64,), max_batch=64, opt_batch=1)
    assert (shapes.min, shapes.opt, shapes.max) == ((1, 64), (1, 64), (64, 64))
    assert shapes.describe() == "x:1x64/1x64/64x64"
    assert tensorrt.profile_shapes("x", (1, 8, 8), 32, opt_batch=500).opt == (32, 1, 8, 8)
    key = tensorrt.cache_key("ab" * 32, "Tesla-T4", "10.7.0", "INT8", shapes)
    assert key == tensorrt.cache_key("ab" * 32, "Tesla-T4", "10.7.0", "INT8", shapes) and len(key) == 64
    changed = [tensorrt.cache_key("cd" * 32, "Tesla-T4", "10.7.0", "INT8", shapes),
               tensorrt.cache_key("ab" * 32, "NVIDIA-L4", "10.7.0", "INT8", shapes),
               tensorrt.cache_key("ab" * 32, "Tesla-T4", "11.0.0", "INT8", shapes),
               tensorrt.cache_key("ab" * 32, "Tesla-T4", "10.7.0", "FP16", shapes),
               tensorrt.cache_key("ab" * 32, "Tesla-T4", "10.7.0", "INT8", tensorrt.profile_shapes("x", (64,), 128))]
    assert len({key, *changed}) == 6


def test_engine_cache(tmp_path: Path) -> None:
    cache = tensorrt.EngineCache(tmp_path / "engines")
    assert cache.get("k") is None
    stored = cache.put("k", b"plan-bytes")
    assert cache.get("k") == stored and stored.read_bytes() == b"plan-bytes"
    assert sorted(p.name for p in (tmp_path / "engines").iterdir()) == ["k.plan"]


@pytest.fixture(scope="module")
def builder(handoffs: dict[str, HandOff], tmp_path_factory: pytest.TempPathFactory) -> CandidateBuilder:
    root = tmp_path_factory.mktemp("trt")
    (root / "model.pt2").write_bytes(handoffs["mlp"].program)
    (root / "sample.npz").write_bytes(handoffs["mlp"].sample)
    info = export_onnx(root / "model.pt2", root / "exported.onnx")
    optimize_onnx(root / "exported.onnx", root / "optimized.onnx")
    target = inference_targets()["t4-int8"]
    build = TargetBuild(target, OrtOptions(), Floors(min_runs=20, min_seconds=0.1), root / "engines")
    return CandidateBuilder(build, root / "optimized.onnx", info, load_sample(root / "sample.npz", (64,)), root)


def gate_of(builder: CandidateBuilder, path: Path) -> common.GateResult:
    """The gate of a TensorRT-bound ONNX file, run by ONNX Runtime with graph optimizations off.

    Off, Q/DQ nodes run as they stand (quantize, dequantize, float math): TensorRT's numerics with
    32-bit accumulation. With them on, ORT fuses its own S8S8 int8 kernels, whose 16-bit sums
    saturate on x86 without VNNI — a property of this CPU, not of the model TensorRT will run.
    """
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    out = run_in_batches(lambda batch: session.run(None, {name: batch})[0], builder.sample.inputs, 64)
    return evaluate(out, builder.sample.reference_outputs, builder.sample.labels, ACCURACY, Tolerance())


def test_int8_for_tensorrt_is_explicit_symmetric_qdq(builder: CandidateBuilder) -> None:
    for caps in (tensorrt.detect_capabilities(trt_10()), tensorrt.detect_capabilities(trt_11())):
        path = builder.prepare_tensorrt_onnx("INT8", caps)
        model = onnx.load(str(path))
        zero_points = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer
                       if i.name.endswith("zero_point")}
        assert zero_points and not any(z.any() for z in zero_points.values())          # symmetric: all 0
        assert {z.dtype for n, z in zero_points.items() if "bias" not in n} == {np.dtype(np.int8)}   # signed
        assert {"QuantizeLinear", "DequantizeLinear"} <= {n.op_type for n in model.graph.node}
        assert gate_of(builder, path).passed


def test_fp16_for_tensorrt_11_lives_in_the_model(builder: CandidateBuilder) -> None:
    assert builder.prepare_tensorrt_onnx("FP16", tensorrt.detect_capabilities(trt_10())) == builder.optimized
    path = builder.prepare_tensorrt_onnx("FP16", tensorrt.detect_capabilities(trt_11()))
    model = onnx.load(str(path))
    assert {i.data_type for i in model.graph.initializer if i.name.endswith("weight")} == {onnx.TensorProto.FLOAT16}
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT          # callers unchanged
    assert model.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert gate_of(builder, path).passed


def test_without_tensorrt_engine_candidates_are_rejected_with_the_reason(builder: CandidateBuilder) -> None:
    if tensorrt.import_tensorrt() is not None:
        pytest.skip("tensorrt is installed here")
    for fmt in (common.TENSORRT_FP16, common.TENSORRT_INT8):
        candidate = builder.build(fmt)
        assert candidate.path is None and not candidate.accepted and "not installed" in candidate.reason


def test_a_gpu_target_refuses_to_start_where_it_cannot_build_engines() -> None:
    problem = tensorrt.environment_problem("Tesla-T4")
    if tensorrt.import_tensorrt() is None:
        assert "tensorrt is not installed" in problem
    elif not tensorrt.gpu_product():
        assert "no GPU" in problem


@pytest.mark.skipif(tensorrt.import_tensorrt() is None or not tensorrt.gpu_product(),
                    reason="needs TensorRT and a GPU: the engine build and run have not run in CI")
def test_engines_build_and_pass_the_gate_on_this_gpu(builder: CandidateBuilder) -> None:
    builder.build_settings = TargetBuild(
        common.InferenceTarget(id="gpu-here", accelerator=common.GPU, gpu_product=tensorrt.gpu_product(),
                               max_batch=64, selection_metric=common.SelectionMetric(name="p50_latency_ms",
                                                                                     batch_size=1)),
        OrtOptions(accelerator=common.GPU), Floors(min_runs=20, min_seconds=0.1), builder.workdir / "engines")
    for fmt in (common.TENSORRT_FP16, common.TENSORRT_INT8):
        candidate = builder.build(fmt)
        assert candidate.path is not None, candidate.reason
        assert candidate.metadata["cache_key"] and candidate.metadata["profile"] == "x:1x64/1x64/64x64"
        builder.gate(candidate, ACCURACY, Tolerance())
        assert candidate.accepted, candidate.reason
        builder.profile(candidate)
        assert candidate.profile.points and candidate.profile.runtime.startswith("tensorrt")
