"""Tensors as the Open Inference Protocol names them, and what a loaded model expects of them.

Datatype names are the protocol's ("FP32", "INT64"...); `TensorSpec` and `ModelSignature`
describe a model's inputs and outputs (dim -1 = any size; a batchable model has -1 first).
`InputTensor` is one request input as it came (raw bytes or typed contents); `bind_inputs` checks
a request's inputs against a signature (names, datatypes, rank and dims as the model declares them,
no negative or zero dims, byte or element count) before anything is decoded, then decodes and
orders them. Every refusal is an InvalidArgument that names the tensor and says what was expected
and what came; names and shapes a client sends are cut in messages, so no input can make a huge
message or reach numpy with a shape it cannot hold.
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

# The numpy dtype of each typed contents field as protobuf carries it (before narrowing to the datatype).
WIRE_DTYPES: dict[str, np.dtype] = {
    "bool_contents": np.dtype(np.bool_), "int_contents": np.dtype(np.int32), "int64_contents": np.dtype(np.int64),
    "uint_contents": np.dtype(np.uint32), "uint64_contents": np.dtype(np.uint64),
    "fp32_contents": np.dtype(np.float32), "fp64_contents": np.dtype(np.float64),
}

# ONNX Runtime's type strings -> protocol datatype.
ORT_DATATYPES: dict[str, str] = {
    "tensor(bool)": "BOOL", "tensor(uint8)": "UINT8", "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32", "tensor(uint64)": "UINT64", "tensor(int8)": "INT8",
    "tensor(int16)": "INT16", "tensor(int32)": "INT32", "tensor(int64)": "INT64",
    "tensor(float16)": "FP16", "tensor(float)": "FP32", "tensor(double)": "FP64",
}


SHOWN_DIMS = 10        # dims a message prints of a shape
SHOWN_CHARACTERS = 64  # characters a message prints of a client's name
SHOWN_NAMES = 5        # names a message lists


def shape_text(shape: Sequence[int]) -> str:
    """[2, 64] as the messages print it (a long shape cut, with its rank)."""
    if len(shape) > SHOWN_DIMS:
        return "[" + ", ".join(str(d) for d in shape[:SHOWN_DIMS]) + f", ... ({len(shape)} dims)]"
    return "[" + ", ".join(str(d) for d in shape) + "]"


def shown(text: str) -> str:
    """A client's name quoted for a message, cut so a huge name cannot make a huge message."""
    if len(text) <= SHOWN_CHARACTERS:
        return repr(text)
    return f"{text[:SHOWN_CHARACTERS]!r}... ({len(text)} characters)"


def names_text(names: Sequence[str]) -> str:
    """Names quoted and listed, at most SHOWN_NAMES of them."""
    listed = ", ".join(shown(n) for n in names[:SHOWN_NAMES])
    return listed if len(names) <= SHOWN_NAMES else f"{listed} and {len(names) - SHOWN_NAMES} more"


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
        """Indices of the requested outputs, in request order (all outputs when none are named);
        each output may be requested once."""
        if not requested:
            return range(len(self.outputs))
        indices: list[int] = []
        for name in requested:
            index = self.output_index.get(name)
            if index is None:
                raise InvalidArgument(f"requested output {shown(name)} is not an output of model '{model}' "
                                      f"(outputs: {', '.join(self.output_index)})")
            if index in indices:
                raise InvalidArgument(f"output {shown(name)} is requested more than once")
            indices.append(index)
        return indices


class InputTensor:
    """One request input as it came: name, datatype, shape and its payload, not yet decoded.

    The payload is the raw little-endian bytes (`raw`) or the typed `InferTensorContents`
    (`contents`). Nothing is reshaped or converted until `bind_inputs` has checked the tensor
    against the model's input, so no shape a client sends can reach numpy unchecked."""

    __slots__ = ("name", "datatype", "shape", "raw", "contents")

    def __init__(self, name: str, datatype: str, shape: tuple[int, ...], raw: bytes | None = None,
                 contents: object = None) -> None:
        self.name = name
        self.datatype = datatype
        self.shape = shape
        self.raw = raw
        self.contents = contents


def raw_input(name: str, datatype: str, shape: tuple[int, ...], data: bytes) -> InputTensor:
    """An input carried in `raw_input_contents`."""
    return InputTensor(name, datatype, shape, raw=data)


def typed_input(name: str, datatype: str, shape: tuple[int, ...], contents: object) -> InputTensor:
    """An input carried in its typed `InferTensorContents` field."""
    return InputTensor(name, datatype, shape, contents=contents)


def decode(spec: TensorSpec, tensor: InputTensor) -> np.ndarray:
    """The input's elements as an array of its checked shape (zero-copy for raw contents)."""
    if tensor.raw is not None:
        return _decode_raw(spec, tensor)
    return _decode_typed(spec, tensor)


def _decode_raw(spec: TensorSpec, tensor: InputTensor) -> np.ndarray:
    count = math.prod(tensor.shape)
    expected = count * spec.dtype.itemsize
    data = tensor.raw
    if len(data) != expected:
        raise InvalidArgument(f"input {shown(tensor.name)}: shape {shape_text(tensor.shape)} of {tensor.datatype} "
                              f"needs {expected} bytes ({count} elements), got {len(data)} bytes")
    return np.frombuffer(data, spec.dtype).reshape(tensor.shape)


