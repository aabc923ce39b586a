"""Bad requests get the stated status and a message naming the tensor; the server keeps serving."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from serving_support import assert_outputs_match, infer_request, response_arrays, rows

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
