"""The SDK's local behaviour, without a stack: bad input is refused before anything is sent, with a
clear message; addresses come from stack.json; subjects map onto the platform's event subjects.
Services that are down are real too: an address nothing listens on gives a PlatformError."""

from __future__ import annotations

import io
import json
import os
import socket
import sys
import time
from pathlib import Path

import grpc
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))  # sdk_support: beside this file

from sdk_support import npz_bytes  # noqa: E402

from splitstack.client import processes  # noqa: E402
from splitstack.client.sdk import Pipeline, Platform, PlatformError  # noqa: E402
from splitstack.client.sdk.events import intersect, plan_subscriptions  # noqa: E402
from splitstack.client.sdk.inference import decode_outputs, infer_request, named_inputs  # noqa: E402
from splitstack.client.sdk.registry import dataset_bytes, to_message  # noqa: E402
from inference import grpc_service_pb2 as ipb  # noqa: E402
from splitstack.trainer.v1 import trainer_pb2 as tpb  # noqa: E402


def unused_address() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{sock.getsockname()[1]}"


def metadata(*inputs: tuple[str, str]) -> ipb.ModelMetadataResponse:
    return ipb.ModelMetadataResponse(name="m", inputs=[
        ipb.ModelMetadataResponse.TensorMetadata(name=n, datatype=d, shape=[-1, 4]) for n, d in inputs])


def test_platform_needs_a_registry_and_names_missing_services() -> None:
    with pytest.raises(ValueError, match="registry"):
        Platform(registry="")
    with Platform(registry=unused_address(), serving={"cpu": unused_address()}) as platform:
        with pytest.raises(ValueError, match=r"no serving address for target 'gpu' \(known targets: cpu\)"):
            platform.predict("m", np.zeros((1, 4)), target="gpu")
        with pytest.raises(ValueError, match="no trainer address"):
            platform.submit({"model": "m"})
        with pytest.raises(ValueError, match="no converter address"):
            platform.convert("m", 1, "cpu")
        with pytest.raises(ValueError, match="no NATS URL"):
            platform.tail_events()
        with pytest.raises(ValueError, match="no serving address for target 'tpu'"):
            Pipeline(platform).train_and_deploy({"model": "m", "recipe": "digits-mlp"}, "d", target="tpu")
    nowhere = f"nats://{unused_address()}"
    with Platform(registry=unused_address(), nats_url=nowhere) as platform:
        started = time.monotonic()
        with pytest.raises(ValueError, match=f"cannot reach NATS at {nowhere}"):
            platform.tail_events(["model.deployed.>"])
        assert time.monotonic() - started < 5


def test_an_unreachable_service_is_a_platform_error() -> None:
    with Platform(registry=unused_address(), timeout=3) as platform:
        with pytest.raises(PlatformError) as failure:
            platform.models()
    assert failure.value.service == "registry"
    assert failure.value.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
    assert str(failure.value).startswith(f"registry: {failure.value.code.name}: ")


def test_specs_and_policies_from_mappings_name_what_is_wrong() -> None:
    spec = to_message({"model": "digits", "recipe": "digits-mlp", "hyperparameters": {"hidden": 64},
                       "max_epochs": 3, "required_targets": ["cpu"]}, tpb.JobSpec, "job spec")
    assert spec.max_epochs == 3 and spec.hyperparameters["hidden"] == 64 and list(spec.required_targets) == ["cpu"]
    with pytest.raises(ValueError, match=r"job spec: unknown field\(s\) recipez \(known: model, recipe"):
        to_message({"model": "m", "recipez": "x"}, tpb.JobSpec, "job spec")
    with pytest.raises(ValueError, match="job spec: .*max_epochs|job spec: .*maxEpochs"):
        to_message({"max_epochs": "many"}, tpb.JobSpec, "job spec")
    with pytest.raises(ValueError, match="job spec must be a JobSpec or a mapping"):
        to_message(["model"], tpb.JobSpec, "job spec")


def test_dataset_sources(tmp_path: Path) -> None:
    arrays = {"inputs": np.ones((3, 64), np.float32), "labels": np.arange(3)}
    with np.load(io.BytesIO(dataset_bytes(arrays))) as loaded:
        assert sorted(loaded.files) == ["inputs", "labels"] and loaded["inputs"].shape == (3, 64)
    path = tmp_path / "d.npz"
    path.write_bytes(npz_bytes(**arrays))
    assert dataset_bytes(path) == dataset_bytes(str(path)) == path.read_bytes()
    with pytest.raises(ValueError, match=f"dataset file {tmp_path / 'missing.npz'} does not exist"):
        dataset_bytes(tmp_path / "missing.npz")
    with pytest.raises(ValueError, match="a dataset source is a file path, bytes or a mapping"):
        dataset_bytes(42)


