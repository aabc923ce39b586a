"""Crash points: unarmed they do nothing; armed they SIGKILL the process at the chosen hit."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from splitstack.chassis import faults
from splitstack.chassis.faults import (
    MARKER_DIR_ENV, POINTS_ENV, crash_env, crash_point, crash_point_hit, parse_crash_points,
)

# A child that announces each hit (flushed) before reaching the point, then exits cleanly.
CHILD = """
import sys
from splitstack.chassis.faults import crash_point
for i in range(1, 4):
    print(f"before {i}", flush=True)
    crash_point("test.point")
print("survived", flush=True)
"""


def run_child(env_extra: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in (POINTS_ENV, MARKER_DIR_ENV)}
    return subprocess.run([sys.executable, "-c", CHILD], env={**env, **env_extra}, cwd=cwd,
                          capture_output=True, text=True, timeout=60)


def test_unarmed_crash_point_does_nothing_and_costs_little(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(POINTS_ENV, raising=False)
    faults.armed_crash_points.cache_clear()
    try:
        started = time.perf_counter()
        for _ in range(100_000):
            crash_point("test.point")
        elapsed = time.perf_counter() - started
    finally:
        faults.armed_crash_points.cache_clear()
    assert elapsed < 2.0, f"100k unarmed crash points took {elapsed:.2f}s"


def test_point_armed_for_second_hit_kills_on_second_hit(tmp_path: Path) -> None:
    result = run_child(crash_env(["test.point@2"], tmp_path), tmp_path)
    assert result.returncode == -signal.SIGKILL, result.stderr
    assert result.stdout.split() == ["before", "1", "before", "2"]
    assert crash_point_hit(tmp_path, "test.point")
    assert (tmp_path / "test.point").read_text().endswith("hit=2\n")


def test_other_points_armed_leave_this_one_alone(tmp_path: Path) -> None:
    result = run_child(crash_env(["test.other", "registry.after_commit@3"], tmp_path), tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == "survived"
    assert not crash_point_hit(tmp_path, "test.point")
    assert not crash_point_hit(tmp_path, "test.other")


def test_marker_goes_to_working_directory_without_marker_dir(tmp_path: Path) -> None:
    result = run_child({POINTS_ENV: "test.point"}, tmp_path)
    assert result.returncode == -signal.SIGKILL, result.stderr
    assert result.stdout.split() == ["before", "1"]
    assert crash_point_hit(tmp_path, "test.point")


def test_point_reached_fewer_times_than_armed_does_not_crash(tmp_path: Path) -> None:
    result = run_child(crash_env(["test.point@4"], tmp_path), tmp_path)
    assert result.returncode == 0, result.stderr
    assert not crash_point_hit(tmp_path, "test.point")


def test_crash_env_and_specs_are_validated(tmp_path: Path) -> None:
    assert crash_env(["a.b@2", "c"], tmp_path) == {POINTS_ENV: "a.b@2,c", MARKER_DIR_ENV: str(tmp_path)}
    assert parse_crash_points(" outbox.after_publish , x-y_z@10 ,") == {"outbox.after_publish": 1, "x-y_z": 10}
    for bad in (["Upper"], ["a/b"], [".hidden"], ["a@0"], ["a@x"], ["a", "a@2"]):
        with pytest.raises(ValueError):
            crash_env(bad, tmp_path)
    with pytest.raises(ValueError, match="not a valid name"):
        crash_point("no spaces allowed")
