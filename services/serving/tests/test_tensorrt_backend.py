"""Native TensorRT plans: capability detection, refusal where TensorRT cannot run, engine signatures.

TensorRT is not installable on the CI machines and they have no GPU, so the parts that read an
engine (datatypes, I/O tensors, the optimization profile's batch range) are tested against fake
engine objects (`Fake*`, tests named `..._with_fake_engine`). Only
`test_real_tensorrt_plan_round_trip` touches a real engine, and it runs only where TensorRT
imports and a CUDA GPU exists.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import grpc
import numpy as np
import onnxruntime as ort
import pytest
from serving_support import build_mlp, infer_request, response_arrays, rows

from inference import grpc_service_pb2 as pb
from splitstack.common.v1 import common_pb2
from splitstack_serving.backend import BackendOptions, ModelLoadError
from splitstack_serving.batching import BatchPolicy
from splitstack_serving.cache import ArtifactCache
from splitstack_serving.registry_source import NotServable, RegistryModelSource, ServingArtifact
from splitstack_serving.repository import engine_batch_limit, open_model
from splitstack_serving.source import DirectoryModelSource
from splitstack_serving.tensorrt_backend import (
    TensorRtModel, detect_capability, engine_signature, import_tensorrt, trt_datatype,
)

CAPABILITY = detect_capability()
NO_DEVICE = "no CUDA device (torch.cuda.is_available() is False)"


# ---- fakes standing in for the TensorRT runtime API (not TensorRT itself) ------------------------------

@dataclass(frozen=True)
class FakeDataType:
    """Stands in for a `tensorrt.DataType` member (only `.name` is read)."""

    name: str


FAKE_TRT = SimpleNamespace(TensorIOMode=SimpleNamespace(INPUT="INPUT", OUTPUT="OUTPUT"), __version__="10.3.0")


@dataclass
class FakeTensor:
    mode: str
    dtype: str
    shape: tuple[int, ...]
    profile: tuple[tuple[int, ...], ...] = ()


@dataclass
class FakeEngine:
    """Stands in for a deserialized `ICudaEngine`: tensor-name I/O and profile 0."""

    tensors: dict[str, FakeTensor]
    contexts: list[object] = field(default_factory=list)

    @property
    def num_io_tensors(self) -> int:
        return len(self.tensors)

    def get_tensor_name(self, index: int) -> str:
        return list(self.tensors)[index]

    def get_tensor_mode(self, name: str) -> str:
        return self.tensors[name].mode

    def get_tensor_dtype(self, name: str) -> FakeDataType:
        return FakeDataType(self.tensors[name].dtype)

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        return self.tensors[name].shape

    def get_tensor_profile_shape(self, name: str, profile: int) -> tuple[tuple[int, ...], ...]:
        assert profile == 0
        return self.tensors[name].profile

    def create_execution_context(self) -> object:
        context = object()
        self.contexts.append(context)
        return context


def two_input_engine() -> FakeEngine:
    return FakeEngine({
        "x": FakeTensor("INPUT", "FLOAT", (-1, 4), ((1, 4), (8, 4), (32, 4))),
        "tokens": FakeTensor("INPUT", "INT32", (-1, -1), ((1, 2), (4, 16), (16, 64))),
        "scores": FakeTensor("OUTPUT", "HALF", (-1, 10)),
        "ids": FakeTensor("OUTPUT", "INT64", (-1,)),
    })


# ---- capability -----------------------------------------------------------------------------------------

@pytest.mark.skipif(import_tensorrt() is not None, reason="tensorrt is importable on this machine")
def test_capability_reports_tensorrt_missing_with_the_reason() -> None:
    assert not CAPABILITY.available
    assert CAPABILITY.reason == "tensorrt not importable" and CAPABILITY.module is None


def test_capability_names_each_missing_piece_with_fake_module() -> None:
    old = detect_capability(lambda: SimpleNamespace(__version__="8.6.1"), lambda: "")
    assert not old.available and "tensorrt 8.6.1 is older than 10.x" in old.reason and old.major == 8
    no_gpu = detect_capability(lambda: FAKE_TRT, lambda: NO_DEVICE)
    assert not no_gpu.available and no_gpu.reason == NO_DEVICE and no_gpu.version == "10.3.0"
    for version, major in (("10.3.0", 10), ("11.0.0.post1", 11)):
        module = SimpleNamespace(__version__=version)
        ready = detect_capability(lambda module=module: module, lambda: "")
        assert ready.available and ready.major == major and ready.module is module and ready.reason == ""


# ---- engine signatures (fakes) --------------------------------------------------------------------------

def test_datatypes_map_to_protocol_datatypes_with_fake_engine() -> None:
    expected = {"FLOAT": "FP32", "HALF": "FP16", "INT8": "INT8", "INT32": "INT32", "INT64": "INT64",
                "BOOL": "BOOL", "UINT8": "UINT8"}
    assert {name: trt_datatype(FakeDataType(name), "t", "input") for name in expected} == expected
    assert trt_datatype("DataType.HALF", "t", "input") == "FP16"  # enums printed without `.name`
    with pytest.raises(ModelLoadError, match="output 'probs' has TensorRT type BF16, which serving does not"):
        trt_datatype(FakeDataType("BF16"), "probs", "output")


def test_signature_and_max_batch_from_profile_with_fake_engine() -> None:
    signature = engine_signature(FAKE_TRT, two_input_engine())
    assert [(s.name, s.datatype, s.shape) for s in signature.inputs] == [("x", "FP32", (-1, 4)),
                                                                       ("tokens", "INT32", (-1, -1))]
    assert [(s.name, s.datatype, s.shape) for s in signature.outputs] == [("scores", "FP16", (-1, 10)),
                                                                        ("ids", "INT64", (-1,))]
    assert signature.max_batch == 16, "the smallest profile max of dim 0 over the inputs"
    assert signature.profile_min == {"x": (1, 4), "tokens": (1, 2)}


def test_static_batch_dim_is_not_batchable_with_fake_engine() -> None:
    engine = FakeEngine({"x": FakeTensor("INPUT", "FLOAT", (2, 4)), "y": FakeTensor("OUTPUT", "FLOAT", (2, 3))})
    signature = engine_signature(FAKE_TRT, engine)
    assert signature.max_batch == 0 and signature.profile_min == {"x": (2, 4)}


def test_profile_that_cannot_take_one_row_is_refused_with_fake_engine() -> None:
    engine = FakeEngine({"x": FakeTensor("INPUT", "FLOAT", (-1, 4), ((4, 4), (8, 4), (8, 4))),
                         "y": FakeTensor("OUTPUT", "FLOAT", (-1, 3))})
    with pytest.raises(ModelLoadError, match="input 'x': the optimization profile's minimum batch is 4"):
        engine_signature(FAKE_TRT, engine)


def test_unsupported_io_type_is_refused_with_fake_engine() -> None:
    engine = FakeEngine({"x": FakeTensor("INPUT", "FP8", (-1, 4), ((1, 4), (1, 4), (8, 4))),
                         "y": FakeTensor("OUTPUT", "FLOAT", (-1, 3))})
    with pytest.raises(ModelLoadError, match="input 'x' has TensorRT type FP8"):
        engine_signature(FAKE_TRT, engine)


def test_model_caps_the_batch_policy_and_warms_up_inside_the_profile_with_fake_engine() -> None:
    engine = two_input_engine()
    model = TensorRtModel(engine, engine_signature(FAKE_TRT, engine), "10.3.0")
    assert model.batchable and model.max_batch_limit == 16 and model.providers == ("TensorRT-10.3.0",)
    assert model.platform == "tensorrt_plan" and len(engine.contexts) == 1
    assert engine_batch_limit(BatchPolicy(max_batch_size=64), model).max_batch_size == 16
    assert engine_batch_limit(BatchPolicy(max_batch_size=8), model).max_batch_size == 8
    assert engine_batch_limit(BatchPolicy(max_batch_size=64), object()).max_batch_size == 64  # ONNX: no cap
    tokens = model.inputs[1]
    assert model.warm_up_shape(tokens, 16, 16) == (16, 2), "dynamic non-batch dims at the profile minimum"
    assert model.warm_up_shape(tokens, 1, 0) == (1, 2)
    model.close()
    with pytest.raises(RuntimeError, match="closed"):
        model.run({})


def test_unbatchable_engine_model_with_fake_engine() -> None:
    engine = FakeEngine({"x": FakeTensor("INPUT", "FLOAT", (2, 4)), "y": FakeTensor("OUTPUT", "FLOAT", (2, 3))})
    model = TensorRtModel(engine, engine_signature(FAKE_TRT, engine), "11.0.0")
    assert not model.batchable and model.max_batch_limit == 0
    assert model.warm_up_shape(model.inputs[0], 1, 0) == (2, 4), "static shapes as declared"


# ---- selection by artifact, and refusal on this replica -------------------------------------------------

async def test_directory_source_finds_plans_and_prefers_onnx(tmp_path: Path) -> None:
    (tmp_path / "net" / "1").mkdir(parents=True)
    (tmp_path / "net" / "1" / "model.plan").write_bytes(b"plan")
    (tmp_path / "net" / "2").mkdir()
    (tmp_path / "net" / "2" / "model.plan").write_bytes(b"plan")
    (tmp_path / "net" / "2" / "model.onnx").write_bytes(b"onnx")
    source = DirectoryModelSource(tmp_path)
    assert await source.available() == {"net": ["1", "2"]}
    assert (await source.fetch("net", "1")).path.name == "model.plan"
    assert (await source.fetch("net", "2")).path.name == "model.onnx"


@pytest.mark.skipif(CAPABILITY.available, reason="this replica can run TensorRT")
def test_opening_a_plan_names_what_is_missing(tmp_path: Path) -> None:
    plan = tmp_path / "model.plan"
    plan.write_bytes(b"a plan")
    with pytest.raises(ModelLoadError) as refused:
        open_model(plan, BackendOptions(target="gpu-t4"))
    assert refused.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert str(refused.value) == f"model.plan: this replica cannot serve TensorRT plans: {CAPABILITY.reason}"


async def test_plan_load_is_refused_and_the_old_version_keeps_serving(serve, model_dir) -> None:
    running = await serve(models=("mlp:1",))
    plan = model_dir / "mlp" / "3" / "model.plan"
    plan.parent.mkdir()
    plan.write_bytes(b"not a plan for this replica")
    load = pb.RepositoryModelLoadRequest(model_name="mlp")
    load.parameters["version"].int64_param = 3
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await running.stub.RepositoryModelLoad(load, timeout=30)
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    expected = (f"this replica cannot serve TensorRT plans: {CAPABILITY.reason}" if not CAPABILITY.available
                else "cannot deserialize model.plan")
    assert expected in refused.value.details()
    assert running.repository.current_version("mlp") == "1"
    response = await running.stub.ModelInfer(infer_request("mlp", x=rows(7, 2)), timeout=30)
    assert response.model_version == "1" and response_arrays(response)["logits"].shape == (2, 10)
    index = await running.stub.RepositoryIndex(pb.RepositoryIndexRequest(), timeout=30)
    failed = [m for m in index.models if m.name == "mlp" and m.version == "3"]
    assert failed and failed[0].state == "UNAVAILABLE" and expected in failed[0].reason


@pytest.mark.skipif(CAPABILITY.available, reason="this replica can run TensorRT")
async def test_registry_plan_is_refused_before_download(tmp_path: Path) -> None:
    cache = ArtifactCache(tmp_path / "cache")
    source = RegistryModelSource(SimpleNamespace(), cache, "gpu-t4", {"net": "production"})  # no RPC is made
    plan = ServingArtifact("a" * 64, 1024, common_pb2.TENSORRT_PLAN)
    with pytest.raises(NotServable) as refused:
        await source.download("net", 4, plan)
    assert refused.value.version == "4"
    assert f"cannot serve TensorRT plans: {CAPABILITY.reason}; not servable here" in str(refused.value)
    assert not (tmp_path / "cache").exists(), "nothing was downloaded"


async def test_cache_names_plans_model_plan(tmp_path: Path) -> None:
    import hashlib

    content = b"serialized engine bytes"
    digest = hashlib.sha256(content).hexdigest()

    async def download():  # noqa: ANN202
        yield content

    cache = ArtifactCache(tmp_path)
    path = await cache.obtain(digest, download, len(content), "model.plan")
    assert path == tmp_path / "sha256" / digest / "model.plan" and path.read_bytes() == content
    assert cache.path_for(digest).name == "model.onnx", "ONNX artifacts keep their name"


# ---- the real thing, where it exists --------------------------------------------------------------------

@pytest.mark.skipif(not CAPABILITY.available,
                    reason="needs TensorRT and a CUDA GPU: native engines have not run in CI")
def test_real_tensorrt_plan_round_trip(tmp_path: Path) -> None:
    onnx_path = build_mlp(tmp_path / "model.onnx", seed=1)
    plan = tmp_path / "model.plan"
    plan.write_bytes(_build_plan(CAPABILITY.module, onnx_path, max_batch=8))
    model = open_model(plan, BackendOptions(target="gpu"))
    assert isinstance(model, TensorRtModel) and model.batchable and model.max_batch_limit == 8
    model.warm_up(8)
    x = rows(11, 5)
    got = model.run({"x": x})
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    expected = session.run([s.name for s in model.outputs], {"x": x})
    for spec, array, want in zip(model.outputs, got, expected):
        np.testing.assert_allclose(array, want, rtol=1e-2, atol=1e-2, err_msg=spec.name)
    model.close()


def _build_plan(trt, onnx_path: Path, max_batch: int) -> bytes:  # noqa: ANN001
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    assert parser.parse(onnx_path.read_bytes()), [str(parser.get_error(i)) for i in range(parser.num_errors)]
    config = builder.create_builder_config()
    profile = builder.create_optimization_profile()
    profile.set_shape("x", (1, 64), (max_batch, 64), (max_batch, 64))
    config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    assert serialized is not None
    return bytes(serialized)
