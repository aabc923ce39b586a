"""Bad requests get the stated status and a message naming the tensor; the server keeps serving."""

from __future__ import annotations

import json

import grpc
import numpy as np
import pytest
from serving_support import (assert_outputs_match, build_flex, build_narrow, infer_request, response_arrays,
                             rows)

from inference import grpc_service_pb2 as pb


def _x(count: int = 1) -> np.ndarray:
    return rows(7, count)


def _pair_inputs(count: int = 2) -> dict[str, np.ndarray]:
    return {"ids": np.arange(count * 4, dtype=np.int64).reshape(count, 4),
            "scale": np.full((count, 1), 0.5, np.float32)}


def _wrong_dtype() -> pb.ModelInferRequest:
    return infer_request("mlp", x=_x().astype(np.float64))


def _wrong_rank() -> pb.ModelInferRequest:
    return infer_request("mlp", x=_x().reshape(1, 64, 1))


def _wrong_dim() -> pb.ModelInferRequest:
    return infer_request("mlp", x=rows(1, 1)[:, :63].copy())


def _bytes_short() -> pb.ModelInferRequest:
    request = infer_request("mlp", x=_x(1))
    request.inputs[0].shape[:] = [2, 64]
    return request


def _missing_input() -> pb.ModelInferRequest:
    return infer_request("pair", ids=_pair_inputs()["ids"])


def _extra_input() -> pb.ModelInferRequest:
    return infer_request("mlp", x=_x(), y=_x())


def _batch_over_max() -> pb.ModelInferRequest:
    return infer_request("mlp", x=_x(9))


def _batch_mismatch() -> pb.ModelInferRequest:
    inputs = _pair_inputs(2)
    return infer_request("pair", ids=inputs["ids"], scale=inputs["scale"][:1])


def _raw_count() -> pb.ModelInferRequest:
    request = infer_request("mlp", x=_x())
    request.raw_input_contents.append(b"\0" * 256)
    return request


def _typed_count() -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="mlp")
    request.inputs.add(name="x", datatype="FP32", shape=[1, 64]).contents.fp32_contents.extend([0.5] * 63)
    return request


def _unknown_datatype() -> pb.ModelInferRequest:
    request = infer_request("mlp", x=_x())
    request.inputs[0].datatype = "FLOAT"
    return request


def _unknown_output() -> pb.ModelInferRequest:
    return infer_request("mlp", outputs=("probabilities",), x=_x())


BAD_INPUTS = {
    "wrong datatype": (_wrong_dtype, ["'x'", "expected datatype FP32", "got FP64"]),
    "wrong rank": (_wrong_rank, ["'x'", "expected shape [-1, 64]", "got [1, 64, 1]"]),
    "wrong dim": (_wrong_dim, ["'x'", "expected shape [-1, 64]", "got [1, 63]"]),
    "bytes vs shape": (_bytes_short, ["'x'", "needs 512 bytes", "got 256 bytes"]),
    "missing input": (_missing_input, ["missing input 'scale'", "expects: ids, scale"]),
    "extra input": (_extra_input, ["unexpected input 'y'", "expects: x"]),
    "batch over max": (_batch_over_max, ["'x'", "batch size 9 exceeds max_batch_size 8"]),
    "batch mismatch": (_batch_mismatch, ["'scale'", "batch size 1 differs", "'ids' batch size 2"]),
    "raw buffer count": (_raw_count, ["2 raw_input_contents for 1 inputs"]),
    "typed element count": (_typed_count, ["'x'", "needs 64 elements", "got 63 in contents.fp32_contents"]),
    "unknown datatype": (_unknown_datatype, ["'x'", "datatype 'FLOAT' is not supported"]),
    "unknown output": (_unknown_output, ["requested output 'probabilities'", "outputs: logits, hidden"]),
}


