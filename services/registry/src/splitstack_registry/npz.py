"""What a dataset upload must be before it is stored: a plain, intact `.npz` of bounded size.

The registry inspects the verified spool file (blobs.put_verified's `inspect`) without loading an
array into memory, and refuses with INVALID_ARGUMENT, naming what is wrong, anything that
`np.load(path, allow_pickle=False)` in the trainer could not read safely:

- not a zip archive, or a truncated or corrupt one (no central directory, bad local headers);
- members that are encrypted, compressed other than stored/deflated (what numpy writes), not
  `.npy` files, directories, or listed twice; more than `MAX_ARRAYS` members; none at all;
- arrays whose declared sizes (the zip's uncompressed sizes) add up to more than the operator's
  `max_array_bytes`: checked before a byte is decompressed, so a zip bomb costs nothing;
- an `.npy` header that numpy cannot parse, a dtype holding Python objects (pickle), or a
  member whose size disagrees with its header's shape and dtype;
- a member whose bytes do not match its CRC-32 (every member is read through once, in chunks:
  zipfile stops at the declared size, so this reads at most `max_array_bytes`).

The row count is the length of `inputs`, else `x`, else of the first array.
"""

from __future__ import annotations

import math
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

from splitstack.chassis.errors import InvalidArgument

ROW_ARRAYS = ("inputs", "x")        # counted in preference to the first array
MAX_ARRAYS = 1024
NUMPY_COMPRESSION = {zipfile.ZIP_STORED: "stored", zipfile.ZIP_DEFLATED: "deflated"}
ENCRYPTED_FLAG = 0x1
READ_BYTES = 1024 * 1024
ARRAY_BYTES_KNOB = "SPLITSTACK_REGISTRY_MAX_DATASET_ARRAY_BYTES"
_ZIP_ERRORS = (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError, zlib.error, RuntimeError,
               NotImplementedError, ValueError, OverflowError)


@dataclass(frozen=True)
class ArrayHeader:
    """One array of an .npz, as its .npy header declares it."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype


def count_rows(path: Path, max_array_bytes: int) -> int:
    """Rows of the .npz at `path` after checking all of it: the length of `inputs`, `x`, or the first array."""
    arrays = inspect_npz(path, max_array_bytes)
    chosen = next((a for key in ROW_ARRAYS for a in arrays if a.name == key), arrays[0])
    if not chosen.shape:
        raise InvalidArgument(f"array {chosen.name!r} of the .npz is a scalar: it has no rows to count")
    return chosen.shape[0]


def inspect_npz(path: Path, max_array_bytes: int) -> list[ArrayHeader]:
    """Every array of the .npz at `path`, each checked as the module docstring says."""
    try:
        with zipfile.ZipFile(path) as archive:
            members = archive.infolist()
            _check_members(members, max_array_bytes)
            return [_check_array(archive, member) for member in members]
    except _ZIP_ERRORS as exc:
        raise InvalidArgument("dataset content is not an .npz (a readable zip of .npy arrays): "
                              f"{_reason(exc)}") from None


def _reason(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text if len(text) <= 200 else f"{text[:197]}..."


def _check_members(members: list[zipfile.ZipInfo], max_array_bytes: int) -> None:
    """Checks of the zip's directory alone (nothing is decompressed)."""
    if not members:
        raise InvalidArgument("dataset content is a zip archive without .npy arrays, not an .npz")
    if len(members) > MAX_ARRAYS:
        raise InvalidArgument(f"dataset .npz has {len(members)} members; at most {MAX_ARRAYS} arrays are allowed")
    seen: set[str] = set()
    for member in members:
        name = member.filename
        if member.flag_bits & ENCRYPTED_FLAG:
            raise InvalidArgument(f"dataset .npz member {name!r} is encrypted; an .npz holds plain arrays")
        if member.is_dir() or not name.endswith(".npy"):
            raise InvalidArgument(f"dataset .npz member {name!r} is not an .npy array")
        if member.compress_type not in NUMPY_COMPRESSION:
            raise InvalidArgument(f"dataset .npz member {name!r} uses zip compression method "
                                  f"{member.compress_type}; numpy writes stored or deflated members only")
        if name in seen:
            raise InvalidArgument(f"dataset .npz member {name!r} appears twice")
        seen.add(name)
    declared = sum(m.file_size for m in members)
    if declared > max_array_bytes:
        raise InvalidArgument(f"dataset .npz declares {declared} bytes of arrays uncompressed; at most "
                              f"{max_array_bytes} are allowed ({ARRAY_BYTES_KNOB})")


def _check_array(archive: zipfile.ZipFile, member: zipfile.ZipInfo) -> ArrayHeader:
    """Parse the member's .npy header, check it against the member's size, and read it through (CRC)."""
    name = member.filename
    with archive.open(member) as stream:
        shape, dtype = _npy_header(stream, name)
        data_bytes = math.prod(shape) * dtype.itemsize
        if stream.tell() + data_bytes != member.file_size:
            raise InvalidArgument(f"dataset .npz array {name[:-4]!r} declares shape {shape} of {dtype} "
                                  f"({data_bytes} bytes) but its member holds {member.file_size - stream.tell()} "
                                  "bytes of data")
        while stream.read(READ_BYTES):
            pass
    return ArrayHeader(name[:-4], shape, dtype)


def _npy_header(stream: BinaryIO, name: str) -> tuple[tuple[int, ...], np.dtype]:
    """The shape and dtype in an .npy header, read without loading the array; no object dtypes."""
    try:
        version = np.lib.format.read_magic(stream)
        if version == (1, 0):
            shape, _fortran, dtype = np.lib.format.read_array_header_1_0(stream)
        elif version == (2, 0):
            shape, _fortran, dtype = np.lib.format.read_array_header_2_0(stream)
        else:
            raise ValueError(f".npy format version {version[0]}.{version[1]} is not supported (1.0 or 2.0)")
    except (ValueError, OSError, SyntaxError, TypeError) as exc:
        raise InvalidArgument(f"dataset .npz member {name!r} is not a valid .npy array: {_reason(exc)}") from None
    if any(d < 0 for d in shape):
        raise InvalidArgument(f"dataset .npz array {name[:-4]!r} declares a negative dimension: {shape}")
    if dtype.hasobject:
        raise InvalidArgument(f"dataset .npz array {name[:-4]!r} holds Python objects (dtype {dtype}), which "
                              "only pickle can read; only plain numeric arrays are accepted")
    return tuple(int(d) for d in shape), dtype
