"""Static INT8 quantization: QDQ format, per-channel weights, calibrated on the registered sample.

Two schemes: the CPU scheme (unsigned 8-bit activations, signed per-channel weights: the U8S8 form
x86 VNNI kernels run fastest) and `TENSORRT_SCHEME` (signed, symmetric activations and weights,
zero points all 0: what TensorRT accepts as explicit Q/DQ). `cpu_scheme()` picks the CPU scheme
for the machine the conversion pool runs on, which is the target's hardware: x86 without VNNI
multiplies U8S8 with `vpmaddubsw`, whose 16-bit intermediate sums saturate, so there weights are
quantized to 7 bits (`reduce_range`) — measured on an AVX2-only EPYC, the 1024-wide digits MLP lost
1.0 accuracy point at full range and 0.25 with reduce_range. Calibration is MinMax over the
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
    reduce_range: bool = False          # 7-bit weights: no U8S8 saturation on x86 without VNNI
    extra_options: dict = field(default_factory=dict)


CPU_SCHEME = QuantizationScheme("u8s8-per-channel", QuantType.QUInt8, QuantType.QInt8, False)
CPU_REDUCED_RANGE_SCHEME = QuantizationScheme("u8s7-per-channel", QuantType.QUInt8, QuantType.QInt8, False,
                                              reduce_range=True)
TENSORRT_SCHEME = QuantizationScheme("s8s8-symmetric-per-channel", QuantType.QInt8, QuantType.QInt8, True)
SCHEMES = {scheme.name: scheme for scheme in (CPU_SCHEME, CPU_REDUCED_RANGE_SCHEME, TENSORRT_SCHEME)}


def x86_without_vnni(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """True on an x86 CPU whose flags name no VNNI (AVX-512 VNNI or AVX-VNNI); False elsewhere."""
    try:
        text = cpuinfo.read_text(errors="replace")
    except OSError:
        return False
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), None)
    if flags is None:                    # not x86 (ARM lists "Features"): its int8 dot products do not saturate
        return False
    return not ({"avx512_vnni", "avx_vnni"} & set(flags))


def cpu_scheme() -> QuantizationScheme:
    """The CPU scheme for this machine (see the module docstring)."""
    return CPU_REDUCED_RANGE_SCHEME if x86_without_vnni() else CPU_SCHEME


class _Batches(CalibrationDataReader):
    """Feeds calibration rows to the quantizer in batches."""

    def __init__(self, input_name: str, rows: np.ndarray, batch: int) -> None:
        self._feeds: Iterator[dict] = iter(
            [{input_name: rows[i:i + batch]} for i in range(0, len(rows), batch)])

    def get_next(self) -> dict | None:
        return next(self._feeds, None)


def quantize_int8(src: Path, dst: Path, calibration_rows: np.ndarray, input_name: str,
                  scheme: QuantizationScheme | None = None) -> None:
    """Write the INT8 (QDQ) model of the FP32 model at `src` to `dst`; PipelineError("quantize") on failure."""
    scheme = scheme or cpu_scheme()
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
                            quant_format=QuantFormat.QDQ, per_channel=True, reduce_range=scheme.reduce_range,
                            activation_type=scheme.activation_type, weight_type=scheme.weight_type,
                            calibrate_method=CalibrationMethod.MinMax, extra_options=options)
        except PipelineError:
            raise
        except Exception as exc:  # noqa: BLE001  the quantizer raises many kinds of errors
            text = (str(exc).strip() or type(exc).__name__).splitlines()[0][:500]
            raise PipelineError("quantize", f"INT8 quantization ({scheme.name}) failed: {text}") from None
