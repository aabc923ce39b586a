"""Test support for registry mode: a real `splitstack-registry` process, set-up through its API,
and the events stored in JetStream.

`RegistryProcess.start(...)` runs the registry (SQLite + a local artifact dir under its own
directory) against a given NATS URL, optionally on a fixed port so a test can restart it at the
same address. `ModelRegistry` registers servable versions the way the trainer and the converter
would: CreateModel, CreateVersion, EXPORTED_PROGRAM + SAMPLE, FinalizeVersion, then an ONNX
artifact and a serving choice per target; `promote` moves an alias. `stored_events` reads what a
stream holds on a subject (get-by-sequence, so tests see exactly what was published).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import json
import os
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import nats
import nats.js.errors
import numpy as np

from splitstack.chassis.testing.servers import NatsServer, find_binary, start_nats
from splitstack.common.v1 import common_pb2 as common
from splitstack.contracts.envelope import MSG_ID_HEADER, Event, unwrap
from splitstack.registry.v1 import registry_pb2 as pb
from splitstack.registry.v1 import registry_pb2_grpc

START_TIMEOUT_SECONDS = 60.0
RPC_TIMEOUT_SECONDS = 30.0
MIB = 1 << 20


@dataclass
class RegistryProcess:
    """A `splitstack-registry` child process on its own SQLite database and artifact directory."""

    proc: subprocess.Popen
    port: int
    root: Path
    log_path: Path

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @classmethod
    def start(cls, root: Path, nats_url: str, port: int = 0) -> RegistryProcess:
        """Start the registry and wait for its ready file (the log is in the error if it fails)."""
        root.mkdir(parents=True, exist_ok=True)
        ready_file = root / f"ready-{uuid.uuid4().hex[:6]}.json"
        log_path = root / "registry.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("SPLITSTACK_")}
        env.update({"SPLITSTACK_NATS_URL": nats_url, "SPLITSTACK_REGISTRY_GRPC_PORT": str(port),
                    "SPLITSTACK_REGISTRY_READY_FILE": str(ready_file), "PYTHONUNBUFFERED": "1",
                    "SPLITSTACK_REGISTRY_SHUTDOWN_GRACE_SECONDS": "5", "SPLITSTACK_REGISTRY_RELAY_POLL_SECONDS": "0.2",
                    "SPLITSTACK_REGISTRY_DATABASE_URL": f"sqlite:///{root / 'registry.db'}",
                    "SPLITSTACK_REGISTRY_ARTIFACT_DIR": str(root / "artifacts")})
        with log_path.open("ab") as log:
            proc = subprocess.Popen([find_binary("splitstack-registry")], env=env, cwd=root, stdin=subprocess.DEVNULL,
                                    stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        while not ready_file.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(f"the registry did not start:\n{log_path.read_text()[-5000:]}")
            time.sleep(0.05)
        return cls(proc, json.loads(ready_file.read_text())["grpc_port"], root, log_path)

    def stop(self, timeout: float = 20.0) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout)


def sha256_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sample_npz(rows: int = 8) -> bytes:
    """A small validation sample (the registry only needs one present to finalize a version)."""
    rng = np.random.default_rng(0)
    buffer = io.BytesIO()
    np.savez(buffer, inputs=rng.random((rows, 64), dtype=np.float32), labels=rng.integers(0, 10, rows))
    return buffer.getvalue()


def _upload_stream(header: pb.ArtifactHeader, data: bytes) -> Iterator[pb.UploadArtifactRequest]:
    yield pb.UploadArtifactRequest(header=header)
    for start in range(0, len(data), MIB):
        yield pb.UploadArtifactRequest(chunk=data[start:start + MIB])


class ModelRegistry:
    """Set-up through the Registry API, as the trainer and converter would do it."""

    def __init__(self, stub: registry_pb2_grpc.RegistryStub) -> None:
        self.stub = stub

    async def create_model(self, name: str) -> None:
        await self.stub.CreateModel(pb.CreateModelRequest(model=pb.Model(name=name, required_targets=["cpu"])),
                                    timeout=RPC_TIMEOUT_SECONDS)

    async def upload(self, model: str, version: int, data: bytes, kind: int, target: str = "",
                     filename: str = "model.onnx") -> pb.Artifact:
        header = pb.ArtifactHeader(model=model, version=version, kind=kind, target=target, sha256=sha256_of(data),
                                   size_bytes=len(data), filename=filename, precision=common.PRECISION_FP32,
                                   format=common.ONNX_FP32 if kind == common.ONNX else common.MODEL_FORMAT_UNSPECIFIED)
        return await self.stub.UploadArtifact(_upload_stream(header, data), timeout=RPC_TIMEOUT_SECONDS)

    async def register(self, model: str, onnx_by_target: dict[str, bytes]) -> int:
        """A READY version with an ONNX artifact and a serving choice for each target given."""
        created = await self.stub.CreateVersion(pb.CreateVersionRequest(model=model), timeout=RPC_TIMEOUT_SECONDS)
        version = created.version
        await self.upload(model, version, os.urandom(256), common.EXPORTED_PROGRAM, filename="model.pt2")
        await self.upload(model, version, sample_npz(), common.SAMPLE, filename="sample.npz")
        await self.stub.FinalizeVersion(pb.FinalizeVersionRequest(model=model, version=version),
                                        timeout=RPC_TIMEOUT_SECONDS)
        for target, onnx in onnx_by_target.items():
            artifact = await self.upload(model, version, onnx, common.ONNX, target=target)
            await self.stub.SetServingChoice(pb.SetServingChoiceRequest(
                model=model, version=version, target=target, artifact_sha256=artifact.sha256, reason="test"),
                timeout=RPC_TIMEOUT_SECONDS)
        return version

    async def promote(self, model: str, version: int, alias: str = "production") -> None:
        await self.stub.SetAlias(pb.SetAliasRequest(model=model, alias=alias, version=version, actor="tester",
                                                    reason="test"), timeout=RPC_TIMEOUT_SECONDS)

    async def delete_alias(self, model: str, alias: str = "production") -> None:
        await self.stub.DeleteAlias(pb.DeleteAliasRequest(model=model, alias=alias, actor="tester", reason="test"),
                                    timeout=RPC_TIMEOUT_SECONDS)


@contextlib.asynccontextmanager
async def registry_client(address: str) -> AsyncIterator[ModelRegistry]:
    async with grpc.aio.insecure_channel(address) as channel:
        yield ModelRegistry(registry_pb2_grpc.RegistryStub(channel))


@dataclass(frozen=True)
class StoredEvent:
    subject: str
    msg_id: str
    event: Event


async def stored_events(nats_url: str, subject: str, stream: str = "SPLITSTACK_MODELS") -> list[StoredEvent]:
    """Every message `stream` stores on `subject` (wildcards allowed), in stream order."""
    nc = await nats.connect(nats_url, connect_timeout=5, max_reconnect_attempts=2)
    try:
        js = nc.jetstream()
        found: list[StoredEvent] = []
        seq = 1
        while True:
            try:
                msg = await js.get_msg(stream, seq=seq, subject=subject, next=True)
            except nats.js.errors.NotFoundError:
                return found
            found.append(StoredEvent(msg.subject, (msg.headers or {}).get(MSG_ID_HEADER, ""), unwrap(msg.data or b"")))
            seq = msg.seq + 1
    finally:
        await asyncio.wait_for(nc.close(), 5)


async def wait_for_events(nats_url: str, subject: str, count: int, timeout: float = 20.0) -> list[StoredEvent]:
    """Poll until at least `count` messages are stored on `subject`; all of them."""
    deadline = time.monotonic() + timeout
    while True:
        found = await stored_events(nats_url, subject)
        if len(found) >= count or time.monotonic() > deadline:
            assert len(found) >= count, f"expected {count} event(s) on {subject}, got {[e.msg_id for e in found]}"
            return found
        await asyncio.sleep(0.1)


@dataclass
class RestartableStack:
    """NATS and a registry on fixed ports (and their own state), so both can be restarted in place."""

    root: Path
    nats_port: int
    registry_port: int
    nats: NatsServer | None = None
    registry: RegistryProcess | None = None

    @property
    def nats_url(self) -> str:
        return f"nats://127.0.0.1:{self.nats_port}"

    @property
    def registry_address(self) -> str:
        return f"127.0.0.1:{self.registry_port}"

    def start_nats(self) -> None:
        self.nats = start_nats(self.root / "nats", port=self.nats_port)

    def start_registry(self) -> None:
        self.registry = RegistryProcess.start(self.root / "registry", self.nats_url, port=self.registry_port)

    def stop(self) -> None:
        if self.registry is not None:
            self.registry.stop()
        if self.nats is not None:
            self.nats.stop()
