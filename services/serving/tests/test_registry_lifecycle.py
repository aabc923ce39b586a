"""Registry mode against a real registry and nats-server: aliases resolved at start, promotions
followed on every replica under load with zero failed requests, failed loads that keep the last
good version, alias deletion, idempotent promotions, model.deployed per swap, and readiness (health,
ServerReady and the ready file) only once every followed model is loaded and warmed."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import signal
import subprocess
import time
from collections.abc import Callable
from types import SimpleNamespace

import grpc
import numpy as np
import onnxruntime as ort
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import REGISTRY
from registry_support import stored_events, wait_for_events
from serving_support import assert_outputs_match, infer_request, response_arrays, rows

from inference import grpc_service_pb2 as pb
from inference import grpc_service_pb2_grpc as pb_grpc
from splitstack.chassis.config import ConfigError, load_settings
from splitstack.chassis.testing.servers import find_binary, free_port
from splitstack.contracts.envelope import wrap
from splitstack.events.v1 import events_pb2
from splitstack_serving import backend
from splitstack_serving.config import ServingSettings
from splitstack_serving.lifecycle import FollowedModel, parse_followed
from splitstack_serving.main import build_service

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
INFERENCE_SERVICE = "inference.GRPCInferenceService"
CLIENTS = 8
REQUESTS_PER_SIDE = 25
SETTLE_SECONDS = 1.0  # time for a stray duplicate event to show up before counting


def sha256_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def expected_outputs(onnx: bytes, x: np.ndarray) -> dict[str, np.ndarray]:
    """In-process ONNX Runtime on the registered bytes: the oracle."""
    session = ort.InferenceSession(onnx, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, {"x": x})))


async def wait_until(condition: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        await asyncio.sleep(0.02)


async def health(running, service: str = "") -> int:  # noqa: ANN001
    stub = health_pb2_grpc.HealthStub(running.channel)
    return (await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)).status


async def index_of(running) -> dict[tuple[str, str], tuple[str, str]]:  # noqa: ANN001
    models = (await running.stub.RepositoryIndex(pb.RepositoryIndexRequest(), timeout=10)).models
    return {(m.name, m.version): (m.state, m.reason) for m in models}


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def deployed_subject(model: str) -> str:
    return f"model.deployed.{model}.cpu"


async def test_serves_the_alias_resolved_at_start_and_announces_it(registry, registry_stack, follow, model_name,
                                                                     onnx_models) -> None:
    await registry.create_model(model_name)
    version = await registry.register(model_name, {"cpu": onnx_models[1]})
    await registry.promote(model_name, version)
    running = await follow(models=(model_name,), instance="solo")
    await wait_until(lambda: running.service.core.ready, "serving is ready")

    x = rows(1, 3)
    response = await running.stub.ModelInfer(infer_request(model_name, x=x), timeout=10)
    assert response.model_version == "1"
    assert response.parameters["artifact_sha256"].string_param == sha256_of(onnx_models[1])
    assert_outputs_match(response_arrays(response), expected_outputs(onnx_models[1], x))
    assert (await running.stub.ServerReady(pb.ServerReadyRequest())).ready
    assert await health(running) == SERVING and await health(running, INFERENCE_SERVICE) == SERVING
    cached = running.service.settings.cache_dir + f"/sha256/{sha256_of(onnx_models[1])}/model.onnx"
    assert open(cached, "rb").read() == onnx_models[1]

    [deployed] = await wait_for_events(registry_stack.nats_url, deployed_subject(model_name), 1)
    assert deployed.msg_id == deployed.event.event_id and deployed.event.producer == "serving/solo"
    assert deployed.event.payload == events_pb2.ModelDeployed(
        model=model_name, version=1, target="cpu", artifact_sha256=sha256_of(onnx_models[1]), replica="solo",
        previous_version=0, alias="production")


async def test_promotion_under_load_swaps_once_per_client_with_zero_failures(registry, registry_stack, follow,
                                                                             model_name, onnx_models,
                                                                             monkeypatch) -> None:
    await registry.create_model(model_name)
    for seed in (1, 2):
        await registry.register(model_name, {"cpu": onnx_models[seed]})
    await registry.promote(model_name, 1)
    running = await follow(models=(model_name,), instance="loaded", max_queue_delay_us=2000)
    await wait_until(lambda: running.service.core.ready, "serving is ready")
    old = running.repository.resolve(model_name)
    open_version = running.repository._open
    in_flight_at_swap: list[int] = []

    async def open_while_busy(local, config):  # noqa: ANN001, ANN202
        """Finish opening only while requests wait in the old version's queue (the swap follows at once)."""
        loaded = await open_version(local, config)
        while old.batcher.pending == 0:
            await asyncio.sleep(0.0002)
        return loaded

    async def observe_swap(loaded, previous) -> None:  # noqa: ANN001
        in_flight_at_swap.append(old.in_flight)

    monkeypatch.setattr(running.repository, "_open", open_while_busy)
    running.repository.on_swap(observe_swap)
    inputs = [rows(5000 + i, 1 + i % 3) for i in range(CLIENTS)]
    expected = {v: [expected_outputs(onnx_models[int(v)], x) for x in inputs] for v in ("1", "2")}
    on_old = [0] * CLIENTS
    warmed_up = asyncio.Event()

    async def client(i: int) -> list[str]:
        versions: list[str] = []
        while versions.count("2") < REQUESTS_PER_SIDE:
            response = await running.stub.ModelInfer(infer_request(model_name, x=inputs[i]), timeout=30)
            assert_outputs_match(response_arrays(response), expected[response.model_version][i])
            versions.append(response.model_version)
            on_old[i] += response.model_version == "1"
            if min(on_old) >= REQUESTS_PER_SIDE:
                warmed_up.set()
        return versions

    clients = [asyncio.ensure_future(client(i)) for i in range(CLIENTS)]
    async with asyncio.timeout(60):
        await warmed_up.wait()
        await registry.promote(model_name, 2)
        histories = await asyncio.gather(*clients)  # a single failed request raises here
    for versions in histories:
        switch = versions.index("2")
        assert set(versions[:switch]) == {"1"} and set(versions[switch:]) == {"2"}, "switched exactly once"
    assert in_flight_at_swap and in_flight_at_swap[0] > 0, "the swap happened with requests in flight on version 1"
    assert running.repository.loaded_versions(model_name) == ["2"]
    await wait_until(lambda: old.retired and old.in_flight == 0, "the old version is released")

    await wait_for_events(registry_stack.nats_url, deployed_subject(model_name), 2)
    await asyncio.sleep(SETTLE_SECONDS)
    events = await stored_events(registry_stack.nats_url, deployed_subject(model_name))
    assert [(e.event.payload.version, e.event.payload.previous_version, e.event.payload.alias) for e in events] == \
        [(1, 0, "production"), (2, 1, "production")]
    assert events[1].event.payload.artifact_sha256 == sha256_of(onnx_models[2])
    assert len({e.msg_id for e in events}) == 2


