"""Profiling in a fresh child process, so the numbers belong to the candidate alone.

A long-lived service process reuses memory its earlier work freed (a second session of the same
model does not grow the resident set) and shares the interpreter with the event loop. The child
(`python -m splitstack_converter.pipeline.profile_worker SPEC`) loads only the candidate, measures
it with `profile.profile_candidate` and writes the MeasuredProfile as JSON to the spec's output.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

import numpy as np
from google.protobuf import json_format

from splitstack.common.v1 import common_pb2
from splitstack_converter.pipeline.profile import Floors, profile_candidate
from splitstack_converter.pipeline.runners import OrtOptions, open_runner

TIMEOUT_MARGIN_SECONDS = 120.0


def measure_in_subprocess(fmt: int, model_path: Path, inputs: np.ndarray, batches: list[int], floors: Floors,
                          ort: OrtOptions, *, target: str, device: str) -> common_pb2.MeasuredProfile:
    """Run the profile of one candidate in a child process; RuntimeError with its stderr on failure."""
    with tempfile.TemporaryDirectory(prefix="profile-") as scratch:
        root = Path(scratch)
        np.save(root / "inputs.npy", inputs)
        spec = {"format": fmt, "model": str(model_path), "inputs": str(root / "inputs.npy"), "batches": batches,
                "floors": asdict(floors), "ort": asdict(ort), "target": target, "device": device,
                "output": str(root / "profile.json")}
        (root / "spec.json").write_text(json.dumps(spec))
        budget = TIMEOUT_MARGIN_SECONDS + len(batches) * (floors.min_seconds * 4 + 10)
        result = subprocess.run([sys.executable, "-m", __name__, str(root / "spec.json")], capture_output=True,
                                text=True, timeout=budget, check=False)
        if result.returncode != 0:
            raise RuntimeError(f"profiling process exited with {result.returncode}: {result.stderr.strip()[-1000:]}")
        return json_format.Parse((root / "profile.json").read_text(), common_pb2.MeasuredProfile())


def main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    inputs = np.load(spec["inputs"])
    ort = OrtOptions(**spec["ort"])
    profile = profile_candidate(lambda: open_runner(spec["format"], Path(spec["model"]), ort), inputs,
                                spec["batches"], Floors(**spec["floors"]), target=spec["target"],
                                device=spec["device"])
    Path(spec["output"]).write_text(json_format.MessageToJson(profile))


if __name__ == "__main__":
    main(sys.argv[1])
