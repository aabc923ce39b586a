"""The protocol through our own stubs: metadata, config, infer (raw and typed), streams, repository RPCs."""

from __future__ import annotations

import asyncio
import hashlib
import json

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from serving_support import assert_outputs_match, infer_request, response_arrays, rows

from inference import grpc_service_pb2 as pb
from inference import grpc_service_pb2_grpc as pb_grpc
from inference import model_config_pb2 as config_pb
from splitstack_serving.config import ServingSettings
from splitstack_serving.main import build_service
from splitstack_serving.servicer import SERVICE_NAME


def _sha256(path) -> str:  # noqa: ANN001
    return hashlib.sha256(path.read_bytes()).hexdigest()


async def test_server_and_model_metadata(serve) -> None:
    running = await serve(models=("mlp", "pair"))
    stub = running.stub
    assert (await stub.ServerLive(pb.ServerLiveRequest())).live
    assert (await stub.ServerReady(pb.ServerReadyRequest())).ready
    server = await stub.ServerMetadata(pb.ServerMetadataRequest())
    assert server.name == "splitstack-serving" and server.version
    assert {"model_repository", "model_configuration", "statistics"} <= set(server.extensions)
    metadata = await stub.ModelMetadata(pb.ModelMetadataRequest(name="pair"))
    assert metadata.platform == "onnxruntime_onnx" and list(metadata.versions) == ["1"]
    assert [(t.name, t.datatype, list(t.shape)) for t in metadata.inputs] == [("ids", "INT64", [-1, 4]),
                                                                              ("scale", "FP32", [-1, 1])]
    assert [(t.name, t.datatype, list(t.shape)) for t in metadata.outputs] == [("scaled", "FP32", [-1, 4]),
                                                                               ("total", "INT64", [-1, 1])]


async def test_model_config_reports_batching_and_tensors(serve, model_dir) -> None:
    running = await serve(models=("mlp",), max_batch_size=32, max_queue_delay_us=250, max_queue_size=99)
    config = (await running.stub.ModelConfig(pb.ModelConfigRequest(name="mlp"))).config
    assert config.name == "mlp" and config.platform == "onnxruntime_onnx" and config.max_batch_size == 32
    assert [(i.name, i.data_type, list(i.dims)) for i in config.input] == [("x", config_pb.TYPE_FP32, [64])]
    assert [(o.name, o.data_type, list(o.dims)) for o in config.output] == [
        ("logits", config_pb.TYPE_FP32, [10]), ("hidden", config_pb.TYPE_FP32, [256])]
    assert config.HasField("dynamic_batching")
    assert config.dynamic_batching.max_queue_delay_microseconds == 250
    assert config.dynamic_batching.default_queue_policy.max_queue_size == 99
    assert config.parameters["artifact_sha256"].string_value == _sha256(model_dir / "mlp" / "2" / "model.onnx")


async def test_infer_raw_and_typed_contents_give_the_oracle_results(serve, oracle, model_dir) -> None:
    running = await serve(models=("mlp", "pair"))
    x = rows(11, 3)
    response = await running.stub.ModelInfer(infer_request("mlp", x=x))
    assert response.model_name == "mlp" and response.model_version == "2"
    assert response.parameters["artifact_sha256"].string_param == _sha256(model_dir / "mlp" / "2" / "model.onnx")
    assert [o.name for o in response.outputs] == ["logits", "hidden"]
    assert_outputs_match(response_arrays(response), oracle.run("mlp", "2", x=x))

    ids = np.array([[1, 2, 3, 4], [-5, 6, 7, 1 << 40]], np.int64)
    scale = np.array([[0.5], [2.0]], np.float32)
    typed = pb.ModelInferRequest(model_name="pair", id="typed-1")
    typed.inputs.add(name="ids", datatype="INT64", shape=[2, 4]).contents.int64_contents.extend(ids.ravel().tolist())
    typed.inputs.add(name="scale", datatype="FP32", shape=[2, 1]).contents.fp32_contents.extend(scale.ravel().tolist())
    typed.outputs.add(name="total")
    typed.outputs.add(name="scaled")
    response = await running.stub.ModelInfer(typed)
    assert response.id == "typed-1"
    assert [o.name for o in response.outputs] == ["total", "scaled"], "requested outputs, in request order"
    assert len(response.raw_output_contents) == 2 and not response.outputs[0].HasField("contents")
    assert_outputs_match(response_arrays(response), oracle.run("pair", "1", ids=ids, scale=scale))


async def test_model_version_in_request_is_honoured(serve, oracle) -> None:
    running = await serve(models=("mlp:1",))
    await running.repository.load("mlp", "2", keep_previous=True)
    x = rows(12, 2)
    for asked, served in (("1", "1"), ("2", "2"), ("", "2")):
        response = await running.stub.ModelInfer(infer_request("mlp", asked, x=x))
        assert response.model_version == served
        assert_outputs_match(response_arrays(response), oracle.run("mlp", served, x=x))
    metadata = await running.stub.ModelMetadata(pb.ModelMetadataRequest(name="mlp"))
    assert list(metadata.versions) == ["1", "2"]


