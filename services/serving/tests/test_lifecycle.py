"""Model versions: atomic swap under load with zero failures, failed loads that change nothing, release."""

from __future__ import annotations

import asyncio
import hashlib

import grpc
import pytest
from serving_support import assert_outputs_match, infer_request, response_arrays, rows

from inference import grpc_service_pb2 as pb
from splitstack_serving.backend import ModelLoadError

CLIENTS = 8
REQUESTS_PER_SIDE = 25  # each client keeps going until it made this many on each version


async def test_swap_under_concurrent_load_fails_no_request(serve, oracle, monkeypatch) -> None:
    running = await serve(models=("mlp:1",), max_queue_delay_us=2000)
    old = running.repository.resolve("mlp")
    in_flight_at_swap: list[int] = []
    open_version, install = running.repository._open, running.repository._install

    async def open_while_busy(local, config):  # noqa: ANN001, ANN202
        """Finish opening only while requests wait in the old version's queue (the swap follows at once)."""
        loaded = await open_version(local, config)
        while old.batcher.pending == 0:
            await asyncio.sleep(0.0002)
        return loaded

    def observed_install(loaded, keep_previous):  # noqa: ANN001, ANN202
        in_flight_at_swap.append(old.in_flight)
        return install(loaded, keep_previous)

    monkeypatch.setattr(running.repository, "_open", open_while_busy)
    monkeypatch.setattr(running.repository, "_install", observed_install)
    warmed_up = asyncio.Event()
    on_old = [0] * CLIENTS
    inputs = [rows(5000 + i, 1 + i % 3) for i in range(CLIENTS)]
    expected = {v: [oracle.run("mlp", v, x=x) for x in inputs] for v in ("1", "2")}

    async def client(i: int) -> list[str]:
        versions: list[str] = []
        while versions.count("2") < REQUESTS_PER_SIDE:
            response = await running.stub.ModelInfer(infer_request("mlp", x=inputs[i]), timeout=30)
            assert_outputs_match(response_arrays(response), expected[response.model_version][i])
            versions.append(response.model_version)
            on_old[i] += response.model_version == "1"
            if min(on_old) >= REQUESTS_PER_SIDE:
                warmed_up.set()
        return versions

    clients = [asyncio.ensure_future(client(i)) for i in range(CLIENTS)]
    async with asyncio.timeout(60):
        await warmed_up.wait()
        new = await running.repository.load("mlp", "2")
        histories = await asyncio.gather(*clients)  # any failed request raises here
    for versions in histories:
        switch = versions.index("2")
        assert set(versions[:switch]) == {"1"} and set(versions[switch:]) == {"2"}, "switched exactly once"
    assert in_flight_at_swap[0] > 0, "the swap happened with requests in flight on the old version"
    assert running.repository.resolve("mlp") is new
    assert running.repository.loaded_versions("mlp") == ["2"]
    assert old.retired and old.in_flight == 0 and old.batcher.pending == 0
    with pytest.raises(RuntimeError, match="closed"):
        old.model.run({"x": inputs[0]})


async def test_failed_load_keeps_serving_the_previous_version(serve, oracle, model_dir) -> None:
    running = await serve(models=("mlp:1",))
    broken = model_dir / "mlp" / "3" / "model.onnx"
    broken.parent.mkdir()
    broken.write_bytes(b"this is not an onnx model")
    load = pb.RepositoryModelLoadRequest(model_name="mlp")
    load.parameters["version"].int64_param = 3
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await running.stub.RepositoryModelLoad(load)
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "onnxruntime cannot load" in caught.value.details()
    x = rows(6, 2)
    response = await running.stub.ModelInfer(infer_request("mlp", x=x))
    assert response.model_version == "1"
    assert_outputs_match(response_arrays(response), oracle.run("mlp", "1", x=x))
    index = (await running.stub.RepositoryIndex(pb.RepositoryIndexRequest())).models
    states = {(m.name, m.version): (m.state, m.reason) for m in index}
    assert states[("mlp", "1")] == ("READY", "")
    assert states[("mlp", "3")][0] == "UNAVAILABLE" and "cannot load" in states[("mlp", "3")][1]


async def test_digest_mismatch_refuses_the_artifact(serve, model_dir) -> None:
    running = await serve(models=("mlp:1",))
    artifact = model_dir / "mlp" / "2" / "model.onnx"
    (artifact.parent / "model.onnx.sha256").write_text("0" * 64 + "  model.onnx\n")
    with pytest.raises(ModelLoadError, match="expected 0000"):
        await running.repository.load("mlp", "2")
    assert running.repository.resolve("mlp").version == "1"
    good = hashlib.sha256(artifact.read_bytes()).hexdigest()
    (artifact.parent / "model.onnx.sha256").write_text(good + "\n")
    loaded = await running.repository.load("mlp", "2")
    assert loaded.sha256 == good and running.repository.resolve("mlp") is loaded


async def test_unloading_the_current_version_falls_back_to_the_highest_left(serve, oracle) -> None:
    running = await serve(models=("mlp:1",))
    await running.repository.load("mlp", "2", keep_previous=True)
    unload = pb.RepositoryModelUnloadRequest(model_name="mlp")
    unload.parameters["version"].string_param = "2"
    await running.stub.RepositoryModelUnload(unload)
    assert running.repository.loaded_versions("mlp") == ["1"]
    x = rows(8, 1)
    response = await running.stub.ModelInfer(infer_request("mlp", x=x))
    assert response.model_version == "1"
    assert_outputs_match(response_arrays(response), oracle.run("mlp", "1", x=x))
    assert not (await running.stub.ModelReady(pb.ModelReadyRequest(name="mlp", version="2"))).ready
