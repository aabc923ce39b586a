"""ONNX Runtime graph optimization, applied offline and saved as the FP32 candidate's model.

Level `basic` (the default) folds constants, removes redundant nodes and fuses what standard ONNX
operators can express, so the result stays portable: TensorRT parses it, the quantizer accepts it,
and any ONNX Runtime build runs it. `extended` adds ONNX Runtime's own fused operators (contrib
ops); use it only for targets served by ONNX Runtime alone. Hardware-specific layout rewrites
(`all`) are never saved: serving applies them at load time on its own machine.
"""

from __future__ import annotations

from pathlib import Path

import onnx
import onnxruntime as ort

from splitstack_converter.pipeline import PipelineError

LEVELS = {
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
}


def optimize_onnx(src: Path, dst: Path, level: str = "basic") -> None:
    """Write the model at `src`, optimized at `level`, to `dst` (one file); PipelineError on failure."""
    if level not in LEVELS:
        raise ValueError(f"optimization level {level!r} is not one of {sorted(LEVELS)}")
    options = ort.SessionOptions()
    options.graph_optimization_level = LEVELS[level]
    options.optimized_model_filepath = str(dst)
    options.intra_op_num_threads = 1
    try:
        ort.InferenceSession(str(src), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001  ONNX Runtime raises its own exception types
        raise PipelineError("optimize", f"ONNX Runtime cannot load the model: {_first_line(exc)}") from None
    model = onnx.load(str(dst))
    if model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "":
        raise PipelineError("optimize", "graph optimization fixed the batch axis")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:500]