async def test_a_repeated_promotion_reloads_nothing(registry, registry_stack, follow, model_name, onnx_models) -> None:
    await registry.create_model(model_name)
    await registry.register(model_name, {"cpu": onnx_models[1]})
    await registry.promote(model_name, 1)
    running = await follow(models=(model_name,), instance="repeat")
    await wait_until(lambda: running.service.core.ready, "serving is ready")
    serving = running.repository.resolve(model_name)
    [promoted] = await wait_for_events(registry_stack.nats_url, f"model.promoted.{model_name}.production", 1)
    handled = metric("splitstack_bus_handled_total", consumer="serving-promotions")
    loads = metric("splitstack_serving_model_loads_total", model=model_name, outcome="ok")

    # At-least-once delivery: the same promotion again (another copy on the stream), and an alias
    # move to the version already served.
    copy = wrap(promoted.event.payload, producer="registry/test", event_id=f"{promoted.msg_id}-again")
    await running.service.bus.publish_raw(promoted.subject, copy.SerializeToString(), event_id=copy.event_id)
    await registry.promote(model_name, 1)
    await wait_until(lambda: metric("splitstack_bus_handled_total", consumer="serving-promotions") >= handled + 1,
                     "the repeated promotion is handled")
    assert running.repository.resolve(model_name) is serving, "the version serving was not reloaded"
    assert metric("splitstack_serving_model_loads_total", model=model_name, outcome="ok") == loads
    await asyncio.sleep(SETTLE_SECONDS)
    assert len(await stored_events(registry_stack.nats_url, deployed_subject(model_name))) == 1


