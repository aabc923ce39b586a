"""Black-box test support: real `splitstack-registry` and `splitstack-converter` processes, their
logs, the registry API steps that register a model version, and a reader of the event streams.

The converter is reached only through gRPC and NATS, exactly like in a deployment; the registry
runs on SQLite and a local artifact directory.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import uuid
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import nats
import nats.js.errors

from splitstack.chassis.testing.processes import ServiceProcess, launch_service, spawn_service
from splitstack.common.v1 import common_pb2 as common
from splitstack.contracts import handoff
from splitstack.contracts.envelope import MSG_ID_HEADER, Event, unwrap
from splitstack.converter.v1 import converter_pb2 as cpb
from splitstack.converter.v1 import converter_pb2_grpc
from splitstack.registry.v1 import registry_pb2 as rpb
from splitstack.registry.v1 import registry_pb2_grpc

MIB = 1024 * 1024
START_TIMEOUT_SECONDS = 90.0
RPC_TIMEOUT_SECONDS = 60.0
CHANNEL_OPTIONS = [("grpc.max_receive_message_length", 64 * MIB), ("grpc.max_send_message_length", 64 * MIB)]


# ---- processes ---------------------------------------------------------------------------------------

def start_registry(root: Path, nats_url: str, port: int = 0) -> ServiceProcess:
    """A registry on SQLite + a local artifact directory under `root` (again: the same records), on
    `port` (0: a free one)."""
    env = {"SPLITSTACK_NATS_URL": nats_url, "SPLITSTACK_REGISTRY_GRPC_PORT": str(port),
           "SPLITSTACK_REGISTRY_DATABASE_URL": f"sqlite:///{root / 'registry.db'}",
           "SPLITSTACK_REGISTRY_ARTIFACT_DIR": str(root / "artifacts"),
           "SPLITSTACK_REGISTRY_RELAY_POLL_SECONDS": "0.2",
           "SPLITSTACK_REGISTRY_SHUTDOWN_GRACE_SECONDS": "5"}
    return spawn_service("splitstack-registry", "registry", root / "run", env, cwd=root,
                         ready_timeout=START_TIMEOUT_SECONDS)


# Fast measurement floors for the tests that do not assert which candidate is chosen.
FAST_PROFILE = {"SPLITSTACK_CONVERTER_PROFILE_MIN_RUNS": "50", "SPLITSTACK_CONVERTER_PROFILE_MIN_SECONDS": "0.2",
                "SPLITSTACK_CONVERTER_PROFILE_WARMUP_RUNS": "3"}


@dataclass
class ConverterPool:
    """Converter replicas of one target sharing one database, one NATS and one registry."""

    root: Path
    nats_url: str
    registry_addr: str
    extra_env: Mapping[str, str]

    def __post_init__(self) -> None:
        self.processes: list[ServiceProcess] = []
        self._count = 0

    def spawn(self, crash_points: Iterable[str] = (), **extra: str) -> ServiceProcess:
        """Start one more replica without waiting for it (see `wait`)."""
        self._count += 1
        name = f"converter-{self._count}"
        env = {"SPLITSTACK_NATS_URL": self.nats_url, "SPLITSTACK_REGISTRY_ADDR": self.registry_addr,
               "SPLITSTACK_CONVERTER_GRPC_PORT": "0", "SPLITSTACK_CONVERTER_INSTANCE": name,
               "SPLITSTACK_CONVERTER_DATABASE_URL": f"sqlite:///{self.root / 'converter.db'}",
               "SPLITSTACK_CONVERTER_WORK_DIR": str(self.root / "work"),
               "SPLITSTACK_CONVERTER_SHUTDOWN_GRACE_SECONDS": "5",
               "SPLITSTACK_CONVERTER_RELAY_POLL_SECONDS": "0.2",
               "SPLITSTACK_CONVERTER_WATCH_POLL_SECONDS": "0.1", **self.extra_env, **extra}
        return launch_service("splitstack-converter", name, self.root / "run", env, cwd=self.root,
                              crash_points=crash_points)

    def wait(self, spawned: ServiceProcess) -> ServiceProcess:
        process = spawned.wait_ready(START_TIMEOUT_SECONDS)
        self.processes.append(process)
        return process

    def start(self, crash_points: Iterable[str] = (), **extra: str) -> ServiceProcess:
        return self.wait(self.spawn(crash_points, **extra))

    def stop_all(self) -> None:
        for process in self.processes:
            process.stop()

    def logs(self) -> str:
        return "\n".join(f"==== {p.name}\n{p.log()[-20000:]}" for p in self.processes)


# ---- gRPC -------------------------------------------------------------------------------------------

@contextlib.asynccontextmanager
async def open_channel(address: str) -> AsyncIterator[grpc.aio.Channel]:
    channel = grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
    try:
        yield channel
    finally:
        await asyncio.wait_for(channel.close(), 10)


def sha256_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _upload_stream(header: rpb.ArtifactHeader, data: bytes) -> Iterator[rpb.UploadArtifactRequest]:
    yield rpb.UploadArtifactRequest(header=header)
    for start in range(0, len(data), MIB):
        yield rpb.UploadArtifactRequest(chunk=data[start:start + MIB])


def fresh_name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def artifact_header(model: str, version: int, data: bytes, **fields: Any) -> rpb.ArtifactHeader:
    """The header of an upload of `data` to (model, version)."""
    return rpb.ArtifactHeader(model=model, version=version, sha256=sha256_of(data), size_bytes=len(data), **fields)


async def upload(stub: registry_pb2_grpc.RegistryStub, header: rpb.ArtifactHeader, data: bytes) -> rpb.Artifact:
    return await stub.UploadArtifact(_upload_stream(header, data), timeout=RPC_TIMEOUT_SECONDS)


async def register_version(stub: registry_pb2_grpc.RegistryStub, model: str, program: bytes, sample: bytes,
                           *, required_targets: Iterable[str] = ("cpu",),
                           labels: Mapping[str, str] | None = None,
                           extra: Iterable[tuple[Mapping[str, Any], bytes]] = ()) -> rpb.ModelVersion:
    """CreateModel, CreateVersion, upload the exported program, the sample and `extra` artifacts
    ((header fields, bytes): what any client of the registry may add), FinalizeVersion (the registry
    then announces model.registered)."""
    accuracy = common.PrimaryMetric(name="accuracy", direction=common.MAXIMIZE)
    await stub.CreateModel(rpb.CreateModelRequest(model=rpb.Model(
        name=model, required_targets=list(required_targets), primary_metric=accuracy, labels=dict(labels or {}))),
        timeout=RPC_TIMEOUT_SECONDS)
    version = await stub.CreateVersion(rpb.CreateVersionRequest(
        model=model, idempotency_key=fresh_name("job"), lineage=rpb.Lineage(primary_metric=accuracy),
        signature=handoff.signature([64], 10)), timeout=RPC_TIMEOUT_SECONDS)
    for kind, data, filename in ((common.EXPORTED_PROGRAM, program, handoff.EXPORTED_PROGRAM_FILENAME),
                                 (common.SAMPLE, sample, handoff.SAMPLE_FILENAME)):
        header = rpb.ArtifactHeader(model=model, version=version.version, kind=kind, precision=common.PRECISION_FP32,
                                    sha256=sha256_of(data), size_bytes=len(data), filename=filename)
        await stub.UploadArtifact(_upload_stream(header, data), timeout=RPC_TIMEOUT_SECONDS)
    for fields, data in extra:
        await upload(stub, artifact_header(model, version.version, data, **fields), data)
    return await stub.FinalizeVersion(rpb.FinalizeVersionRequest(model=model, version=version.version),
                                      timeout=RPC_TIMEOUT_SECONDS)


async def get_version(stub: registry_pb2_grpc.RegistryStub, model: str, version: int) -> rpb.ModelVersion:
    return await stub.GetVersion(rpb.GetVersionRequest(model=model, version=version), timeout=RPC_TIMEOUT_SECONDS)


def conversion_artifacts(version: rpb.ModelVersion, target: str = "cpu") -> list[rpb.Artifact]:
    return [a for a in version.artifacts if a.target == target]


# ---- events -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class StoredEvent:
    stream: str
    seq: int
    subject: str
    msg_id: str
    event: Event

    @property
    def payload(self) -> Any:
        return self.event.payload


class EventLog:
    """What the contract streams store, read by sequence (no consumer is created)."""

    STREAMS = ("SPLITSTACK_MODELS", "SPLITSTACK_DEADLETTER")

    def __init__(self, nc: nats.NATS) -> None:
        self.nc = nc
        self.js = nc.jetstream()

    async def read(self, pattern: str) -> list[StoredEvent]:
        found: list[StoredEvent] = []
        for stream in self.STREAMS:
            seq = 1
            while True:
                try:
                    msg = await self.js.get_msg(stream, seq=seq, subject=pattern, next=True)
                except nats.js.errors.NotFoundError:
                    break
                found.append(StoredEvent(stream, msg.seq, msg.subject, (msg.headers or {}).get(MSG_ID_HEADER, ""),
                                         unwrap(msg.data or b"")))
                seq = msg.seq + 1
        return found

    async def wait_for(self, pattern: str, count: int = 1, timeout: float = 120.0) -> list[StoredEvent]:
        """Poll until at least `count` messages match `pattern`."""
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            found = await self.read(pattern)
            if len(found) >= count:
                return found
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"expected {count} event(s) on {pattern} within {timeout}s, got {len(found)}")
            await asyncio.sleep(0.1)

    async def publish_copy(self, stored: StoredEvent) -> None:
        """Publish a stored message again under a new message id (a duplicate the server cannot drop)."""
        from splitstack.contracts.envelope import wrap

        envelope = wrap(stored.payload, producer="test/duplicate")
        await self.js.publish(stored.subject, envelope.SerializeToString(),
                              headers={MSG_ID_HEADER: envelope.event_id})


@contextlib.asynccontextmanager
async def open_event_log(url: str) -> AsyncIterator[EventLog]:
    nc = await nats.connect(url, connect_timeout=5, max_reconnect_attempts=3)
    try:
        yield EventLog(nc)
    finally:
        await asyncio.wait_for(nc.close(), 5)


# ---- conversions ------------------------------------------------------------------------------------

async def expect_failure(stack: Any, program: bytes, sample: bytes, prefix: str,
                         timeout: float = 300.0) -> Any:
    """Register a version of a fresh model with `program`; its ConversionFailed event (stage `export`,
    nothing registered, the converter's record FAILED with the same reason)."""
    model = fresh_name(prefix)
    async with open_channel(stack.registry.address) as channel, open_event_log(stack.nats.url) as events:
        stub = registry_pb2_grpc.RegistryStub(channel)
        version = (await register_version(stub, model, program, sample)).version
        failed = (await events.wait_for(f"conversion.failed.{model}.cpu", timeout=timeout))[0].payload
        assert (failed.model, failed.version, failed.stage) == (model, version, "export"), failed
        found = await get_version(stub, model, version)
        assert conversion_artifacts(found) == [] and list(found.serving_choices) == []
    async with open_channel(stack.converter.address) as channel:
        record = await converter_pb2_grpc.ConverterStub(channel).GetConversion(
            cpb.GetConversionRequest(model=model, version=version, target="cpu"))
    assert record.state == cpb.FAILED and record.error == failed.reason
    return failed