async def test_every_bad_input_is_invalid_argument_naming_the_tensor(serve, oracle) -> None:
    running = await serve(models=("mlp", "pair"), max_batch_size=8)
    for case, (build, fragments) in BAD_INPUTS.items():
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await running.stub.ModelInfer(build(), timeout=10)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, f"{case}: {caught.value.code()}"
        for fragment in fragments:
            assert fragment in caught.value.details(), f"{case}: {fragment!r} not in {caught.value.details()!r}"
    # Nothing stalled or broke: a good request still gets the right answer.
    response = await running.stub.ModelInfer(infer_request("mlp", x=_x(2)), timeout=10)
    assert_outputs_match(response_arrays(response), oracle.run("mlp", "2", x=_x(2)))
    stats = (await running.stub.ModelStatistics(pb.ModelStatisticsRequest(name="mlp"))).model_stats[0]
    assert stats.inference_stats.success.count == 1
    assert stats.inference_count == 2, "no rejected request reached the model"


async def test_unknown_model_or_version_is_not_found(serve) -> None:
    running = await serve(models=("mlp:1",))
    cases = [("nope", "", "model 'nope' is not loaded"), ("mlp", "7", "version '7' is not loaded (loaded: 1)")]
    for name, version, fragment in cases:
        for call in (running.stub.ModelInfer(infer_request(name, version, x=_x())),
                     running.stub.ModelMetadata(pb.ModelMetadataRequest(name=name, version=version)),
                     running.stub.ModelConfig(pb.ModelConfigRequest(name=name, version=version)),
                     running.stub.ModelStatistics(pb.ModelStatisticsRequest(name=name, version=version))):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await call
            assert caught.value.code() == grpc.StatusCode.NOT_FOUND
            assert fragment in caught.value.details()
        assert not (await running.stub.ModelReady(pb.ModelReadyRequest(name=name, version=version))).ready


async def test_oversized_message_is_refused_with_the_limit(serve, oracle) -> None:
    limit = 1024 * 1024
    running = await serve(models=("mlp",), max_message_bytes=limit, max_batch_size=8192)
    big = rows(3, 8192)  # 2 MiB of FP32
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await running.stub.ModelInfer(infer_request("mlp", x=big), timeout=10)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "larger than max" in caught.value.details() and str(limit) in caught.value.details()
    response = await running.stub.ModelInfer(infer_request("mlp", x=big[:4]), timeout=10)
    assert_outputs_match(response_arrays(response), oracle.run("mlp", "2", x=big[:4]))


async def test_default_message_limit_is_well_above_4_mib(serve, oracle) -> None:
    running = await serve(models=("mlp",), max_batch_size=32768)
    big = rows(4, 32768)  # 8 MiB in, 1.25 MiB + 32 MiB out
    response = await running.stub.ModelInfer(infer_request("mlp", outputs=("logits",), x=big), timeout=60)
    np.testing.assert_allclose(response_arrays(response)["logits"], oracle.run("mlp", "2", x=big)["logits"],
                               rtol=1e-5, atol=1e-5)


# ---- edge shapes, datatypes and parameters: INVALID_ARGUMENT naming the input, never INTERNAL ----------

MAX_DETAILS = 1000  # characters: a message names what was wrong, it never echoes a huge input back


def _shaped(model: str, shape: list[int], raw: bytes, name: str = "x", datatype: str = "FP32") -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=model)
    request.inputs.add(name=name, datatype=datatype, shape=shape)
    request.raw_input_contents.append(raw)
    return request


def _typed(model: str, shape: list[int], **contents: list) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=model)
    tensor = request.inputs.add(name="x", datatype="FP32", shape=shape)
    for field, values in contents.items():
        getattr(tensor.contents, field).extend(values)
    return request


def _narrow(small: list[int], byte: list[int]) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="narrow")
    request.inputs.add(name="small", datatype="INT8", shape=[1, 2]).contents.int_contents.extend(small)
    request.inputs.add(name="byte", datatype="UINT8", shape=[1, 2]).contents.uint_contents.extend(byte)
    return request