async def test_a_failed_load_keeps_the_last_good_version_and_is_reported(registry, registry_stack, follow,
                                                                         model_name, onnx_models) -> None:
    await registry.create_model(model_name)
    await registry.register(model_name, {"cpu": onnx_models[1]})
    corrupt = await registry.register(model_name, {"cpu": b"this is not an onnx model"})
    elsewhere = await registry.register(model_name, {"gpu-t4": onnx_models[2]})
    await registry.promote(model_name, 1)
    running = await follow(models=(model_name,), instance="failing")
    await wait_until(lambda: running.service.core.ready, "serving is ready")
    x = rows(2, 2)

    await registry.promote(model_name, corrupt)
    await wait_until(lambda: metric("splitstack_serving_model_loads_total", model=model_name, outcome="failed") == 1,
                     "the corrupt version's load failed")
    state, reason = (await index_of(running))[(model_name, str(corrupt))]
    assert state == "UNAVAILABLE" and "cannot load" in reason
    response = await running.stub.ModelInfer(infer_request(model_name, x=x), timeout=10)
    assert response.model_version == "1"
    assert_outputs_match(response_arrays(response), expected_outputs(onnx_models[1], x))

    await registry.promote(model_name, elsewhere)  # a serving choice for another target only
    await wait_until(lambda: metric("splitstack_serving_model_loads_total", model=model_name, outcome="failed") == 2,
                     "the version without a cpu serving choice is refused")
    state, reason = (await index_of(running))[(model_name, str(elsewhere))]
    assert state == "UNAVAILABLE" and "no serving choice for target 'cpu'" in reason and "gpu-t4" in reason
    assert running.repository.current_version(model_name) == "1"
    load = pb.RepositoryModelLoadRequest(model_name=model_name)
    load.parameters["version"].int64_param = elsewhere
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await running.stub.RepositoryModelLoad(load, timeout=10)
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "not servable here" in refused.value.details()

    good = await registry.register(model_name, {"cpu": onnx_models[3]})
    await registry.promote(model_name, good)
    await wait_until(lambda: running.repository.current_version(model_name) == str(good), "the next good version")
    assert (model_name, str(good)) in await index_of(running)
    deployed = await wait_for_events(registry_stack.nats_url, deployed_subject(model_name), 2)
    assert [e.event.payload.version for e in deployed] == [1, good], "no deployment announced for failed loads"


async def test_every_replica_follows_a_promotion(registry, registry_stack, follow, model_name, onnx_models) -> None:
    await registry.create_model(model_name)
    await registry.register(model_name, {"cpu": onnx_models[1]})
    await registry.register(model_name, {"cpu": onnx_models[2]})
    await registry.promote(model_name, 1)
    replicas = [await follow(models=(model_name,), instance=name) for name in ("replica-a", "replica-b")]
    await wait_until(lambda: all(r.service.core.ready for r in replicas), "both replicas are ready")
    await registry.promote(model_name, 2)
    await wait_until(lambda: all(r.repository.current_version(model_name) == "2" for r in replicas),
                     "both replicas serve version 2")
    x = rows(3, 1)
    for replica in replicas:
        response = await replica.stub.ModelInfer(infer_request(model_name, x=x), timeout=10)
        assert response.model_version == "2"
        assert_outputs_match(response_arrays(response), expected_outputs(onnx_models[2], x))
    events = await wait_for_events(registry_stack.nats_url, deployed_subject(model_name), 4)
    assert sorted((e.event.payload.replica, e.event.payload.version) for e in events) == \
        [("replica-a", 1), ("replica-a", 2), ("replica-b", 1), ("replica-b", 2)]


async def test_a_deleted_alias_keeps_the_last_version_serving(registry, registry_stack, follow, model_name,
                                                              onnx_models, caplog) -> None:
    caplog.set_level(logging.WARNING, logger="splitstack_serving.lifecycle")
    await registry.create_model(model_name)
    await registry.register(model_name, {"cpu": onnx_models[1]})
    await registry.register(model_name, {"cpu": onnx_models[2]})
    await registry.promote(model_name, 1)
    running = await follow(models=(model_name,), instance="deleted")
    await wait_until(lambda: running.service.core.ready, "serving is ready")
    await registry.delete_alias(model_name)
    await wait_until(lambda: any("keeping version 1" in r.getMessage() for r in caplog.records),
                     "the deletion is handled and logged")
    response = await running.stub.ModelInfer(infer_request(model_name, x=rows(4, 1)), timeout=10)
    assert response.model_version == "1"
    await registry.promote(model_name, 2)
    await wait_until(lambda: running.repository.current_version(model_name) == "2", "the alias is followed again")


