"""The hand-off between trainer and converter, fixed once.

The trainer uploads an exported program (`torch.export.save`) whose single input is `x`, float32,
shape [batch, *features] with a dynamic batch axis, and whose single output is `logits`, float32,
[batch, classes]; plus a sample `.npz` holding `inputs`, `labels` and `reference_outputs` (the
exported program's own outputs on `inputs`) with at least SAMPLE_MIN_ROWS rows, used by the
converter for INT8 calibration and the accuracy gate. The version's lineage names the primary
metric and its direction; the default is accuracy, maximized.
"""

from __future__ import annotations

from splitstack.common.v1 import common_pb2

INPUT_NAME = "x"
OUTPUT_NAME = "logits"
INPUT_DTYPE = common_pb2.FP32
BATCH_DIM_NAME = "batch"
MAX_BATCH = 4096
EXPORTED_PROGRAM_FILENAME = "model.pt2"

SAMPLE_FILENAME = "sample.npz"
SAMPLE_KEYS = ("inputs", "labels", "reference_outputs")
SAMPLE_MIN_ROWS = 300

DEFAULT_PRIMARY_METRIC = common_pb2.PrimaryMetric(name="accuracy", direction=common_pb2.MAXIMIZE)


def signature(features: list[int], classes: int) -> common_pb2.Signature:
    """The hand-off signature for a model with per-row `features` shape and `classes` outputs."""
    return common_pb2.Signature(
        inputs=[common_pb2.TensorSpec(name=INPUT_NAME, dtype=INPUT_DTYPE, shape=[-1, *features])],
        outputs=[common_pb2.TensorSpec(name=OUTPUT_NAME, dtype=common_pb2.FP32, shape=[-1, classes])],
    )


def check_sample(arrays: dict) -> None:
    """Raise ValueError naming what is wrong with a sample's arrays (keys, rows, alignment)."""
    missing = [k for k in SAMPLE_KEYS if k not in arrays]
    if missing:
        raise ValueError(f"sample lacks arrays {missing}; needs {list(SAMPLE_KEYS)}")
    rows = {k: len(arrays[k]) for k in SAMPLE_KEYS}
    if len(set(rows.values())) != 1:
        raise ValueError(f"sample arrays have different row counts: {rows}")
    if rows["inputs"] < SAMPLE_MIN_ROWS:
        raise ValueError(f"sample has {rows['inputs']} rows; needs at least {SAMPLE_MIN_ROWS}")
