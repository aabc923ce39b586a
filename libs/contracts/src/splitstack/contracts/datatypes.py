"""Tensor datatypes of the Open Inference Protocol, as both ends of the wire read them.

The protocol names datatypes ("FP32", "INT64"...); `NUMPY_DTYPE_NAMES` gives the numpy dtype each
one carries (every datatype splitstack serves; BYTES and BF16 are not), and `CONTENTS_FIELDS` the
typed `InferTensorContents` field a tensor of that datatype may use when raw contents are absent
(FP16 has none: it travels only as raw contents). Serving and the client SDK both build their
numpy tables from these, so the two cannot drift apart. Names, not numpy objects: contracts stay
free of numpy.
"""

from __future__ import annotations

NUMPY_DTYPE_NAMES: dict[str, str] = {
    "BOOL": "bool", "UINT8": "uint8", "UINT16": "uint16", "UINT32": "uint32", "UINT64": "uint64",
    "INT8": "int8", "INT16": "int16", "INT32": "int32", "INT64": "int64",
    "FP16": "float16", "FP32": "float32", "FP64": "float64",
}

CONTENTS_FIELDS: dict[str, str] = {
    "BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
    "INT64": "int64_contents", "UINT8": "uint_contents", "UINT16": "uint_contents",
    "UINT32": "uint_contents", "UINT64": "uint64_contents", "FP32": "fp32_contents", "FP64": "fp64_contents",
}
