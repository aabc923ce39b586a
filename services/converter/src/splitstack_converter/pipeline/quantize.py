"""Static INT8 quantization: QDQ format, per-channel weights, calibrated on the registered sample.

Two schemes: `CPU_SCHEME` (unsigned 8-bit activations, signed per-channel weights: the U8S8 form
x86 VNNI kernels run fastest) and `TENSORRT_SCHEME` (signed, symmetric activations and weights,
zero points all 0: what TensorRT accepts as explicit Q/DQ). Calibration is MinMax over the
calibration rows, fed in batches. The sample may carry a `calibration_inputs` array; without one
its `inputs` are used.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                      quantize_static)
from onnxruntime.quantization.shape_inference import quant_pre_process

from splitstack_converter.pipeline import PipelineError

log = logging.getLogger(__name__)

CALIBRATION_BATCH = 64


@dataclass(frozen=True)
class QuantizationScheme:
    """How activations and weights are quantized."""

    name: str
    activation_type: QuantType
    weight_type: QuantType
    symmetric_activations: bool
    extra_options: dict = field(default_factory=dict)


CPU_SCHEME = QuantizationScheme("u8s8-per-channel", QuantType.QUInt8, QuantType.QInt8, False)
TENSORRT_SCHEME = QuantizationScheme("s8s8-symmetric-per-channel", QuantType.QInt8, QuantType.QInt8, True)


class _Batches(CalibrationDataReader):
    """Feeds calibration rows to the quantizer in batches."""

    def __init__(self, input_name: str, rows: np.ndarray, batch: int) -> None:
        self._feeds: Iterator[dict] = iter(
            [{input_name: rows[i:i + batch]} for i in range(0, len(rows), batch)])

    def get_next(self) -> dict | None:
        return next(self._feeds, None)


def quantize_int8(src: Path, dst: Path, calibration_rows: np.ndarray, input_name: str,
                  scheme: QuantizationScheme = CPU_SCHEME) -> None:
    """Write the INT8 (QDQ) model of the FP32 model at `src` to `dst`; PipelineError("quantize") on failure."""
    rows = np.ascontiguousarray(calibration_rows, dtype=np.float32)
    if len(rows) == 0:
        raise PipelineError("quantize", "no calibration rows")
    options = {"ActivationSymmetric": scheme.symmetric_activations, "WeightSymmetric": True,
               **scheme.extra_options}
    with tempfile.TemporaryDirectory(prefix="quantize-") as scratch:
        prepared = Path(scratch) / "prepared.onnx"
        try:
            # Shape inference only: the graph was optimized already.
            quant_pre_process(str(src), str(prepared), skip_optimization=True)
            quantize_static(str(prepared), str(dst), _Batches(input_name, rows, CALIBRATION_BATCH),
                            quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=scheme.activation_type, weight_type=scheme.weight_type,
                            calibrate_method=CalibrationMethod.MinMax, extra_options=options)
        except PipelineError:
            raise
        except Exception as exc:  # noqa: BLE001  the quantizer raises many kinds of errors
            text = (str(exc).strip() or type(exc).__name__).splitlines()[0][:500]
            raise PipelineError("quantize", f"INT8 quantization ({scheme.name}) failed: {text}") from None
