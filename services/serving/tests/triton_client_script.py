"""Drive a serving instance with the real tritonclient.grpc; print what it saw as JSON.

Runs in its own process: tritonclient's generated protos and ours share message names and cannot
be loaded into one descriptor pool. Usage:

    python triton_client_script.py <address> <inputs.npz> <outputs.npz>

Reads the request arrays from inputs.npz, writes every output array to outputs.npz, and prints
one JSON object: the answers of every RPC, or {"error": status, "message": ...} where one failed.
"""

from __future__ import annotations

import json
import sys
import threading
from collections.abc import Callable
from typing import Any

import numpy as np
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException

ASYNC_REQUESTS = 8
STREAM_REQUESTS = 6


def attempt(call: Callable[[], Any]) -> Any:
    """The call's answer, or its error as {"error", "message"}."""
    try:
        return call()
    except InferenceServerException as exc:
        return {"error": exc.status(), "message": exc.message()}


def tensor(name: str, array: np.ndarray, datatype: str) -> triton.InferInput:
    """An input with its data set from `array`."""
    infer_input = triton.InferInput(name, list(array.shape), datatype)
    infer_input.set_data_from_numpy(array)
    return infer_input


def mlp_inputs(array: np.ndarray) -> list[triton.InferInput]:
    return [tensor("x", array, "FP32")]


class Collector:
    """Callback target for async_infer and streams: results by request key, and a countdown."""

    def __init__(self, expected: int) -> None:
        self.results: dict[str, Any] = {}
        self.errors: dict[str, str] = {}
        self._left = expected
        self._lock = threading.Lock()
        self.done = threading.Event()

    def callback_for(self, key: str) -> Callable[[Any, Any], None]:
        return lambda result, error: self.record(key, result, error)

    def record(self, key: str, result: Any, error: Any) -> None:
        with self._lock:
            if error is not None:
                self.errors[key] = str(error)
            else:
                self.results[key] = result
            self._left -= 1
            if self._left == 0:
                self.done.set()


def infer_section(client: triton.InferenceServerClient, inputs: Any, out: dict[str, np.ndarray]) -> dict:
    seen: dict[str, Any] = {}
    result = client.infer("mlp", mlp_inputs(inputs["x5"]), request_id="req-5")
    out["infer_logits"], out["infer_hidden"] = result.as_numpy("logits"), result.as_numpy("hidden")
    seen["infer_response"] = result.get_response(as_json=True)
    only = client.infer("mlp", mlp_inputs(inputs["x5"]), outputs=[triton.InferRequestedOutput("logits")])
    seen["requested_outputs"] = [o["name"] for o in only.get_response(as_json=True)["outputs"]]
    out["requested_logits"] = only.as_numpy("logits")
    pair = client.infer("pair", [tensor("ids", inputs["ids"], "INT64"), tensor("scale", inputs["scale"], "FP32")])
    out["pair_scaled"], out["pair_total"] = pair.as_numpy("scaled"), pair.as_numpy("total")
    version_1 = client.infer("mlp", mlp_inputs(inputs["x5"]), model_version="1")
    seen["version_1_response"] = version_1.get_response(as_json=True)
    out["v1_logits"] = version_1.as_numpy("logits")
    return seen


def async_section(client: triton.InferenceServerClient, inputs: Any, out: dict[str, np.ndarray]) -> dict:
    collector = Collector(ASYNC_REQUESTS)
    for i in range(ASYNC_REQUESTS):
        client.async_infer("mlp", mlp_inputs(inputs[f"async{i}"]), collector.callback_for(f"async{i}"))
    finished = collector.done.wait(60)
    for key, result in collector.results.items():
        out[f"{key}_logits"] = result.as_numpy("logits")
    return {"async_finished": finished, "async_errors": collector.errors}


def stream_section(client: triton.InferenceServerClient, inputs: Any, out: dict[str, np.ndarray]) -> dict:
    collector = Collector(STREAM_REQUESTS + 1)

    def on_stream(result: Any, error: Any) -> None:
        if error is not None:
            collector.record("stream_error", None, error)
        else:
            collector.record(result.get_response().id, result, None)

    client.start_stream(on_stream)
    for i in range(STREAM_REQUESTS):
        client.async_stream_infer("mlp", mlp_inputs(inputs[f"stream{i}"]), request_id=f"stream{i}")
    client.async_stream_infer("missing", mlp_inputs(inputs["stream0"]), request_id="bad")
    finished = collector.done.wait(60)
    client.stop_stream()
    for key, result in collector.results.items():
        out[f"{key}_logits"] = result.as_numpy("logits")
    return {"stream_finished": finished, "stream_errors": collector.errors}


def errors_section(client: triton.InferenceServerClient, inputs: Any) -> dict:
    wrong_type = inputs["x5"].astype(np.float64)
    return {
        "unknown_model": attempt(lambda: client.infer("missing", mlp_inputs(inputs["x5"]))),
        "wrong_datatype": attempt(lambda: client.infer("mlp", [tensor("x", wrong_type, "FP64")])),
        "unknown_version_metadata": attempt(lambda: client.get_model_metadata("mlp", "9", as_json=True)),
    }


def repository_section(client: triton.InferenceServerClient, inputs: Any, out: dict[str, np.ndarray]) -> dict:
    seen: dict[str, Any] = {"index_before": client.get_model_repository_index(as_json=True)}
    config = json.dumps({"max_batch_size": 16, "dynamic_batching": {"max_queue_delay_microseconds": 100}})
    seen["load"] = attempt(lambda: client.load_model("spare", config=config))
    seen["spare_ready"] = client.is_model_ready("spare")
    seen["spare_config"] = client.get_model_config("spare", as_json=True)
    out["spare_logits"] = client.infer("spare", mlp_inputs(inputs["x5"])).as_numpy("logits")
    seen["unload"] = attempt(lambda: client.unload_model("spare"))
    seen["spare_ready_after_unload"] = client.is_model_ready("spare")
    seen["index_after"] = client.get_model_repository_index(as_json=True)
    return seen


def main(address: str, inputs_path: str, outputs_path: str) -> None:
    inputs = np.load(inputs_path)
    out: dict[str, np.ndarray] = {}
    client = triton.InferenceServerClient(address)
    seen: dict[str, Any] = {
        "live": client.is_server_live(), "ready": client.is_server_ready(),
        "mlp_ready": client.is_model_ready("mlp"), "mlp_1_ready": client.is_model_ready("mlp", "1"),
        "mlp_7_ready": client.is_model_ready("mlp", "7"), "missing_ready": client.is_model_ready("missing"),
        "server_metadata": client.get_server_metadata(as_json=True),
        "model_metadata": client.get_model_metadata("mlp", as_json=True),
        "model_config": client.get_model_config("mlp", as_json=True),
    }
    seen.update(infer_section(client, inputs, out))
    seen.update(async_section(client, inputs, out))
    seen.update(stream_section(client, inputs, out))
    seen.update(errors_section(client, inputs))
    seen["statistics"] = client.get_inference_statistics("mlp", as_json=True)
    seen.update(repository_section(client, inputs, out))
    client.close()
    np.savez(outputs_path, **out)
    print(json.dumps(seen))


if __name__ == "__main__":
    main(*sys.argv[1:4])