def _raw_and_typed() -> pb.ModelInferRequest:
    request = infer_request("mlp", x=_x())
    request.inputs[0].contents.fp32_contents.extend([0.5] * 64)
    return request


def _huge_input_name() -> pb.ModelInferRequest:
    inputs = _pair_inputs(1)
    request = infer_request("pair", ids=inputs["ids"], scale=inputs["scale"])
    request.inputs.add(name="y" * 100_000, datatype="FP32", shape=[1, 1])
    request.raw_input_contents.append(b"\0" * 4)
    return request


def _timeout_as_text() -> pb.ModelInferRequest:
    request = infer_request("mlp", x=_x())
    request.parameters["timeout"].string_param = "soon"
    return request


def _shared_memory() -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="mlp")
    request.inputs.add(name="x", datatype="FP32", shape=[1, 64]).parameters["shared_memory_region"].string_param = "r"
    return request


EDGE_CASES = {
    # The two shapes of the report: numpy refused to reshape them and the client got INTERNAL (ValueError).
    "[0, 2^62]": (lambda: _shaped("mlp", [0, 2**62], b""), ["'x'", "expected shape [-1, 64]",
                                                             "got [0, 4611686018427387904]"]),
    "70 dims": (lambda: _shaped("mlp", [1] * 70, b"\0" * 4), ["'x'", "expected shape [-1, 64]", "(70 dims)"]),
    "70 dims, dynamic model": (lambda: _shaped("flex", [1] * 70, b"\0" * 4), ["'x'", "expected shape [-1, -1]"]),
    "zero rows": (lambda: _shaped("mlp", [0, 64], b""), ["'x'", "shape [0, 64] has no elements"]),
    "zero width": (lambda: _shaped("flex", [1, 0], b""), ["'x'", "shape [1, 0] has no elements"]),
    "[0, 2^62] dynamic model": (lambda: _shaped("flex", [0, 2**62], b""), ["'x'", "has no elements"]),
    "negative batch": (lambda: _shaped("mlp", [-1, 64], b"\0" * 256), ["'x'", "has a negative dimension"]),
    "negative width": (lambda: _shaped("flex", [1, -4], b""), ["'x'", "has a negative dimension"]),
    "2^62 wide": (lambda: _shaped("flex", [1, 2**62], b"\0" * 4), ["'x'", "needs 18446744073709551616 bytes",
                                                                     "got 4 bytes"]),
    "dims product past int64": (lambda: _shaped("flex", [2**40, 2**40], b"\0" * 4),
                                ["'x'", "batch size 1099511627776 exceeds max_batch_size 8"]),
    "max int64 dims": (lambda: _shaped("flex", [1, 2**63 - 1], b"\0" * 4), ["'x'", "needs", "got 4 bytes"]),
    "typed, 2^62 elements": (lambda: _typed("flex", [1, 2**62], fp32_contents=[1.0]),
                             ["'x'", "needs 4611686018427387904 elements, got 1 in contents.fp32_contents"]),
    "typed, zero elements": (lambda: _typed("flex", [1, 0]), ["'x'", "has no elements"]),
    "INT8 out of range": (lambda: _narrow([200, 1], [1, 2]), ["'small'", "holds 200", "INT8 [-128, 127]"]),
    "UINT8 out of range": (lambda: _narrow([1, 2], [3, 256]), ["'byte'", "holds 256", "UINT8 [0, 255]"]),
    "raw and typed at once": (_raw_and_typed, ["'x'", "has typed contents while the request has raw_input_contents"]),
    "BYTES": (lambda: _shaped("mlp", [1, 64], b"\0" * 256, datatype="BYTES"),
              ["'x'", "datatype 'BYTES' is not supported"]),
    "BF16": (lambda: _shaped("mlp", [1, 64], b"\0" * 128, datatype="BF16"), ["'x'", "datatype 'BF16' is not supported"]),
    "output requested twice": (lambda: infer_request("mlp", outputs=("logits", "logits"), x=_x()),
                               ["output 'logits' is requested more than once"]),
    "huge input name": (_huge_input_name, ["unexpected input 'yyyy", "(100000 characters)", "model 'pair'"]),
    "timeout as text": (_timeout_as_text, ["parameter 'timeout' must be an int64"]),
    "shared memory": (_shared_memory, ["'x'", "names a shared memory region"]),
}


