"""The peer: KServe 0.21's Python model server answering Open Inference Protocol v2 over gRPC with ONNX Runtime.

Runs inside KServe's own venv (`.bench/kserve-venv`), never in the project's: KServe pins its own
grpcio and protobuf. A small custom `kserve.Model`, written the way KServe's docs and its own
sklearn/xgboost servers write one: `load` opens the ONNX file (one intra-op thread, as every
contender), `predict` runs the session on the request's first input and returns the output as a
raw (binary) tensor. `ModelServer` serves it over REST and gRPC (one worker, KServe's defaults)
except that per-request latency logging is off, since it writes a log line per request.

    .bench/kserve-venv/bin/python kserve_model.py --model-path M --name mlp_int8 --grpc-port P --http-port Q
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

# kserve.model_server parses sys.argv when imported: keep only what is ours out of its sight.
_parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
_parser.add_argument("--model-path", required=True)
_parser.add_argument("--name", required=True)
_parser.add_argument("--grpc-port", type=int, required=True)
_parser.add_argument("--http-port", type=int, required=True)
_parser.add_argument("--intra-op-threads", type=int, default=1)
ARGS = _parser.parse_args()
sys.argv = sys.argv[:1]

import kserve  # noqa: E402
import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402
from kserve import InferOutput, InferRequest, InferResponse  # noqa: E402

ORT_DATATYPES = {np.dtype(np.float32): "FP32", np.dtype(np.float64): "FP64", np.dtype(np.int64): "INT64",
                 np.dtype(np.int32): "INT32"}


class OnnxModel(kserve.Model):
    """One ONNX Runtime session behind KServe's predict."""

    def __init__(self, name: str, path: str, threads: int) -> None:
        super().__init__(name)
        self._path = path
        self._threads = threads
        self._session: ort.InferenceSession | None = None
        self._input = ""
        self.load()

    def load(self) -> bool:
        options = ort.SessionOptions()
        options.intra_op_num_threads = self._threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.log_severity_level = 3
        self._session = ort.InferenceSession(self._path, options, providers=["CPUExecutionProvider"])
        self._input = self._session.get_inputs()[0].name
        self.ready = True
        return self.ready

    def predict(self, payload: InferRequest, headers: dict[str, str] | None = None) -> InferResponse:
        batch = payload.inputs[0].as_numpy()
        outputs = self._session.run(None, {self._input: batch})
        infer_outputs = []
        for node, array in zip(self._session.get_outputs(), outputs):
            output = InferOutput(name=node.name, shape=list(array.shape), datatype=ORT_DATATYPES[array.dtype])
            output.set_data_from_numpy(array, binary_data=True)
            infer_outputs.append(output)
        return InferResponse(model_name=self.name, infer_outputs=infer_outputs, response_id=payload.id)


def main() -> None:
    """Serve the model until SIGTERM."""
    model = OnnxModel(ARGS.name, ARGS.model_path, ARGS.intra_op_threads)
    server = kserve.ModelServer(http_port=ARGS.http_port, grpc_port=ARGS.grpc_port, workers=1,
                                enable_grpc=True, enable_latency_logging=False)
    server.start([model])


if __name__ == "__main__":
    main()