def test_inputs_follow_the_models_names_and_datatypes() -> None:
    one = metadata(("x", "FP32"))
    arrays = named_inputs(np.arange(8, dtype=np.float64).reshape(2, 4), one)
    assert arrays["x"].dtype == np.float32 and arrays["x"].flags.c_contiguous
    with pytest.raises(ValueError, match="takes 2 inputs"):
        named_inputs(np.zeros((1, 4)), metadata(("a", "FP32"), ("b", "INT64")))
    with pytest.raises(ValueError, match="missing: b, unknown: c"):
        named_inputs({"a": np.zeros((1, 4)), "c": np.zeros((1, 4))}, metadata(("a", "FP32"), ("b", "INT64")))
    with pytest.raises(ValueError, match="input 'b' is INT64; an array of float64 cannot be converted"):
        named_inputs({"a": np.zeros((1, 4)), "b": np.zeros((1, 4))}, metadata(("a", "FP32"), ("b", "INT64")))

    request = infer_request("m", 3, arrays, one)
    assert (request.model_version, request.inputs[0].datatype, list(request.inputs[0].shape)) == ("3", "FP32", [2, 4])
    response = ipb.ModelInferResponse(outputs=[ipb.ModelInferResponse.InferOutputTensor(
        name="y", datatype="FP32", shape=[2, 4])], raw_output_contents=request.raw_input_contents)
    np.testing.assert_array_equal(decode_outputs(response)["y"], arrays["x"])
    typed = ipb.ModelInferResponse(outputs=[ipb.ModelInferResponse.InferOutputTensor(
        name="n", datatype="INT64", shape=[3], contents=ipb.InferTensorContents(int64_contents=[1, 2, 3]))])
    np.testing.assert_array_equal(decode_outputs(typed)["n"], [1, 2, 3])


def test_subjects_map_onto_platform_event_subjects() -> None:
    assert intersect(">", "model.deployed.*.*") == "model.deployed.*.*"
    assert intersect("model.*.digits.cpu", "model.deployed.*.*") == "model.deployed.digits.cpu"
    assert intersect("model.promoted.digits", "model.promoted.*.*") is None
    assert intersect("data.>", "model.>") is None
    core, stored = plan_subscriptions(["model.deployed.digits.>"], since_start=False)
    assert (core, stored) == (["model.deployed.digits.*"], [])
    core, stored = plan_subscriptions(["training.>"], since_start=True)
    assert core == ["training.progress.*"] and stored == [("SPLITSTACK_TRAINING", "training.finished.*")]
    with pytest.raises(ValueError, match="match no platform event subject"):
        plan_subscriptions(["orders.created"], since_start=False)


def test_from_stack_reads_the_running_stacks_addresses(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no local stack has run"):
        Platform.from_stack(tmp_path / "state", tmp_path / "stack.toml")
    (tmp_path / "state").mkdir()
    running = {"pid": os.getpid(), "start_time": None}
    components = [
        {"name": "nats", "kind": "nats", "ports": {"client": 4333}, **running},
        {"name": "registry", "kind": "service", "ports": {"grpc": 5001, "metrics": 1},
         "argv": ["/venv/bin/splitstack-registry"], **running},
        {"name": "converter", "kind": "service", "ports": {"grpc": 5002, "metrics": 1},
         "argv": ["/venv/bin/splitstack-converter"], "env": {"SPLITSTACK_CONVERTER_TARGET": "t4-int8"}, **running},
        {"name": "serving", "kind": "service", "ports": {"grpc": 5003, "metrics": 1},
         "argv": ["/venv/bin/splitstack-serving"], "env": {}, **running},
        {"name": "trainer", "kind": "service", "ports": {"grpc": 5004, "metrics": 1},
         "argv": ["/venv/bin/splitstack-trainer"], "pid": None, "start_time": None},
    ]
    for component in components:
        if component["pid"] is not None:
            component["start_time"] = processes.process_start_time(component["pid"])
    (tmp_path / "state" / "stack.json").write_text(json.dumps({"version": 1, "components": components}))
    with Platform.from_stack(tmp_path / "state", tmp_path / "stack.toml") as platform:
        found = platform.endpoints
    assert (found.registry, found.trainer, found.nats_url) == ("127.0.0.1:5001", None, "nats://127.0.0.1:4333")
    assert dict(found.converters) == {"t4-int8": "127.0.0.1:5002"} and dict(found.serving) == {"cpu": "127.0.0.1:5003"}
