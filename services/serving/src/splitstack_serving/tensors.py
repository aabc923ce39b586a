"""Tensors as the Open Inference Protocol names them, and what a loaded model expects of them.

Datatype names are the protocol's ("FP32", "INT64"...); `TensorSpec` and `ModelSignature`
describe a model's inputs and outputs (dim -1 = any size; a batchable model has -1 first).
`InputTensor` is one decoded request input; `bind_inputs` checks a request's inputs against a
signature and orders them, with every refusal an InvalidArgument that names the tensor and says
what was expected and what came.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from splitstack.chassis.errors import InvalidArgument
from splitstack.contracts.datatypes import CONTENTS_FIELDS, NUMPY_DTYPE_NAMES

# Protocol datatype -> numpy dtype, for every datatype served (BYTES and BF16 are not).
NUMPY_DTYPES: dict[str, np.dtype] = {name: np.dtype(dtype) for name, dtype in NUMPY_DTYPE_NAMES.items()}

# ONNX Runtime's type strings -> protocol datatype.
ORT_DATATYPES: dict[str, str] = {
    "tensor(bool)": "BOOL", "tensor(uint8)": "UINT8", "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32", "tensor(uint64)": "UINT64", "tensor(int8)": "INT8",
    "tensor(int16)": "INT16", "tensor(int32)": "INT32", "tensor(int64)": "INT64",
    "tensor(float16)": "FP16", "tensor(float)": "FP32", "tensor(double)": "FP64",
}


def shape_text(shape: Sequence[int]) -> str:
    """[2, 64] as the messages print it."""
    return "[" + ", ".join(str(d) for d in shape) + "]"


@dataclass(frozen=True)
class TensorSpec:
    """One input or output of a model: name, protocol datatype, shape (-1 = any size)."""

    name: str
    datatype: str
    shape: tuple[int, ...]

    @property
    def dtype(self) -> np.dtype:
        """The numpy dtype of the tensor's elements."""
        return NUMPY_DTYPES[self.datatype]


@dataclass(frozen=True)
class ModelSignature:
    """A model's inputs and outputs; `max_batch_size` > 0 means dim 0 of each is the batch."""

    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    max_batch_size: int
    output_index: dict[str, int] = field(init=False, repr=False, compare=False)
    # Requests share a batch only when their non-batch dims agree; with every non-batch dim
    # fixed, validation guarantees that, and requests need no batching key.
    needs_batch_key: bool = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "output_index", {o.name: i for i, o in enumerate(self.outputs)})
        dynamic_tail = any(d < 0 for spec in self.inputs for d in spec.shape[1:])
        object.__setattr__(self, "needs_batch_key", self.max_batch_size > 0 and dynamic_tail)

    def output_indices(self, requested: Sequence[str], model: str) -> Sequence[int]:
        """Indices of the requested outputs, in request order (all outputs when none are named)."""
        if not requested:
            return range(len(self.outputs))
        try:
            return [self.output_index[name] for name in requested]
        except KeyError as exc:
            raise InvalidArgument(f"requested output '{exc.args[0]}' is not an output of model '{model}' "
                                  f"(outputs: {', '.join(self.output_index)})") from None


class InputTensor:
    """One request input, decoded: name, datatype, shape and its elements as a numpy array."""

    __slots__ = ("name", "datatype", "shape", "array")

    def __init__(self, name: str, datatype: str, shape: tuple[int, ...], array: np.ndarray) -> None:
        self.name = name
        self.datatype = datatype
        self.shape = shape
        self.array = array


def decode_raw(name: str, datatype: str, shape: tuple[int, ...], data: bytes) -> InputTensor:
    """An input from its raw little-endian bytes; the byte count must match shape and datatype."""
    dtype = _dtype_of(name, datatype)
    count = _element_count(name, shape)
    expected = count * dtype.itemsize
    if len(data) != expected:
        raise InvalidArgument(f"input '{name}': shape {shape_text(shape)} of {datatype} needs {expected} bytes "
                              f"({count} elements), got {len(data)} bytes")
    return InputTensor(name, datatype, shape, np.frombuffer(data, dtype).reshape(shape))