@pytest.fixture
def edge_model_dir(model_dir):  # noqa: ANN001, ANN201
    """The test models plus `flex` (dynamic width) and `narrow` (INT8 and UINT8 inputs)."""
    build_flex(model_dir / "flex" / "1" / "model.onnx")
    build_narrow(model_dir / "narrow" / "1" / "model.onnx")
    return model_dir


async def test_edge_shapes_datatypes_and_parameters_are_invalid_argument(edge_model_dir, serve, oracle) -> None:
    running = await serve(models=("mlp", "pair", "flex", "narrow"), max_batch_size=8)
    for case, (build, fragments) in EDGE_CASES.items():
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await running.stub.ModelInfer(build(), timeout=10)
        details = caught.value.details()
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, f"{case}: {caught.value.code()} {details}"
        for fragment in fragments:
            assert fragment in details, f"{case}: {fragment!r} not in {details!r}"
        assert len(details) < MAX_DETAILS, f"{case}: a {len(details)}-character message"
    # The same requests in one stream: each answered in-stream with the same message, none as internal.
    answers = [a async for a in running.stub.ModelStreamInfer(iter([build() for build, _ in EDGE_CASES.values()]))]
    assert len(answers) == len(EDGE_CASES)
    for answer in answers:
        assert answer.error_message and "internal" not in answer.error_message, answer.error_message
    # In range, the narrow model and a huge timeout work; the server still answers correctly.
    summed = response_arrays(await running.stub.ModelInfer(_narrow([-128, 127], [255, 0]), timeout=10))["sum"]
    np.testing.assert_array_equal(summed, [[127.0, 127.0]])
    patient = infer_request("mlp", x=_x(2))
    patient.parameters["timeout"].uint64_param = 2**64 - 1
    assert_outputs_match(response_arrays(await running.stub.ModelInfer(patient, timeout=10)),
                         oracle.run("mlp", "2", x=_x(2)))


async def test_names_a_client_sends_are_cut_in_messages(serve) -> None:
    running = await serve(models=("mlp",))
    huge = "m" * 200_000
    calls = {"ModelInfer": running.stub.ModelInfer(infer_request(huge, x=_x())),
             "ModelMetadata": running.stub.ModelMetadata(pb.ModelMetadataRequest(name="mlp", version=huge)),
             "ModelConfig": running.stub.ModelConfig(pb.ModelConfigRequest(name=huge)),
             "ModelStatistics": running.stub.ModelStatistics(pb.ModelStatisticsRequest(name=huge)),
             "RepositoryModelUnload": running.stub.RepositoryModelUnload(
                 pb.RepositoryModelUnloadRequest(model_name="mlp", parameters={"version": pb.ModelRepositoryParameter(
                     string_param=huge)}))}
    for rpc, call in calls.items():
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND, f"{rpc}: {caught.value.code()}"
        assert "(200000 characters)" in caught.value.details() and len(caught.value.details()) < MAX_DETAILS, rpc


async def test_outputs_larger_than_a_message_are_resource_exhausted(serve, oracle) -> None:
    limit = 1024 * 1024
    running = await serve(models=("mlp",), max_message_bytes=limit, max_batch_size=1024)
    many = rows(5, 1024)  # 256 KiB in; 1 MiB of hidden + 40 KiB of logits out
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await running.stub.ModelInfer(infer_request("mlp", x=many), timeout=30)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, caught.value.details()
    assert f"more than a message may carry ({limit})" in caught.value.details()
    response = await running.stub.ModelInfer(infer_request("mlp", outputs=("logits",), x=many), timeout=30)
    np.testing.assert_allclose(response_arrays(response)["logits"], oracle.run("mlp", "2", x=many)["logits"],
                               rtol=1e-5, atol=1e-5)


