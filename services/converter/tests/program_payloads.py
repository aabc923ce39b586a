"""Hostile exported programs: a real `torch.export.save` archive with a pickle planted where
`torch.export.load` unpickles it.

Every .pt2 of torch 2.13 holds its example inputs as a `torch.save` file
(`<root>/data/sample_inputs/<model>.pt`). The loader reads it with `torch.load(weights_only=True)`
and, when that fails, tries again with `weights_only=False`: full unpickling, which calls whatever
a pickle's `__reduce__` names. The payloads below replace that file.
"""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import torch

SAMPLE_INPUTS_PART = "/data/sample_inputs/"

# Runs in whatever process unpickles it: records that process's environment and confinement.
SPY_CODE = """
import json, os, resource, sys
json.dump({"pid": os.getpid(), "ppid": os.getppid(), "cwd": os.getcwd(), "env": dict(os.environ),
           "isolated": sys.flags.isolated, "safe_path": sys.flags.safe_path,
           "rlimit_as": resource.getrlimit(resource.RLIMIT_AS)[0], "sys_path": sys.path},
          open(MARKER, "w"))
"""

# Records its pid, then sleeps far past any time limit.
SLEEPER_CODE = """
import os, time
open(MARKER, "w").write(str(os.getpid()))
time.sleep(3600)
"""


class Exec:
    """Unpickles to `exec(code)` with MARKER bound to a path (the result, None, is no tensor)."""

    def __init__(self, code: str, marker: Path) -> None:
        self.source = f"MARKER = {str(marker)!r}\n{code}"

    def __reduce__(self) -> tuple:
        return exec, (self.source,)


class Abort:
    """Unpickles to `os.abort()`: the process dies of SIGABRT."""

    def __reduce__(self) -> tuple:
        import os

        return os.abort, ()


class Hog:
    """Unpickles to a `bytearray` of `size` bytes (far above the converter's memory limit)."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __reduce__(self) -> tuple:
        return bytearray, (self.size,)


def plant(program: bytes, payload: object) -> bytes:
    """`program` (a .pt2) with its example inputs replaced by `payload`, pickled by torch.save."""
    pickled = io.BytesIO()
    torch.save(payload, pickled)
    source, out = zipfile.ZipFile(io.BytesIO(program)), io.BytesIO()
    planted = 0
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_STORED) as target:
        for info in source.infolist():
            data = source.read(info)
            if SAMPLE_INPUTS_PART in info.filename and info.filename.endswith(".pt"):
                data, planted = pickled.getvalue(), planted + 1
            target.writestr(info, data)
    if planted != 1:
        raise AssertionError(f"expected one example-inputs file in the archive, found {planted}: "
                             f"{source.namelist()}")
    return out.getvalue()