def decode_typed(name: str, datatype: str, shape: tuple[int, ...], contents: object) -> InputTensor:
    """An input from the typed `InferTensorContents` field its datatype uses."""
    dtype = _dtype_of(name, datatype)
    field = CONTENTS_FIELDS.get(datatype)
    if field is None:
        raise InvalidArgument(f"input '{name}': {datatype} has no typed contents field; "
                              "send it in raw_input_contents")
    values = getattr(contents, field)
    count = _element_count(name, shape)
    if len(values) != count:
        raise InvalidArgument(f"input '{name}': shape {shape_text(shape)} needs {count} elements, "
                              f"got {len(values)} in contents.{field}")
    return InputTensor(name, datatype, shape, np.asarray(values, dtype).reshape(shape))


def _dtype_of(name: str, datatype: str) -> np.dtype:
    dtype = NUMPY_DTYPES.get(datatype)
    if dtype is None:
        raise InvalidArgument(f"input '{name}': datatype '{datatype}' is not supported "
                              f"(supported: {', '.join(NUMPY_DTYPES)})")
    return dtype


def _element_count(name: str, shape: tuple[int, ...]) -> int:
    if any(d < 0 for d in shape):
        raise InvalidArgument(f"input '{name}': shape {shape_text(shape)} has a negative dimension")
    return math.prod(shape)


class BoundInputs:
    """A request's inputs in the model's input order, with its row count and batching key."""

    __slots__ = ("arrays", "rows", "key")

    def __init__(self, arrays: list[np.ndarray], rows: int, key: object) -> None:
        self.arrays = arrays
        self.rows = rows
        self.key = key


def bind_inputs(signature: ModelSignature, tensors: Sequence[InputTensor], model: str) -> BoundInputs:
    """Check `tensors` against the model's inputs; return them ordered, with the batch rows."""
    specs = signature.inputs
    if len(tensors) == 1 and len(specs) == 1 and tensors[0].name == specs[0].name:
        ordered: Sequence[InputTensor] = tensors
    else:
        ordered = _match_names(specs, tensors, model)
    rows = 1
    batched = signature.max_batch_size > 0
    for spec, tensor in zip(specs, ordered):
        _check_tensor(spec, tensor)
    if batched:
        rows = _batch_rows(specs, ordered, signature.max_batch_size)
    key = tuple(t.shape[1:] for t in ordered) if signature.needs_batch_key else None
    return BoundInputs([t.array for t in ordered], rows, key)


def _match_names(specs: Sequence[TensorSpec], tensors: Sequence[InputTensor], model: str) -> list[InputTensor]:
    by_name: dict[str, InputTensor] = {}
    for tensor in tensors:
        if tensor.name in by_name:
            raise InvalidArgument(f"input '{tensor.name}' appears more than once")
        by_name[tensor.name] = tensor
    expected = [spec.name for spec in specs]
    missing = [name for name in expected if name not in by_name]
    if missing:
        raise InvalidArgument(f"missing input {', '.join(repr(n) for n in missing)} for model '{model}' "
                              f"(expects: {', '.join(expected)})")
    extra = [name for name in by_name if name not in expected]
    if extra:
        raise InvalidArgument(f"unexpected input {', '.join(repr(n) for n in extra)} for model '{model}' "
                              f"(expects: {', '.join(expected)})")
    return [by_name[name] for name in expected]


def _check_tensor(spec: TensorSpec, tensor: InputTensor) -> None:
    if tensor.datatype != spec.datatype:
        raise InvalidArgument(f"input '{spec.name}': expected datatype {spec.datatype}, got {tensor.datatype}")
    shape = tensor.shape
    if len(shape) != len(spec.shape) or any(e >= 0 and d != e for d, e in zip(shape, spec.shape)):
        raise InvalidArgument(f"input '{spec.name}': expected shape {shape_text(spec.shape)}, "
                              f"got {shape_text(shape)}")


def _batch_rows(specs: Sequence[TensorSpec], tensors: Sequence[InputTensor], max_batch_size: int) -> int:
    rows = tensors[0].shape[0]
    for spec, tensor in zip(specs, tensors):
        if tensor.shape[0] != rows:
            raise InvalidArgument(f"input '{spec.name}': batch size {tensor.shape[0]} differs from input "
                                  f"'{specs[0].name}' batch size {rows}")
    if rows < 1:
        raise InvalidArgument(f"input '{specs[0].name}': batch size must be at least 1, got {rows}")
    if rows > max_batch_size:
        raise InvalidArgument(f"input '{specs[0].name}': batch size {rows} exceeds max_batch_size {max_batch_size}")
    return rows
