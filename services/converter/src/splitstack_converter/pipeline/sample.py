"""The registered sample (.npz): inputs, labels and the exported program's reference outputs.

Checked against the hand-off (splitstack.contracts.handoff.check_sample: the three arrays, aligned,
at least SAMPLE_MIN_ROWS rows) and against the model's input shape. An optional
`calibration_inputs` array, with the model's row shape, replaces `inputs` for INT8 calibration.

The sample comes from a client, and numpy allocates an array's declared shape before it reads the
data: every member's header is read first, and an array larger than its member's stored size, or
a sample of more than MAX_SAMPLE_BYTES in all, is refused before anything is allocated.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from splitstack.contracts import handoff
from splitstack_converter.pipeline import PipelineError

CALIBRATION_KEY = "calibration_inputs"
MAX_SAMPLE_BYTES = 1024 ** 3          # uncompressed, all arrays together


@dataclass(frozen=True)
class Sample:
    """The arrays of a registered sample, as the pipeline uses them."""

    inputs: np.ndarray               # float32 [rows, *features]
    labels: np.ndarray               # [rows]
    reference_outputs: np.ndarray    # float32 [rows, classes]
    calibration_inputs: np.ndarray   # float32 [n, *features]

    @property
    def rows(self) -> int:
        return len(self.inputs)


def load_sample(path: Path, features: tuple[int, ...], max_calibration_rows: int = 512) -> Sample:
    """Read and check the sample at `path` for a model taking rows of shape `features`."""
    try:
        check_declared_sizes(path)
        with np.load(path, allow_pickle=False) as archive:
            arrays = {key: archive[key] for key in archive.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise PipelineError("fetch", f"the sample is not a readable .npz: {exc}") from None
    try:
        handoff.check_sample(arrays)
    except ValueError as exc:
        raise PipelineError("fetch", f"the sample breaks the hand-off: {exc}") from None
    inputs = _rows("inputs", arrays["inputs"], features)
    calibration = _rows(CALIBRATION_KEY, arrays.get(CALIBRATION_KEY, inputs), features)
    reference = np.asarray(arrays["reference_outputs"], dtype=np.float32)
    if reference.ndim != 2:
        raise PipelineError("fetch", f"reference_outputs has shape {reference.shape}; expected [rows, classes]")
    return Sample(inputs=inputs, labels=np.asarray(arrays["labels"]).reshape(-1), reference_outputs=reference,
                  calibration_inputs=calibration[:max_calibration_rows])


def check_declared_sizes(path: Path, limit: int = MAX_SAMPLE_BYTES) -> None:
    """PipelineError unless every array of the .npz at `path` is no larger than its stored member and
    all of them together at most `limit` bytes (ValueError, BadZipFile: not an .npz)."""
    total = 0
    with zipfile.ZipFile(path) as archive:
        for info in archive.infolist():
            with archive.open(info) as member:
                version = np.lib.format.read_magic(member)
                read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                               else np.lib.format.read_array_header_2_0)
                shape, _, dtype = read_header(member)
            declared = int(np.prod(shape, dtype=object)) * dtype.itemsize
            if declared > info.file_size:
                raise PipelineError("fetch", f"sample array {info.filename!r} declares {declared} bytes but "
                                             f"holds {info.file_size}")
            total += info.file_size
            if total > limit:
                raise PipelineError("fetch", f"the sample holds more than {limit} bytes of arrays")


def _rows(name: str, array: np.ndarray, features: tuple[int, ...]) -> np.ndarray:
    if tuple(array.shape[1:]) != tuple(features) or len(array) == 0:
        raise PipelineError("fetch", f"sample array {name!r} has shape {array.shape}; the model takes "
                                     f"[rows, {', '.join(map(str, features))}]")
    return np.ascontiguousarray(array, dtype=np.float32)


def batch_of(inputs: np.ndarray, batch: int) -> np.ndarray:
    """`batch` rows taken from `inputs` (repeated when it has fewer)."""
    reps = -(-batch // len(inputs))
    return np.ascontiguousarray(np.concatenate([inputs] * reps)[:batch]) if reps > 1 else inputs[:batch].copy()