def _decode_typed(spec: TensorSpec, tensor: InputTensor) -> np.ndarray:
    field_name = CONTENTS_FIELDS.get(tensor.datatype)
    if field_name is None:
        raise InvalidArgument(f"input {shown(tensor.name)}: {tensor.datatype} has no typed contents field; "
                              "send it in raw_input_contents")
    values = getattr(tensor.contents, field_name)
    count = math.prod(tensor.shape)
    if len(values) != count:
        raise InvalidArgument(f"input {shown(tensor.name)}: shape {shape_text(tensor.shape)} needs {count} "
                              f"elements, got {len(values)} in contents.{field_name}")
    wide = np.asarray(values, WIRE_DTYPES[field_name])
    if spec.dtype.kind in "iu" and wide.size and wide.dtype != spec.dtype:
        _check_range(tensor, field_name, wide, spec.dtype)
    return wide.astype(spec.dtype, copy=False).reshape(tensor.shape)


def _check_range(tensor: InputTensor, field_name: str, wide: np.ndarray, dtype: np.dtype) -> None:
    """Integers sent in a wider protobuf field must fit the datatype (numpy would raise or wrap)."""
    info = np.iinfo(dtype)
    low, high = wide.min(), wide.max()
    if low < info.min or high > info.max:
        bad = low if low < info.min else high
        raise InvalidArgument(f"input {shown(tensor.name)}: contents.{field_name} holds {bad}, out of range for "
                              f"{tensor.datatype} [{info.min}, {info.max}]")


def _dtype_of(name: str, datatype: str) -> np.dtype:
    dtype = NUMPY_DTYPES.get(datatype)
    if dtype is None:
        raise InvalidArgument(f"input {shown(name)}: datatype {shown(datatype)} is not supported "
                              f"(supported: {', '.join(NUMPY_DTYPES)})")
    return dtype


class BoundInputs:
    """A request's inputs in the model's input order, with its row count and batching key."""

    __slots__ = ("arrays", "rows", "key")

    def __init__(self, arrays: list[np.ndarray], rows: int, key: object) -> None:
        self.arrays = arrays
        self.rows = rows
        self.key = key


def bind_inputs(signature: ModelSignature, tensors: Sequence[InputTensor], model: str) -> BoundInputs:
    """Check `tensors` against the model's inputs (names, datatypes, shapes, then sizes); return them
    decoded and ordered, with the batch rows. Every refusal is an InvalidArgument naming the tensor."""
    specs = signature.inputs
    if len(tensors) == 1 and len(specs) == 1 and tensors[0].name == specs[0].name:
        ordered: Sequence[InputTensor] = tensors
    else:
        ordered = _match_names(specs, tensors, model)
    for spec, tensor in zip(specs, ordered):
        _check_tensor(spec, tensor)
    rows = _batch_rows(specs, ordered, signature.max_batch_size) if signature.max_batch_size > 0 else 1
    arrays = [decode(spec, tensor) for spec, tensor in zip(specs, ordered)]
    key = tuple(t.shape[1:] for t in ordered) if signature.needs_batch_key else None
    return BoundInputs(arrays, rows, key)


def _match_names(specs: Sequence[TensorSpec], tensors: Sequence[InputTensor], model: str) -> list[InputTensor]:
    by_name: dict[str, InputTensor] = {}
    for tensor in tensors:
        if tensor.name in by_name:
            raise InvalidArgument(f"input {shown(tensor.name)} appears more than once")
        by_name[tensor.name] = tensor
    expected = [spec.name for spec in specs]
    missing = [name for name in expected if name not in by_name]
    if missing:
        raise InvalidArgument(f"missing input {names_text(missing)} for model '{model}' "
                              f"(expects: {', '.join(expected)})")
    extra = [name for name in by_name if name not in expected]
    if extra:
        raise InvalidArgument(f"unexpected input {names_text(extra)} for model '{model}' "
                              f"(expects: {', '.join(expected)})")
    return [by_name[name] for name in expected]


def _check_tensor(spec: TensorSpec, tensor: InputTensor) -> None:
    """Datatype, then shape: rank and fixed dims as declared, no negative dim, at least one element."""
    _dtype_of(spec.name, tensor.datatype)
    if tensor.datatype != spec.datatype:
        raise InvalidArgument(f"input '{spec.name}': expected datatype {spec.datatype}, got {tensor.datatype}")
    shape = tensor.shape
    if len(shape) != len(spec.shape) or any(e >= 0 and d != e for d, e in zip(shape, spec.shape)):
        raise InvalidArgument(f"input '{spec.name}': expected shape {shape_text(spec.shape)}, "
                              f"got {shape_text(shape)}")
    if any(d < 0 for d in shape):
        raise InvalidArgument(f"input '{spec.name}': shape {shape_text(shape)} has a negative dimension")
    if 0 in shape:
        raise InvalidArgument(f"input '{spec.name}': shape {shape_text(shape)} has no elements; "
                              "every dimension must be at least 1")


def _batch_rows(specs: Sequence[TensorSpec], tensors: Sequence[InputTensor], max_batch_size: int) -> int:
    rows = tensors[0].shape[0]
    for spec, tensor in zip(specs, tensors):
        if tensor.shape[0] != rows:
            raise InvalidArgument(f"input '{spec.name}': batch size {tensor.shape[0]} differs from input "
                                  f"'{specs[0].name}' batch size {rows}")
    if rows > max_batch_size:
        raise InvalidArgument(f"input '{specs[0].name}': batch size {rows} exceeds max_batch_size {max_batch_size}")
    return rows
