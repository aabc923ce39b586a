"""The platform commands of the `splitstack` console script against a real local stack.

One stack per module (NATS, registry, trainer, converter as real processes in a temporary state
dir; serving joins after the first promotion, following the test model's production alias), one
short training; the tests run in file order and build on each other, as a user's session would.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from splitstack.client import stack
from splitstack.client.demo.data import digits_split
from splitstack.client.demo.environment import WITHOUT_SERVING, write_demo_stack_file
from splitstack.client.stackfile import StackPaths, find_project_root

CONSOLE_SCRIPT = Path(sys.executable).parent / "splitstack"
MODEL, DATASET = "clidigits", "clidata"
ROOT = find_project_root(Path(__file__).resolve().parent)


def splitstack(*args: str, paths: StackPaths | None = None, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run the console script (with the stack's location flags when `paths` is given)."""
    flags = ["--state-dir", str(paths.state_dir), "--stack-file", str(paths.stack_file)] if paths else []
    env = {**os.environ, "COLUMNS": "220"}
    env.pop("SPLITSTACK_STATE_DIR", None)
    env.pop("SPLITSTACK_STACK_FILE", None)
    return subprocess.run([str(CONSOLE_SCRIPT), *args, *flags], capture_output=True, text=True, env=env,
                          timeout=timeout)


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert "Traceback" not in result.stderr, result.stderr
    return result.stdout


def one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 1, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    assert result.stderr.startswith("splitstack: error: ") and len(result.stderr.splitlines()) == 1, result.stderr
    return result.stderr.strip()


@pytest.fixture(scope="module")
def paths(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StackPaths]:
    assert ROOT is not None
    state_dir = tmp_path_factory.mktemp("cli") / "state"
    state_dir.mkdir()
    stack_paths = StackPaths(state_dir, write_demo_stack_file(ROOT / "deploy/local/stack.toml", state_dir, MODEL))
    try:
        stack.up(stack_paths, only=WITHOUT_SERVING)
        yield stack_paths
    finally:
        stack.down(stack_paths, stop_timeout=5)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    work = tmp_path_factory.mktemp("files")
    data = digits_split()
    rows = data.holdout.inputs[:3]
    np.save(work / "rows.npy", rows)
    (work / "rows.json").write_text(json.dumps(rows.tolist()))
    (work / "bad.json").write_text(json.dumps({"model": MODEL, "no_such_field": 1}))
    (work / "spec.toml").write_text(f'model = "{MODEL}"\ndataset = "{DATASET}"\nrecipe = "digits-mlp"\n'
                                    f'max_epochs = 2\n[hyperparameters]\nhidden = 32\nlayers = 1\n')
    return {"data": data.first.write(work / "digits.npz"), "npy": work / "rows.npy", "json": work / "rows.json",
            "bad_spec": work / "bad.json", "spec": work / "spec.toml", "labels": data.holdout.labels[:3]}


def test_data_publish_and_list(paths: StackPaths, files: dict[str, Path]) -> None:
    published = ok(splitstack("data", "publish", DATASET, str(files["data"]), "--metadata", "origin=test",
                              paths=paths))
    assert published.startswith(f"published {DATASET} version 1: {len(np.load(files['data'])['labels'])} rows")
    assert DATASET in ok(splitstack("data", "list", paths=paths))
    versions = json.loads(ok(splitstack("data", "list", DATASET, "--json", paths=paths)))
    assert [(v["version"], v["metadata"]) for v in versions] == [(1, {"origin": "test"})]


def test_train_from_a_spec_file_follows_the_job(paths: StackPaths, files: dict[str, Path]) -> None:
    out = ok(splitstack("train", "--spec", str(files["spec"]), "--target", "cpu", "--promotion", "manual",
                        paths=paths))
    assert out.startswith("submitted job ")
    last = out.strip().splitlines()[-1]
    assert "SUCCEEDED" in last and f"{MODEL} version 1 (" in last and "accuracy=" in last, out


def test_jobs_lists_the_finished_job(paths: StackPaths) -> None:
    jobs = json.loads(ok(splitstack("jobs", "--model", MODEL, "--json", paths=paths)))
    assert [(j["state"], j["model_version"], j["spec"]["dataset"]) for j in jobs] == [("SUCCEEDED", 1, DATASET)]
    table = ok(splitstack("jobs", "--state", "succeeded", paths=paths))
    assert jobs[0]["id"] in table and MODEL in table


