"""The held-out rows through the unchanged Triton client (`tritonclient.grpc`), in its own process.

The demo runs `python -m splitstack.client.demo.triton ADDRESS MODEL ROWS.npz` to show that a stock
Triton client talks to splitstack's serving as is; tritonclient's generated protos and ours cannot
live in one process, so this module imports nothing of splitstack's protocol code. It prints one
JSON object: the model's readiness, the version that answered, the rows sent and the accuracy.
"""

from __future__ import annotations

import json
import sys

import numpy as np


def main(argv: list[str]) -> int:
    address, model, rows_path = argv
    import tritonclient.grpc as triton

    client = triton.InferenceServerClient(address)
    metadata = client.get_model_metadata(model)
    name, output = metadata.inputs[0].name, metadata.outputs[0].name
    with np.load(rows_path) as rows:
        inputs, labels = rows["inputs"].astype(np.float32), rows["labels"]
    correct, version = 0, ""
    for start in range(0, len(labels), 64):
        batch = inputs[start:start + 64]
        tensor = triton.InferInput(name, list(batch.shape), "FP32")
        tensor.set_data_from_numpy(batch)
        result = client.infer(model, [tensor])
        correct += int(np.sum(np.argmax(result.as_numpy(output), axis=1) == labels[start:start + 64]))
        version = result.get_response().model_version
    print(json.dumps({"ready": client.is_model_ready(model), "version": version, "rows": len(labels),
                      "accuracy": correct / len(labels)}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