async def test_stream_answers_every_request_and_reports_errors_in_stream(serve, oracle) -> None:
    running = await serve(models=("mlp",))
    inputs = {f"r{i}": rows(100 + i, 1 + i % 3) for i in range(12)}

    async def requests():  # noqa: ANN202
        for request_id, x in inputs.items():
            request = infer_request("mlp", x=x)
            request.id = request_id
            yield request
        bad = infer_request("missing", x=rows(1, 1))
        bad.id = "bad"
        yield bad

    answers = [answer async for answer in running.stub.ModelStreamInfer(requests())]
    assert len(answers) == len(inputs) + 1
    by_id = {a.infer_response.id: a for a in answers}
    assert "not loaded" in by_id["bad"].error_message
    for request_id, x in inputs.items():
        assert by_id[request_id].error_message == ""
        assert_outputs_match(response_arrays(by_id[request_id].infer_response), oracle.run("mlp", "2", x=x))


async def test_repository_index_load_and_unload(serve, oracle) -> None:
    running = await serve(models=("mlp",))
    stub = running.stub
    index = {(m.name, m.version): m.state for m in (await stub.RepositoryIndex(pb.RepositoryIndexRequest())).models}
    assert index == {("mlp", "2"): "READY", ("pair", ""): "UNAVAILABLE", ("spare", ""): "UNAVAILABLE",
                     ("fixed", ""): "UNAVAILABLE", ("lookup", ""): "UNAVAILABLE"}
    config = json.dumps({"max_batch_size": 4, "dynamic_batching": {"max_queue_delay_microseconds": 100}})
    load = pb.RepositoryModelLoadRequest(model_name="spare")
    load.parameters["config"].string_param = config
    await stub.RepositoryModelLoad(load)
    assert (await stub.ModelReady(pb.ModelReadyRequest(name="spare"))).ready
    assert (await stub.ModelConfig(pb.ModelConfigRequest(name="spare"))).config.max_batch_size == 4
    x = rows(13, 4)
    response = await stub.ModelInfer(infer_request("spare", x=x))
    assert_outputs_match(response_arrays(response), oracle.run("spare", "1", x=x))
    ready = await stub.RepositoryIndex(pb.RepositoryIndexRequest(ready=True))
    assert sorted((m.name, m.version) for m in ready.models) == [("mlp", "2"), ("spare", "1")]

    await stub.RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name="spare"))
    assert not (await stub.ModelReady(pb.ModelReadyRequest(name="spare"))).ready
    index_models = (await stub.RepositoryIndex(pb.RepositoryIndexRequest())).models
    index = {(m.name, m.version): (m.state, m.reason) for m in index_models}
    assert index[("spare", "")] == ("UNAVAILABLE", "unloaded")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.ModelInfer(infer_request("spare", x=x))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND

    bad = pb.RepositoryModelLoadRequest(model_name="spare")
    bad.parameters["colour"].string_param = "blue"
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.RepositoryModelLoad(bad)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "colour" in caught.value.details()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="absent"))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="../mlp"))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "not a valid name" in caught.value.details()
    names = {m.name for m in (await stub.RepositoryIndex(pb.RepositoryIndexRequest())).models}
    assert names == {"mlp", "pair", "spare", "fixed", "lookup"}, "refused loads leave no trace in the index"


async def test_model_without_batch_dim_is_served_whole(serve, oracle) -> None:
    running = await serve(models=("fixed",))
    config = (await running.stub.ModelConfig(pb.ModelConfigRequest(name="fixed"))).config
    assert config.max_batch_size == 0 and not config.HasField("dynamic_batching")
    assert [list(i.dims) for i in config.input] == [[2, 3]]
    metadata = await running.stub.ModelMetadata(pb.ModelMetadataRequest(name="fixed"))
    assert [list(t.shape) for t in metadata.inputs] == [[2, 3]]
    x = np.array([[1, -2, 3], [-4, 5, -6]], np.float32)
    response = await running.stub.ModelInfer(infer_request("fixed", x=x))
    assert_outputs_match(response_arrays(response), oracle.run("fixed", "1", x=x))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await running.stub.ModelInfer(infer_request("fixed", x=np.zeros((1, 3), np.float32)))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "expected shape [2, 3], got [1, 3]" in caught.value.details()


async def test_ready_only_once_startup_models_are_loaded_and_warmed(model_dir) -> None:
    service = build_service(ServingSettings(model_dir=str(model_dir), models=("mlp", "pair")))
    await service.runtime.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{service.runtime.port}") as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            health = health_pb2_grpc.HealthStub(channel)
            check = health_pb2.HealthCheckRequest(service=SERVICE_NAME)
            assert (await stub.ServerLive(pb.ServerLiveRequest())).live
            assert not (await stub.ServerReady(pb.ServerReadyRequest())).ready
            assert (await health.Check(check)).status == health_pb2.HealthCheckResponse.NOT_SERVING
            await service.load_startup_models()
            assert (await stub.ServerReady(pb.ServerReadyRequest())).ready
            assert (await stub.ModelReady(pb.ModelReadyRequest(name="pair"))).ready
            async with asyncio.timeout(10):
                while (await health.Check(check)).status != health_pb2.HealthCheckResponse.SERVING:
                    await asyncio.sleep(0.01)
    finally:
        await service.runtime.stop()
