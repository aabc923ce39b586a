"""What the client's tests of local stacks share: writing stack files and finding leftover processes."""

from __future__ import annotations

import json
import os
from pathlib import Path

from splitstack.client.processes import process_start_time


def toml_value(value: object) -> str:
    """Enough TOML for a stack file (JSON strings are TOML basic strings)."""
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + " }"
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return json.dumps(value)


def processes_of(state_dir: Path) -> list[int]:
    """Live processes (zombies excluded) whose command line or environment mentions `state_dir`."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            if process_start_time(int(proc.name)) is None:
                continue
            text = (proc / "cmdline").read_bytes() + (proc / "environ").read_bytes()
        except OSError:
            continue
        if str(state_dir).encode() in text:
            found.append(int(proc.name))
    return found