def test_convert_waits_and_shows_gate_and_profile(paths: StackPaths) -> None:
    out = ok(splitstack("convert", MODEL, "1", "--target", "cpu", paths=paths))
    assert "ONNX_FP32" in out and "ONNX_INT8" in out and "passed" in out, out
    assert f"serving choice for {MODEL} version 1 on cpu: ONNX_" in out
    choice = json.loads(ok(splitstack("convert", MODEL, "1", "--json", paths=paths)))
    assert {c["format"] for c in choice["candidates"]} >= {"ONNX_FP32", "ONNX_INT8"}
    assert all(c["profile"]["points"] for c in choice["candidates"] if c.get("accepted"))


def test_models_versions_artifacts_lineage(paths: StackPaths) -> None:
    models = ok(splitstack("models", paths=paths))
    assert MODEL in models and "MANUAL" in models
    versions = ok(splitstack("versions", MODEL, paths=paths))
    assert f"{DATASET}@1" in versions and "accuracy=" in versions and "cpu:ONNX_" in versions
    decision = json.loads(ok(splitstack("versions", MODEL, "--json", paths=paths)))["versions"][0].get("promotion")
    assert decision is None or decision["outcome"] == "RECORDED", decision
    artifacts = ok(splitstack("artifacts", MODEL, "1", paths=paths))
    assert all(kind in artifacts for kind in ("CHECKPOINT", "EXPORTED_PROGRAM", "SAMPLE", "ONNX")), artifacts
    lineage = ok(splitstack("lineage", MODEL, "1", paths=paths))
    assert f"{MODEL} version 1 (READY)" in lineage and f"{DATASET}@1" in lineage and "hidden=32" in lineage


def test_promote_then_serving_predicts(paths: StackPaths, files: dict[str, Path]) -> None:
    promoted = ok(splitstack("promote", MODEL, "1", "--reason", "first version", paths=paths))
    assert promoted.strip() == f"{MODEL}: production -> version 1 (first version)"
    stack.up(paths)   # serving follows MODEL@production: ready once version 1 is loaded
    table = ok(splitstack("predict", MODEL, "--input", str(files["npy"]), paths=paths))
    assert "logits argmax" in table and len([ln for ln in table.splitlines() if ln.startswith("│ 2")]) == 1, table
    from_json = json.loads(ok(splitstack("predict", MODEL, "--input", str(files["json"]), "--json", paths=paths)))
    from_npy = json.loads(ok(splitstack("predict", MODEL, "--input", str(files["npy"]), "--json", paths=paths)))
    assert np.asarray(from_json["logits"]).shape == (3, 10)
    assert np.allclose(from_json["logits"], from_npy["logits"], atol=1e-5)


def test_rollback_without_an_earlier_version_is_one_line(paths: StackPaths) -> None:
    error = one_line_error(splitstack("rollback", MODEL, "--reason", "oops", paths=paths))
    assert error.startswith("splitstack: error: registry: FAILED_PRECONDITION: ")
    history = ok(splitstack("aliases", MODEL, "--history", paths=paths))
    assert "production" in history and "first version" in history


def test_events_tail_replays_and_stops_after_count(paths: StackPaths) -> None:
    out = ok(splitstack("events", "tail", f"model.registered.{MODEL}", f"model.promoted.{MODEL}.>", "--since-start",
                        "--count", "2", paths=paths, timeout=60))
    lines = out.strip().splitlines()
    assert sorted(line.split()[1] for line in lines) == [f"model.promoted.{MODEL}.production",
                                                         f"model.registered.{MODEL}"], out
    records = ok(splitstack("events", "tail", f"model.promoted.{MODEL}.>", "--since-start", "--count", "1",
                            "--json", paths=paths, timeout=60))
    event = json.loads(records)
    assert event["subject"] == f"model.promoted.{MODEL}.production" and event["payload"]["version"] == 1
    assert event["producer"].startswith("registry/")


def test_service_errors_are_one_line(paths: StackPaths, files: dict[str, Path]) -> None:
    missing = one_line_error(splitstack("versions", "no-such-model", paths=paths))
    assert missing.startswith("splitstack: error: registry: NOT_FOUND: ") and "no-such-model" in missing
    bad_spec = one_line_error(splitstack("train", "--spec", str(files["bad_spec"]), paths=paths))
    assert "no_such_field" in bad_spec
    refused = one_line_error(splitstack("train", "--model", MODEL, "--dataset", DATASET, "--recipe", "no-such",
                                        paths=paths))
    assert refused.startswith("splitstack: error: trainer: INVALID_ARGUMENT: ") and "no-such" in refused
    no_file = one_line_error(splitstack("predict", MODEL, "--input", "/nonexistent.npy", paths=paths))
    assert "/nonexistent.npy" in no_file
    unreachable = one_line_error(splitstack("models", "--registry", "127.0.0.1:9", "--rpc-timeout", "2"))
    assert unreachable.startswith("splitstack: error: registry: UNAVAILABLE: ") or "DEADLINE_EXCEEDED" in unreachable
