"""Support of the SDK tests: a real local stack from the shipped stack file, digits data, raw registry writes.

`LocalStack` starts the stack with the client's own supervisor (`splitstack.client.stack.up`) into
a temporary state dir, from a stack file derived from `deploy/local/stack.toml`: the same services
and settings, with shorter converter measurements and the serving models given by the test.
"""

from __future__ import annotations

import hashlib
import io
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
from sklearn.datasets import load_digits

from stack_support import processes_of, toml_value

from splitstack.client import stack
from splitstack.client.stackfile import StackPaths, find_project_root
from splitstack.common.v1 import common_pb2 as common
from splitstack.contracts import handoff
from splitstack.registry.v1 import registry_pb2 as rpb
from splitstack.registry.v1 import registry_pb2_grpc

RPC_TIMEOUT_SECONDS = 60.0
# Enough runs for real numbers, few enough for a test (the service defaults take ~2 s per point).
FAST_CONVERTER = {"SPLITSTACK_CONVERTER_PROFILE_MIN_RUNS": "50", "SPLITSTACK_CONVERTER_PROFILE_MIN_SECONDS": "0.2",
                  "SPLITSTACK_CONVERTER_PROFILE_WARMUP_RUNS": "5"}
SERVICES = ("registry", "trainer", "converter", "serving")


def shipped_stack_file() -> Path:
    root = find_project_root(Path(__file__).resolve().parent)
    assert root is not None, "the tests run inside the splitstack checkout"
    return root / "deploy/local/stack.toml"


def write_stack_file(path: Path, serving_models: str | None = None) -> Path:
    """The shipped stack file with fast converter measurements and `serving_models` followed."""
    doc = tomllib.loads(shipped_stack_file().read_text())
    services = doc["services"]
    assert set(SERVICES) <= set(services), f"the shipped stack file lacks services: {sorted(services)}"
    services["converter"].setdefault("env", {}).update(FAST_CONVERTER)
    if serving_models:
        services["serving"].setdefault("env", {})["SPLITSTACK_SERVING_MODELS"] = serving_models
    lines = ["[nats]", *(f"{k} = {toml_value(v)}" for k, v in doc.get("nats", {}).items())]
    for name, table in services.items():
        lines += ["", f"[services.{name}]", *(f"{k} = {toml_value(v)}" for k, v in table.items())]
    path.write_text("\n".join(lines) + "\n")
    return path


@dataclass
class LocalStack:
    """A local stack in a temporary state dir; `up(serving_models)` (re)starts what changed."""

    root: Path

    @property
    def paths(self) -> StackPaths:
        return StackPaths(self.root / "state", self.root / "stack.toml")

    def up(self, serving_models: str | None = None) -> stack.StackState:
        write_stack_file(self.root / "stack.toml", serving_models)
        state = stack.up(self.paths)
        missing = [s for s in SERVICES if s not in state.components]
        assert not missing, f"services not installed: {missing} (skipped: {state.skipped})"
        return state

    def down(self) -> None:
        stack.down(self.paths, stop_timeout=10)
        deadline = time.monotonic() + 15   # job ranks die with their trainer (PR_SET_PDEATHSIG), a moment later
        while (left := processes_of(self.paths.state_dir)) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert left == [], f"processes of {self.paths.state_dir} still running after down: {left}"

    def log_files(self) -> list[tuple[str, Path]]:
        logs = [(name, self.paths.log_file(name)) for name in ("nats", *SERVICES)]
        jobs = sorted((self.paths.state_dir / "trainer" / "jobs").glob("**/rank-*.log"))
        return logs + [(f"job {p.parent.name} {p.name}", p) for p in jobs]


def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled digits as the recipes read them: inputs N x 64 in [0, 1], labels."""
    data = load_digits()
    return (data.data / 16.0).astype(np.float32), data.target.astype(np.int64)


def write_digits(path: Path, rows: int | None = None, seed: int = 0) -> Path:
    inputs, labels = digits_arrays()
    if rows is not None:
        order = np.random.default_rng(seed).permutation(len(inputs))[:rows]
        inputs, labels = inputs[order], labels[order]
    np.savez(path, inputs=inputs, labels=labels)
    return path


# ---- registry writes the SDK does not offer (a hand-off made by hand) -------------------------

def _upload(header: rpb.ArtifactHeader, data: bytes) -> Iterator[rpb.UploadArtifactRequest]:
    yield rpb.UploadArtifactRequest(header=header)
    yield rpb.UploadArtifactRequest(chunk=data)


def download_artifact(address: str, sha256: str) -> bytes:
    with grpc.insecure_channel(address) as channel:
        parts = registry_pb2_grpc.RegistryStub(channel).DownloadArtifact(
            rpb.DownloadArtifactRequest(sha256=sha256), timeout=RPC_TIMEOUT_SECONDS)
        return b"".join(part.chunk for part in parts if part.WhichOneof("part") == "chunk")


def register_by_hand(address: str, model: str, program: bytes, sample: bytes) -> int:
    """A READY version of `model` (required on cpu) from the given hand-off files; the registry
    announces model.registered, so the cpu converter pool converts it."""
    accuracy = common.PrimaryMetric(name="accuracy", direction=common.MAXIMIZE)
    with grpc.insecure_channel(address) as channel:
        stub = registry_pb2_grpc.RegistryStub(channel)
        stub.CreateModel(rpb.CreateModelRequest(model=rpb.Model(name=model, required_targets=["cpu"],
                                                                primary_metric=accuracy)), timeout=RPC_TIMEOUT_SECONDS)
        version = stub.CreateVersion(rpb.CreateVersionRequest(
            model=model, idempotency_key=f"by-hand-{model}", lineage=rpb.Lineage(primary_metric=accuracy),
            signature=handoff.signature([64], 10)), timeout=RPC_TIMEOUT_SECONDS).version
        for kind, data, filename in ((common.EXPORTED_PROGRAM, program, handoff.EXPORTED_PROGRAM_FILENAME),
                                     (common.SAMPLE, sample, handoff.SAMPLE_FILENAME)):
            header = rpb.ArtifactHeader(model=model, version=version, kind=kind, precision=common.PRECISION_FP32,
                                        sha256=hashlib.sha256(data).hexdigest(), size_bytes=len(data),
                                        filename=filename)
            stub.UploadArtifact(_upload(header, data), timeout=RPC_TIMEOUT_SECONDS)
        stub.FinalizeVersion(rpb.FinalizeVersionRequest(model=model, version=version), timeout=RPC_TIMEOUT_SECONDS)
    return version


def npz_bytes(**arrays: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()