# ---- RepositoryModelLoad: overrides within the operator's caps, every parameter checked ----------------

def _param(**value: object) -> pb.ModelRepositoryParameter:
    return pb.ModelRepositoryParameter(**value)


def _config(**config: object) -> dict[str, pb.ModelRepositoryParameter]:
    return {"config": _param(string_param=json.dumps(config))}


LOAD_CASES = {
    # The report: any max_batch_size was accepted, and warm-up ran a batch of that many rows.
    "batch over cap": (_config(max_batch_size=100_000),
                       ["max_batch_size is 100000", "at most 16", "SPLITSTACK_SERVING_LOAD_MAX_BATCH_SIZE"]),
    "negative batch": (_config(max_batch_size=-1), ["max_batch_size is -1", "must not be negative"]),
    "delay over cap": (_config(dynamic_batching={"max_queue_delay_microseconds": 10**12}),
                       ["max_queue_delay_microseconds is 1000000000000", "at most 1000000"]),
    "queue over cap": (_config(dynamic_batching={"default_queue_policy": {"max_queue_size": 10**9}}),
                       ["max_queue_size is 1000000000", "at most 8192"]),
    "instances over cap": (_config(instance_group=[{"count": 1}, {"count": 1000}]),
                           ["instance_group[1].count is 1000", "at most 8"]),
    "negative instances": (_config(instance_group=[{"count": -2}]), ["instance_group[0].count is -2"]),
    "config nested deeply": ({"config": _param(string_param='{"a": ' * 50_000 + "1" + "}" * 50_000)},
                             ["parameter 'config'"]),
    "config not JSON": ({"config": _param(string_param="max_batch_size: 4")}, ["not a ModelConfig in JSON"]),
    "config as a number": ({"config": _param(int64_param=4)}, ["parameter 'config' must be a string"]),
    "keep_previous as text": ({"keep_previous": _param(string_param="yes")}, ["'keep_previous' must be a bool"]),
    "negative version": ({"version": _param(int64_param=-3)}, ["'version' must be a positive integer, got -3"]),
    "version as bytes": ({"version": _param(bool_param=True)}, ["'version' must be a string or int64"]),
    "version not a number": ({"version": _param(string_param="1; rm -rf /")}, ["not a positive decimal integer"]),
    "many unknown parameters": ({f"p{i}": _param(bool_param=True) for i in range(1000)},
                                ["unknown parameter(s)", "and 995 more"]),
}


async def test_load_overrides_past_the_caps_and_bad_load_parameters_are_invalid_argument(serve, oracle) -> None:
    running = await serve(models=("mlp",), max_batch_size=8, load_max_batch_size=16)
    stub = running.stub
    for case, (parameters, fragments) in LOAD_CASES.items():
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="mlp", parameters=parameters),
                                           timeout=30)
        details = caught.value.details()
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, f"{case}: {caught.value.code()} {details}"
        for fragment in fragments:
            assert fragment in details, f"{case}: {fragment!r} not in {details!r}"
        assert len(details) < MAX_DETAILS, f"{case}: a {len(details)}-character message"
    config = (await stub.ModelConfig(pb.ModelConfigRequest(name="mlp"))).config
    assert config.max_batch_size == 8, "no refused override was loaded (nor warmed up)"
    await stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="mlp", parameters=_config(
        max_batch_size=16, dynamic_batching={"max_queue_delay_microseconds": 100}, instance_group=[{"count": 2}])),
        timeout=30)
    config = (await stub.ModelConfig(pb.ModelConfigRequest(name="mlp"))).config
    assert (config.max_batch_size, config.instance_group[0].count) == (16, 2), "an override at the cap is honoured"
    response = await stub.ModelInfer(infer_request("mlp", x=_x(16)), timeout=10)
    assert_outputs_match(response_arrays(response), oracle.run("mlp", "2", x=_x(16)))
