"""`splitstack demo` end to end, as `make demo` runs it: a real stack, two trainings, a hot swap under load.

Takes about 2-3 minutes on 2 cores. Asserts on the summary it prints and on the `summary.json` it
writes with the same numbers, and that nothing of its stack is left running.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # stack_support: beside this file

from stack_support import processes_of  # noqa: E402

CONSOLE_SCRIPT = Path(sys.executable).parent / "splitstack"


@pytest.mark.timeout(900)   # a few minutes; longer on a loaded machine
def test_demo_runs_end_to_end_and_swaps_without_failures(tmp_path: Path) -> None:
    state_dir = tmp_path / "demo"
    env = {**os.environ, "COLUMNS": "200"}
    env.pop("SPLITSTACK_STATE_DIR", None)
    began = time.monotonic()
    result = subprocess.run([str(CONSOLE_SCRIPT), "demo", "--state-dir", str(state_dir)], capture_output=True,
                            text=True, env=env, timeout=900, cwd=Path(__file__).resolve().parent)
    wall = time.monotonic() - began
    assert result.returncode == 0, f"stdout:\n{result.stdout[-6000:]}\nstderr:\n{result.stderr[-4000:]}"
    out = result.stdout
    assert processes_of(state_dir) == [], "the demo left processes running"

    summary = json.loads((state_dir / "summary.json").read_text())
    first, second = summary["versions"]
    assert (first["version"], second["version"]) == (1, 2)
    assert first["dataset_rows"] < second["dataset_rows"] and second["started_by"] == "retrain policy"
    assert summary["promoted_version"] == 2 and summary["served_version"] == 2
    assert summary["swap_requests"] > 50 and summary["swap_failures"] == 0, summary["swap_errors"]
    assert 0 < summary["client_p50_ms"] <= summary["client_p99_ms"]
    for version in (first, second):
        assert version["train_seconds"] > 0 and version["val_accuracy"] > 0.8
        assert version["holdout_accuracy"] > 0.8 and version["serving_format"].startswith("ONNX_")
        formats = {c["format"]: c for c in version["candidates"]}
        assert formats["ONNX_FP32"]["accepted"] and formats["ONNX_FP32"]["p50_ms"] > 0
        assert "ONNX_INT8" in formats and formats["ONNX_INT8"]["accuracy"] > 0.8
        assert version["promotion"] != "-"
    assert "splitstack demo: digits" in out and "held-out acc. (OIP)" in out
    assert f"client during the swap: {summary['swap_requests']} requests, 0 failed" in out
    assert wall < 600, f"the demo took {wall:.0f} s"
