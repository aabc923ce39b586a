"""Wire compatibility: the real tritonclient.grpc against a `splitstack-serving` process.

tritonclient runs in a subprocess (its protos clash with ours in one process); it prints what
every RPC answered and saves every output array, which this process checks against in-process
ONNX Runtime results.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from serving_support import assert_outputs_match, rows, server_process

SCRIPT = Path(__file__).with_name("triton_client_script.py")
ASYNC_REQUESTS, STREAM_REQUESTS = 8, 6


def _inputs() -> dict[str, np.ndarray]:
    inputs = {"x5": rows(1, 5), "ids": np.arange(12, dtype=np.int64).reshape(3, 4),
              "scale": np.array([[1.5], [-2.0], [0.25]], np.float32)}
    inputs.update({f"async{i}": rows(10 + i, 1 + i % 4) for i in range(ASYNC_REQUESTS)})
    inputs.update({f"stream{i}": rows(20 + i, 1 + i % 3) for i in range(STREAM_REQUESTS)})
    return inputs


@pytest.fixture(scope="module")
def triton_run(model_template: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, dict, dict]:
    """(what tritonclient saw, the arrays it got, the inputs sent), from one client run."""
    work = tmp_path_factory.mktemp("triton")
    inputs = _inputs()
    np.savez(work / "inputs.npz", **inputs)
    env = {"SPLITSTACK_SERVING_MODELS": "mlp:1,mlp:2,pair", "SPLITSTACK_SERVING_MAX_QUEUE_DELAY_US": "2000"}
    with server_process(work, model_template, env) as server:
        done = subprocess.run([sys.executable, str(SCRIPT), server.address, str(work / "inputs.npz"),
                               str(work / "outputs.npz")], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, f"client failed:\n{done.stderr}\nserver log:\n{server.log_text()}"
    with np.load(work / "outputs.npz") as arrays:
        return json.loads(done.stdout), dict(arrays), inputs


def _ints(values: list[Any]) -> list[int]:
    return [int(v) for v in values]  # protobuf JSON writes int64 as strings


def test_health_and_readiness(triton_run) -> None:
    seen, _, _ = triton_run
    assert seen["live"] is True and seen["ready"] is True
    assert seen["mlp_ready"] is True and seen["mlp_1_ready"] is True
    assert seen["mlp_7_ready"] is False and seen["missing_ready"] is False


def test_server_and_model_metadata(triton_run) -> None:
    seen, _, _ = triton_run
    assert seen["server_metadata"]["name"] == "splitstack-serving"
    assert "model_repository" in seen["server_metadata"]["extensions"]
    metadata = seen["model_metadata"]
    assert metadata["versions"] == ["1", "2"] and metadata["platform"] == "onnxruntime_onnx"
    assert [(t["name"], t["datatype"], _ints(t["shape"])) for t in metadata["inputs"]] == [("x", "FP32", [-1, 64])]
    assert [(t["name"], _ints(t["shape"])) for t in metadata["outputs"]] == [("logits", [-1, 10]),
                                                                              ("hidden", [-1, 256])]


def test_model_config(triton_run) -> None:
    config = triton_run[0]["model_config"]["config"]
    assert config["name"] == "mlp" and config["max_batch_size"] == 64
    assert [(i["name"], i["data_type"], _ints(i["dims"])) for i in config["input"]] == [("x", "TYPE_FP32", [64])]
    assert int(config["dynamic_batching"]["max_queue_delay_microseconds"]) == 2000


def test_infer_results_equal_onnx_runtime(triton_run, oracle) -> None:
    seen, arrays, inputs = triton_run
    assert_outputs_match({"logits": arrays["infer_logits"], "hidden": arrays["infer_hidden"]},
                         oracle.run("mlp", "2", x=inputs["x5"]))
    response = seen["infer_response"]
    assert response["model_version"] == "2" and response["id"] == "req-5"
    assert len(response["parameters"]["artifact_sha256"]["string_param"]) == 64
    assert seen["requested_outputs"] == ["logits"]
    assert_outputs_match({"logits": arrays["requested_logits"]}, oracle.run("mlp", "2", x=inputs["x5"]))
    assert seen["version_1_response"]["model_version"] == "1"
    assert_outputs_match({"logits": arrays["v1_logits"]}, oracle.run("mlp", "1", x=inputs["x5"]))
    assert_outputs_match({"scaled": arrays["pair_scaled"], "total": arrays["pair_total"]},
                         oracle.run("pair", "1", ids=inputs["ids"], scale=inputs["scale"]))


def test_async_infer_and_stream(triton_run, oracle) -> None:
    seen, arrays, inputs = triton_run
    assert seen["async_finished"] and seen["async_errors"] == {}
    assert seen["stream_finished"]
    assert list(seen["stream_errors"]) == ["stream_error"] and "not loaded" in seen["stream_errors"]["stream_error"]
    for key in [f"async{i}" for i in range(ASYNC_REQUESTS)] + [f"stream{i}" for i in range(STREAM_REQUESTS)]:
        assert_outputs_match({"logits": arrays[f"{key}_logits"]}, oracle.run("mlp", "2", x=inputs[key]))


def test_errors_carry_status_and_tensor(triton_run) -> None:
    seen = triton_run[0]
    assert seen["unknown_model"]["error"] == "StatusCode.NOT_FOUND"
    assert seen["wrong_datatype"]["error"] == "StatusCode.INVALID_ARGUMENT"
    assert "'x'" in seen["wrong_datatype"]["message"] and "expected datatype FP32" in seen["wrong_datatype"]["message"]
    assert seen["unknown_version_metadata"]["error"] == "StatusCode.NOT_FOUND"


def test_inference_statistics(triton_run) -> None:
    seen, _, inputs = triton_run
    by_version = {s["version"]: s for s in seen["statistics"]["model_stats"] if s["name"] == "mlp"}
    assert set(by_version) == {"1", "2"}
    latest = by_version["2"]
    requests = 2 + ASYNC_REQUESTS + STREAM_REQUESTS
    row_count = 10 + sum(len(inputs[f"async{i}"]) for i in range(ASYNC_REQUESTS)) + \
        sum(len(inputs[f"stream{i}"]) for i in range(STREAM_REQUESTS))
    assert int(latest["inference_stats"]["success"]["count"]) == requests
    assert int(latest["inference_stats"]["fail"]["count"]) == 1  # the FP64 request
    assert int(latest["inference_count"]) == row_count
    assert int(latest["inference_stats"]["queue"]["count"]) == requests
    assert int(latest["inference_stats"]["compute_infer"]["ns"]) > 0
    assert sum(int(b["batch_size"]) * int(b["compute_infer"]["count"]) for b in latest["batch_stats"]) == row_count
    assert int(by_version["1"]["inference_count"]) == 5


def test_repository_load_and_unload(triton_run, oracle) -> None:
    seen, arrays, inputs = triton_run
    before = {(m["name"], m.get("version", "")): m.get("state") for m in seen["index_before"]["models"]}
    assert before[("mlp", "1")] == before[("mlp", "2")] == before[("pair", "1")] == "READY"
    assert before[("spare", "")] == "UNAVAILABLE"
    assert seen["load"] is None and seen["spare_ready"] is True
    assert seen["spare_config"]["config"]["max_batch_size"] == 16
    assert_outputs_match({"logits": arrays["spare_logits"]}, oracle.run("spare", "1", x=inputs["x5"]))
    assert seen["unload"] is None and seen["spare_ready_after_unload"] is False
    after = {m["name"]: m for m in seen["index_after"]["models"] if m["name"] == "spare"}
    assert after["spare"]["state"] == "UNAVAILABLE" and after["spare"]["reason"] == "unloaded"
