"""The conversion pipeline, stage by stage, free of transport and persistence.

export (exported program -> ONNX) -> optimize (ONNX Runtime graph optimization) -> candidates
(ONNX FP32; ONNX INT8 QDQ in "quantize"; TensorRT engines in "build") -> gate (accuracy against the reference outputs)
-> profile (measured on this machine) -> select (the target's serving choice). Each stage is a
plain synchronous function; the service runs them in a worker thread.
"""

from __future__ import annotations

import logging
import os

# ONNX Runtime writes telemetry files into the user's cache directory on import unless told not to.
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

# Libraries that narrate every export and quantization at INFO (or warn about absent torchvision).
CHATTY_LOGGERS = {"onnx_ir": logging.WARNING, "onnxscript": logging.WARNING, "torch.onnx": logging.ERROR,
                  "onnxruntime.quantization": logging.WARNING}


def quiet_libraries() -> None:
    """Keep the exporter's and quantizer's progress chatter out of the logs."""
    for name, level in CHATTY_LOGGERS.items():
        logging.getLogger(name).setLevel(level)


STAGES = ("fetch", "export", "optimize", "quantize", "build", "gate", "profile", "register")


class PipelineError(Exception):
    """A conversion cannot go on: the input is unusable or no candidate is servable.

    `stage` names where it happened (one of STAGES); the message is the reason reported in
    conversion.failed. Retrying the same input gives the same answer.
    """

    def __init__(self, stage: str, reason: str) -> None:
        if stage not in STAGES:
            raise ValueError(f"unknown pipeline stage {stage!r}")
        super().__init__(reason)
        self.stage = stage
        self.reason = reason