async def test_readiness_waits_until_the_model_is_warmed(registry, follow, model_name, onnx_models,
                                                         monkeypatch) -> None:
    await registry.create_model(model_name)
    await registry.register(model_name, {"cpu": onnx_models[1]})
    await registry.promote(model_name, 1)
    warming, release = asyncio.Event(), asyncio.Event()
    loop = asyncio.get_running_loop()
    warm_up = backend.OnnxModel.warm_up

    def held_warm_up(model: backend.OnnxModel, max_batch_size: int) -> None:
        loop.call_soon_threadsafe(warming.set)
        asyncio.run_coroutine_threadsafe(release.wait(), loop).result(30)
        warm_up(model, max_batch_size)

    monkeypatch.setattr(backend.OnnxModel, "warm_up", held_warm_up)
    running = await follow(models=(model_name,), instance="warming")
    await asyncio.wait_for(warming.wait(), 20)
    assert await health(running) == NOT_SERVING and await health(running, INFERENCE_SERVICE) == NOT_SERVING
    assert not (await running.stub.ServerReady(pb.ServerReadyRequest())).ready
    assert not (await running.stub.ModelReady(pb.ModelReadyRequest(name=model_name))).ready
    release.set()
    await wait_until(lambda: running.service.core.ready, "serving is ready after the warm-up")
    assert await health(running) == SERVING and await health(running, INFERENCE_SERVICE) == SERVING


async def test_with_no_models_configured_serving_is_ready_at_once(follow) -> None:
    running = await follow(models=())
    await wait_until(lambda: running.service.core.ready, "serving is ready")
    assert await health(running) == SERVING
    assert running.service.promotions is None


async def test_the_command_is_not_ready_until_its_alias_exists(registry, registry_stack, model_name, onnx_models,
                                                               tmp_path) -> None:
    await registry.create_model(model_name)
    version = await registry.register(model_name, {"cpu": onnx_models[1]})
    port, ready_file, log_path = free_port(), tmp_path / "serving.ready", tmp_path / "serving.log"
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("SPLITSTACK_")},
           "SPLITSTACK_REGISTRY_ADDR": registry_stack.registry.address, "SPLITSTACK_NATS_URL": registry_stack.nats_url,
           "SPLITSTACK_SERVING_MODELS": model_name, "SPLITSTACK_SERVING_CACHE_DIR": str(tmp_path / "cache"),
           "SPLITSTACK_SERVING_GRPC_PORT": str(port), "SPLITSTACK_SERVING_READY_FILE": str(ready_file),
           "SPLITSTACK_SERVING_INSTANCE": "command", "PYTHONUNBUFFERED": "1"}
    with log_path.open("wb") as log:
        proc = subprocess.Popen([find_binary("splitstack-serving")], env=env, cwd=tmp_path, stdout=log,
                                stderr=subprocess.STDOUT)
    try:
        await wait_until(lambda: "has no alias 'production'" in log_path.read_text() or proc.poll() is not None,
                         "serving looked the alias up", timeout=60)
        assert proc.poll() is None, log_path.read_text()
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            running = SimpleNamespace(channel=channel, stub=pb_grpc.GRPCInferenceServiceStub(channel))
            assert await health(running) == NOT_SERVING and await health(running, INFERENCE_SERVICE) == NOT_SERVING
            assert not (await running.stub.ServerReady(pb.ServerReadyRequest(), timeout=10)).ready
            assert not ready_file.exists(), "the ready file must not claim ready before the model is warm"

            await registry.promote(model_name, version)
            await wait_until(ready_file.exists, "the ready file appears", timeout=30)
            assert json.loads(ready_file.read_text())["grpc_port"] == port
            assert await health(running) == SERVING and await health(running, INFERENCE_SERVICE) == SERVING
            x = rows(9, 2)
            response = await running.stub.ModelInfer(infer_request(model_name, x=x), timeout=10)
            assert response.model_version == str(version)
            assert_outputs_match(response_arrays(response), expected_outputs(onnx_models[1], x))
    finally:
        proc.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(proc.wait, 30)
    assert code == 0, log_path.read_text()
    assert not ready_file.exists()


def test_models_settings_name_aliases_in_registry_mode_and_versions_without() -> None:
    settings = load_settings(ServingSettings, "serving", {
        "SPLITSTACK_REGISTRY_ADDR": "127.0.0.1:1", "SPLITSTACK_SERVING_MODELS": "digits, iris@staging",
        "SPLITSTACK_SERVING_CACHE_DIR": "/tmp/cache", "SPLITSTACK_SERVING_TARGET": "cpu"})
    assert settings.registry_addr == "127.0.0.1:1" and settings.cache_dir == "/tmp/cache"
    assert parse_followed(settings.models) == [FollowedModel("digits", "production"), FollowedModel("iris", "staging")]
    for bad, words in (("digits:3", "follow an alias"), ("digits,digits@staging", "twice"), ("Digits", "not a valid")):
        with pytest.raises(ConfigError, match=words):
            parse_followed(tuple(bad.split(",")))
    with pytest.raises(ConfigError, match="SPLITSTACK_REGISTRY_ADDR"):
        build_service(ServingSettings(models=("digits@staging",)))
