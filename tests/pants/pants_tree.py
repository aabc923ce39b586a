"""Copies of the repo for Pants to judge, and Pants runs in them with the tools bootstrapped here."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PANTS = ROOT / "tools" / "pants.sh"
UNSUPPORTED = 3  # tools/pants.sh: this machine cannot run Pants (its message says why)
# Never copied: venvs, Pants' own state, build output, generated protobuf modules, caches.
SKIPPED = (".git", ".venv", ".pants-venv", ".pants-tools", ".pants.d", "dist", "state", ".bench",
           "__pycache__", "*.egg-info", "*_pb2.py", "*_pb2.pyi", "*_pb2_grpc.py", ".generated")
# The source folders the visibility tests break and check.
CHECKED = ("services/serving/src::", "libs/chassis/src::", "libs/client/src::")

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PantsRun:
    """One finished Pants invocation."""

    returncode: int
    output: str  # stdout and stderr together


def bootstrap() -> str | None:
    """Bootstraps Pants on this machine; returns why it cannot run here, or None when it can."""
    result = subprocess.run([str(PANTS), "--bootstrap-only"], capture_output=True, text=True,
                            timeout=1200)
    if result.returncode == UNSUPPORTED:
        return result.stderr.strip()
    assert result.returncode == 0, f"tools/pants.sh --bootstrap-only failed:\n{result.stderr}"
    return None


def copy_repo(destination: Path) -> Path:
    """A copy of the working tree (sources, BUILD files, pants.toml) as a clean clone would have it."""
    shutil.copytree(ROOT, destination, ignore=shutil.ignore_patterns(*SKIPPED), symlinks=True)
    return destination


def run_pants(buildroot: Path, *args: str) -> PantsRun:
    """Runs `pants <args>` with `buildroot` as the build root and this repo's bootstrapped tools."""
    env = {**os.environ, "SPLITSTACK_PANTS_BUILDROOT": str(buildroot)}
    log.info("pants %s in %s", " ".join(args), buildroot)
    result = subprocess.run([str(PANTS), *args], env=env, capture_output=True, text=True,
                            timeout=900)
    return PantsRun(result.returncode, result.stdout + result.stderr)
