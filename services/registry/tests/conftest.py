"""Fixtures of the registry's black-box tests: the real `splitstack-registry` process, reached only
through gRPC and NATS, on both backends (SQLite + a local artifact dir; PostgreSQL + S3).

- `shared_registry` (session, params sqlite/postgres): one registry process per backend that most
  tests share; each test works on fresh, uniquely named models and datasets (`api.name(...)`).
  It runs with `SPLITSTACK_REGISTRY_MAX_UPLOAD_BYTES` = SHARED_MAX_UPLOAD_BYTES and
  `SPLITSTACK_REGISTRY_MAX_DATASET_ARRAY_BYTES` = SHARED_MAX_DATASET_ARRAY_BYTES.
- `channel`, `stub`, `api`, `events`, `new_client`: a grpc.aio channel / RegistryStub / RegistryApi
  (helpers for the multi-step set-up) / EventLog on that shared registry, and a factory of further
  clients (own channels); every call gets a default deadline.
- `registry` (params sqlite/postgres): a `RegistryLauncher` on fresh state and a fresh nats-server,
  for tests that start, kill and restart processes on the same state (crash tests, extra env);
  `postgres_registry` is the same on PostgreSQL + S3 only.
- `replicas` (over the module-scoped `replica_deployment`): two registry processes on one PostgreSQL
  database and one S3 bucket.

Helpers reach the tests through these fixtures (test modules cannot import this file in importlib
mode): `api.fails(call, code, *words)`, `api.refused_upload(...)`, `api.state.stored_files()` /
`blobs_named(sha256)` (what the blob store holds), `api.state.outbox_subjects(prefix)` (outbox rows),
`api.state.plant_blob(data)` (an orphan blob), `events.read/wait_for/exactly(pattern, ...)`.

Every process writes stdout/stderr to a log file; when a test fails, the part of each log written
during that test is attached to its report.
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
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import boto3
import grpc
import nats
import nats.js.errors
import numpy as np
import pytest
from botocore.config import Config

from splitstack.chassis.faults import crash_env, crash_point_hit
from splitstack.chassis.testing.fixtures import DEFAULT_TEST_POSTGRES_URL
from splitstack.chassis.testing.servers import NatsServer, S3Server, find_binary, start_nats
from splitstack.common.v1 import common_pb2 as common
from splitstack.contracts.envelope import MSG_ID_HEADER, Event, unwrap
from splitstack.registry.v1 import registry_pb2 as pb
from splitstack.registry.v1 import registry_pb2_grpc

BACKENDS = ("sqlite", "postgres")
REGISTRY_SERVICE = "splitstack.registry.v1.Registry"
MIB = 1024 * 1024
SHARED_MAX_UPLOAD_BYTES = 12 * MIB
SHARED_MAX_DATASET_ARRAY_BYTES = 64 * MIB
START_TIMEOUT_SECONDS = 60.0
STOP_TIMEOUT_SECONDS = 20.0
RPC_TIMEOUT_SECONDS = 60.0
EVENT_TIMEOUT_SECONDS = 20.0
SETTLE_SECONDS = 1.5              # three relay polls: long enough for a stray duplicate to show up
EVENT_STREAMS = ("SPLITSTACK_DATA", "SPLITSTACK_MODELS")
CHANNEL_OPTIONS = [("grpc.max_receive_message_length", 64 * MIB), ("grpc.max_send_message_length", 64 * MIB)]

LOGS = pytest.StashKey[list]()


# ---- failure reports: the registry logs written during the test -----------------------------------

def note_log(node: pytest.Item, label: str, path: Path) -> None:
    """Attach the part of `path` written from now on to `node`'s report if the test fails."""
    offset = path.stat().st_size if path.exists() else 0
    node.stash.setdefault(LOGS, []).append((label, path, offset))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Any:
    report = yield
    if report.failed:
        for label, path, offset in item.stash.get(LOGS, []):
            report.sections.append((f"registry log: {label}", _read_tail(path, offset)))
    return report


def _read_tail(path: Path, offset: int, limit: int = 30_000) -> str:
    try:
        with open(path, "rb") as log:
            log.seek(offset)
            text = log.read().decode(errors="replace")
    except OSError as exc:
        return f"(cannot read {path}: {exc})"
    return text if len(text) <= limit else f"... ({len(text) - limit} chars skipped)\n{text[-limit:]}"


# ---- where a deployment keeps its state ------------------------------------------------------------

def s3_client(server: S3Server) -> Any:
    return boto3.client("s3", endpoint_url=server.endpoint, region_name="us-east-1",
                        aws_access_key_id=server.extra["access_key"],
                        aws_secret_access_key=server.extra["secret_key"],
                        config=Config(retries={"max_attempts": 3}))


@dataclass
class RegistryState:
    """One registry deployment's metadata + blob store, shared by its processes and their restarts."""

    backend: str
    root: Path
    env: dict[str, str]
    artifact_dir: Path | None = None
    spool_dir: Path | None = None
    bucket: str = ""
    s3: Any = None

    def stored_files(self) -> dict[str, int]:
        """Every blob-side thing and its size: files under the artifact dir, or S3 objects, unfinished
        multipart uploads and spool files."""
        if self.s3 is None:
            return _files_under(self.artifact_dir, "")
        found = _files_under(self.spool_dir, "spool:")
        for page in self.s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket):
            found.update({f"s3:{o['Key']}": o["Size"] for o in page.get("Contents", [])})
        uploads = self.s3.list_multipart_uploads(Bucket=self.bucket)
        found.update({f"multipart:{u['Key']}": 0 for u in uploads.get("Uploads", [])})
        return found

    def blobs_named(self, sha256: str) -> dict[str, int]:
        """The stored things whose name carries `sha256` (a content-addressed store has one)."""
        return {name: size for name, size in self.stored_files().items() if sha256 in name}

    def outbox_subjects(self, prefix: str) -> list[str]:
        """Subjects of the outbox rows (published or not) that start with `prefix`, straight from the database."""
        import sqlalchemy

        engine = sqlalchemy.create_engine(self.env["SPLITSTACK_REGISTRY_DATABASE_URL"])
        try:
            with engine.connect() as conn:
                rows = conn.execute(sqlalchemy.text("SELECT subject FROM outbox")).scalars()
                return [subject for subject in rows if subject.startswith(prefix)]
        finally:
            engine.dispose()

    def plant_blob(self, data: bytes) -> str:
        """Store `data` as a blob the way the registry would, behind its back (an orphan); its digest."""
        digest = sha256_of(data)
        if self.s3 is None:
            path = self.artifact_dir / "sha256" / digest[:2] / digest
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        else:
            self.s3.put_object(Bucket=self.bucket, Key=f"blobs/sha256/{digest}", Body=data)
        return digest


def _files_under(directory: Path | None, prefix: str) -> dict[str, int]:
    """Files under `directory` and their sizes, minus the empty `*.lock` files by which a live process
    marks its own spool (they hold no content)."""
    if directory is None or not directory.exists():
        return {}
    return {f"{prefix}{p.relative_to(directory)}": p.stat().st_size for p in directory.rglob("*")
            if p.is_file() and not (p.suffix == ".lock" and p.stat().st_size == 0)}


def local_state(root: Path) -> RegistryState:
    """SQLite + a local artifact directory under `root`."""
    root.mkdir(parents=True, exist_ok=True)
    artifacts = root / "artifacts"
    env = {"SPLITSTACK_REGISTRY_DATABASE_URL": f"sqlite:///{root / 'registry.db'}",
           "SPLITSTACK_REGISTRY_ARTIFACT_DIR": str(artifacts)}
    return RegistryState("sqlite", root, env, artifact_dir=artifacts)


def s3_state(root: Path, database_url: str, server: S3Server) -> RegistryState:
    """PostgreSQL at `database_url` + a fresh bucket on `server` (spool files under `root`)."""
    root.mkdir(parents=True, exist_ok=True)
    s3 = s3_client(server)
    bucket = f"registry-{uuid.uuid4().hex[:16]}"
    s3.create_bucket(Bucket=bucket)
    spool = root / "spool"
    env = {"SPLITSTACK_REGISTRY_DATABASE_URL": database_url,
           "SPLITSTACK_REGISTRY_S3_BUCKET": bucket,
           "SPLITSTACK_REGISTRY_S3_ENDPOINT_URL": server.endpoint,
           "SPLITSTACK_REGISTRY_S3_ACCESS_KEY_ID": server.extra["access_key"],
           "SPLITSTACK_REGISTRY_S3_SECRET_ACCESS_KEY": server.extra["secret_key"],
           "SPLITSTACK_REGISTRY_SPOOL_DIR": str(spool)}
    return RegistryState("postgres", root, env, spool_dir=spool, bucket=bucket, s3=s3)


@contextlib.contextmanager
def fresh_postgres_database() -> Iterator[str]:
    """A fresh database (SQLAlchemy psycopg URL) for longer than one test; skip when no server."""
    import psycopg

    admin = os.environ.get("SPLITSTACK_TEST_POSTGRES_URL", DEFAULT_TEST_POSTGRES_URL)
    try:
        conn = psycopg.connect(admin, autocommit=True, connect_timeout=3)
    except psycopg.OperationalError as exc:
        pytest.skip(f"no PostgreSQL at {admin} ({str(exc).strip()}); set SPLITSTACK_TEST_POSTGRES_URL")
    name = f"splitstack_registry_{uuid.uuid4().hex[:12]}"
    with conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base = admin.rsplit("/", 1)[0]
    try:
        yield f"postgresql+psycopg://{base.split('://', 1)[1]}/{name}"
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def make_state(backend: str, root: Path, request: pytest.FixtureRequest, database_url: str = "") -> RegistryState:
    """State for `backend`; `database_url` defaults to the `postgres_url` fixture."""
    if backend == "sqlite":
        return local_state(root)
    url = database_url or request.getfixturevalue("postgres_url")
    return s3_state(root, url, request.getfixturevalue("s3_server"))


# ---- registry processes ------------------------------------------------------------------------------

@dataclass
class RegistryProcess:
    """One running (or dead) `splitstack-registry` process."""

    name: str
    proc: subprocess.Popen
    port: int
    log_path: Path
    marker_dir: Path | None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def crashed_at(self, point: str) -> bool:
        """True when this process died at crash point `point` (its marker file exists)."""
        return self.marker_dir is not None and crash_point_hit(self.marker_dir, point)

    def wait_exit(self, timeout: float = 30.0) -> int:
        """Wait for the process to end by itself; its return code (-9 after a crash point)."""
        return self.proc.wait(timeout)

    def stop(self, timeout: float = STOP_TIMEOUT_SECONDS) -> int:
        """SIGTERM and wait (SIGKILL after `timeout`); the return code."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout)
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(STOP_TIMEOUT_SECONDS)

    def log(self) -> str:
        return _read_tail(self.log_path, 0)


@dataclass
class _Starting:
    name: str
    proc: subprocess.Popen
    ready_file: Path
    log_path: Path
    marker_dir: Path | None


class RegistryLauncher:
    """Starts registry processes on one `RegistryState` and one NATS; stops them all at the end."""

    def __init__(self, state: RegistryState, nats_url: str, node: pytest.Item | None = None) -> None:
        self.state = state
        self.nats_url = nats_url
        self.node = node
        self.processes: list[RegistryProcess] = []
        self._count = 0

    def environment(self, name: str, ready_file: Path, extra: Mapping[str, str]) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("SPLITSTACK_")}
        env.update({"SPLITSTACK_NATS_URL": self.nats_url,
                    "SPLITSTACK_REGISTRY_GRPC_PORT": "0",
                    "SPLITSTACK_REGISTRY_READY_FILE": str(ready_file),
                    "SPLITSTACK_REGISTRY_INSTANCE": name,
                    "SPLITSTACK_REGISTRY_SHUTDOWN_GRACE_SECONDS": "5",
                    "PYTHONUNBUFFERED": "1"})
        env.update(self.state.env)
        env.update(extra)
        return env

    def spawn(self, name: str, extra_env: Mapping[str, str] | None = None,
              crash_points: Iterable[str] = ()) -> _Starting:
        """Start a process without waiting for it (see `wait_ready`)."""
        self._count += 1
        label = f"{name}-{self._count}"
        run_dir = self.state.root / "run"
        run_dir.mkdir(parents=True, exist_ok=True)
        extra = dict(extra_env or {})
        marker_dir = None
        points = list(crash_points)
        if points:
            marker_dir = run_dir / f"markers-{label}"
            marker_dir.mkdir()
            extra.update(crash_env(points, marker_dir))
        ready_file, log_path = run_dir / f"{label}.ready.json", run_dir / f"{label}.log"
        env = self.environment(label, ready_file, extra)
        with open(log_path, "ab") as log:
            proc = subprocess.Popen([find_binary("splitstack-registry")], env=env, cwd=self.state.root,
                                    stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        if self.node is not None:
            note_log(self.node, label, log_path)
        return _Starting(label, proc, ready_file, log_path, marker_dir)

    def wait_ready(self, starting: _Starting, timeout: float = START_TIMEOUT_SECONDS) -> RegistryProcess:
        """Wait for the ready file (JSON with grpc_port); fail with the log if the process dies first."""
        deadline = time.monotonic() + timeout
        while not starting.ready_file.exists():
            if starting.proc.poll() is not None:
                raise RuntimeError(f"registry {starting.name} exited with {starting.proc.returncode} before it "
                                   f"was ready; log:\n{_read_tail(starting.log_path, 0, 8000)}")
            if time.monotonic() > deadline:
                starting.proc.kill()
                raise TimeoutError(f"registry {starting.name} not ready within {timeout}s; log:\n"
                                   f"{_read_tail(starting.log_path, 0, 8000)}")
            time.sleep(0.05)
        port = json.loads(starting.ready_file.read_text())["grpc_port"]
        process = RegistryProcess(starting.name, starting.proc, port, starting.log_path, starting.marker_dir)
        self.processes.append(process)
        return process

    def start_sync(self, name: str = "registry", extra_env: Mapping[str, str] | None = None,
                   crash_points: Iterable[str] = ()) -> RegistryProcess:
        return self.wait_ready(self.spawn(name, extra_env, crash_points))

    async def start(self, name: str = "registry", extra_env: Mapping[str, str] | None = None,
                    crash_points: Iterable[str] = ()) -> RegistryProcess:
        """Start a process and wait until it serves (without blocking the event loop)."""
        starting = self.spawn(name, extra_env, crash_points)
        return await asyncio.to_thread(self.wait_ready, starting)

    def stop_all(self) -> None:
        for process in self.processes:
            process.stop()

    @contextlib.asynccontextmanager
    async def connect(self, process: RegistryProcess) -> AsyncIterator[RegistryApi]:
        """A RegistryApi on a fresh channel to `process`."""
        async with open_channel(process.address) as channel:
            yield RegistryApi(registry_pb2_grpc.RegistryStub(channel), self.state)

    @contextlib.asynccontextmanager
    async def event_log(self) -> AsyncIterator[EventLog]:
        async with open_event_log(self.nats_url) as log:
            yield log


# ---- gRPC clients with a default deadline ---------------------------------------------------------

def _with_deadline(details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
    return details if details.timeout is not None else details._replace(timeout=RPC_TIMEOUT_SECONDS)


class _UnaryUnaryDeadline(grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation, details, request):  # noqa: ANN001, ANN201
        return await continuation(_with_deadline(details), request)


class _UnaryStreamDeadline(grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation, details, request):  # noqa: ANN001, ANN201
        return await continuation(_with_deadline(details), request)


class _StreamUnaryDeadline(grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation, details, requests):  # noqa: ANN001, ANN201
        return await continuation(_with_deadline(details), requests)


class _StreamStreamDeadline(grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(self, continuation, details, requests):  # noqa: ANN001, ANN201
        return await continuation(_with_deadline(details), requests)


@contextlib.asynccontextmanager
async def open_channel(address: str) -> AsyncIterator[grpc.aio.Channel]:
    interceptors = [_UnaryUnaryDeadline(), _UnaryStreamDeadline(), _StreamUnaryDeadline(), _StreamStreamDeadline()]
    channel = grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS, interceptors=interceptors)
    try:
        yield channel
    finally:
        await asyncio.wait_for(channel.close(), 10)


# ---- events ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class StoredEvent:
    """One message stored in a contract stream, decoded."""

    stream: str
    seq: int
    subject: str
    msg_id: str
    event: Event

    @property
    def payload(self) -> Any:
        return self.event.payload


class EventLog:
    """Reads what the registry's streams store (JetStream get-by-sequence), decoded from the envelope."""

    def __init__(self, nc: nats.NATS) -> None:
        self.js = nc.jetstream()

    async def read(self, pattern: str = ">") -> list[StoredEvent]:
        """Every stored message whose subject matches `pattern`, in stream order."""
        found: list[StoredEvent] = []
        for stream in EVENT_STREAMS:
            seq = 1
            while True:
                try:
                    msg = await self.js.get_msg(stream, seq=seq, subject=pattern, next=True)
                except nats.js.errors.NotFoundError:
                    break
                headers = msg.headers or {}
                found.append(StoredEvent(stream, msg.seq, msg.subject, headers.get(MSG_ID_HEADER, ""),
                                         unwrap(msg.data or b"")))
                seq = msg.seq + 1
        return found

    async def wait_for(self, pattern: str, count: int, timeout: float = EVENT_TIMEOUT_SECONDS) -> list[StoredEvent]:
        """Poll until at least `count` messages match `pattern`; all of them."""
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            found = await self.read(pattern)
            if len(found) >= count:
                return found
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"expected {count} event(s) on {pattern} within {timeout}s, got {len(found)}: "
                                     f"{[(e.subject, e.msg_id) for e in found]}")
            await asyncio.sleep(0.1)

    async def exactly(self, pattern: str, count: int, settle: float = SETTLE_SECONDS) -> list[StoredEvent]:
        """Wait for `count` messages on `pattern`, give strays `settle` seconds, and assert exactly `count`."""
        if count:
            await self.wait_for(pattern, count)
        await asyncio.sleep(settle)
        found = await self.read(pattern)
        assert len(found) == count, f"{pattern}: expected exactly {count}, got {[(e.subject, e.msg_id) for e in found]}"
        assert_stored_once(found)
        return found


def assert_stored_once(events: Iterable[StoredEvent]) -> None:
    """Each message carries its envelope's event id as Nats-Msg-Id, and no id is stored twice."""
    events = list(events)
    for stored in events:
        assert stored.msg_id == stored.event.event_id, stored
        assert stored.event.producer.startswith("registry"), stored.event.producer
    repeated = {k: n for k, n in Counter(e.msg_id for e in events).items() if n > 1}
    assert not repeated, f"event ids stored more than once: {repeated}"


@contextlib.asynccontextmanager
async def open_event_log(url: str) -> AsyncIterator[EventLog]:
    nc = await nats.connect(url, connect_timeout=5, max_reconnect_attempts=3)
    try:
        yield EventLog(nc)
    finally:
        await asyncio.wait_for(nc.close(), 5)


# ---- the API, with helpers for multi-step set-up ---------------------------------------------------

def sha256_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def artifact_stream(header: pb.ArtifactHeader, data: bytes, chunk: int = MIB) -> Iterator[pb.UploadArtifactRequest]:
    yield pb.UploadArtifactRequest(header=header)
    for start in range(0, len(data), chunk):
        yield pb.UploadArtifactRequest(chunk=data[start:start + chunk])


def dataset_stream(header: pb.DatasetVersionHeader, data: bytes,
                   chunk: int = MIB) -> Iterator[pb.UploadDatasetVersionRequest]:
    yield pb.UploadDatasetVersionRequest(header=header)
    for start in range(0, len(data), chunk):
        yield pb.UploadDatasetVersionRequest(chunk=data[start:start + chunk])


async def every_page(method: Any, request: Any, field: str) -> list[Any]:
    """Call a List* method page after page (following next_page_token); every item of `field`."""
    found: list[Any] = []
    while True:
        page = await method(request)
        found.extend(getattr(page, field))
        if not page.next_page_token:
            return found
        request.page_token = page.next_page_token


async def record_and_content(call: Any, record_field: str) -> tuple[Any, bytes]:
    """Read a download stream: the record (which must come first, once) and the joined chunks."""
    record, chunks = None, []
    async for part in call:
        if part.WhichOneof("part") == record_field:
            assert record is None and not chunks, f"the {record_field} record must come first, once"
            record = getattr(part, record_field)
        else:
            chunks.append(part.chunk)
    assert record is not None, f"the download sent no {record_field} record"
    return record, b"".join(chunks)


SIGNATURE = common.Signature(
    inputs=[common.TensorSpec(name="x", dtype=common.FP32, shape=[-1, 64])],
    outputs=[common.TensorSpec(name="logits", dtype=common.FP32, shape=[-1, 10])])


class RegistryApi:
    """The Registry stub plus the set-up steps tests repeat (each is plain API calls)."""

    SIGNATURE = SIGNATURE
    MIB = MIB

    def __init__(self, stub: registry_pb2_grpc.RegistryStub, state: RegistryState | None = None) -> None:
        self.stub = stub
        self.state = state

    # -- plain helpers
    @staticmethod
    def name(prefix: str = "m") -> str:
        """A fresh name obeying the naming rule."""
        return f"{prefix}-{uuid.uuid4().hex[:12]}"

    @staticmethod
    def sha256(data: bytes) -> str:
        return sha256_of(data)

    @staticmethod
    def npz(**arrays: Any) -> bytes:
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        return buffer.getvalue()

    @staticmethod
    def npz_compressed(**arrays: Any) -> bytes:
        buffer = io.BytesIO()
        np.savez_compressed(buffer, **arrays)
        return buffer.getvalue()

    @staticmethod
    def sample_npz(rows: int = 8) -> bytes:
        rng = np.random.default_rng()
        return RegistryApi.npz(inputs=rng.random((rows, 64), dtype=np.float32),
                               labels=rng.integers(0, 10, rows), reference_outputs=rng.random((rows, 10)))

    @staticmethod
    def lineage(**fields: Any) -> pb.Lineage:
        defaults = dict(training_job=f"job-{uuid.uuid4().hex[:8]}", hyperparameters={"lr": "0.01"},
                        metrics={"accuracy": 0.93}, primary_metric_value=0.93, code_version="abc123",
                        primary_metric=common.PrimaryMetric(name="accuracy", direction=common.MAXIMIZE))
        return pb.Lineage(**{**defaults, **fields})

    @staticmethod
    async def fails(call: Awaitable[Any], code: grpc.StatusCode, *words: str) -> grpc.aio.AioRpcError:
        """Await `call`; assert it fails with `code` and a message containing every word (case-insensitive)."""
        try:
            result = await call
        except grpc.aio.AioRpcError as exc:
            details = exc.details() or ""
            assert exc.code() == code, f"expected {code.name}, got {exc.code().name}: {details}"
            text = details.lower()
            for word in words:
                # "exported_program" also matches "exported program" (enum name or prose)
                named = word.lower() in text or word.lower() in text.replace(" ", "_")
                assert named, f"{code.name} message does not name {word!r}: {details}"
            return exc
        raise AssertionError(f"expected {code.name}, but the call succeeded: {result}")

    # -- models and versions
    async def create_model(self, name: str | None = None, **fields: Any) -> pb.Model:
        fields.setdefault("required_targets", ["cpu"])
        fields.setdefault("primary_metric", common.PrimaryMetric(name="accuracy", direction=common.MAXIMIZE))
        model = pb.Model(name=self.name("m") if name is None else name, **fields)
        return await self.stub.CreateModel(pb.CreateModelRequest(model=model))

    async def create_version(self, model: str, key: str = "", lineage: pb.Lineage | None = None,
                             signature: common.Signature | None = None) -> pb.ModelVersion:
        return await self.stub.CreateVersion(pb.CreateVersionRequest(
            model=model, idempotency_key=key, lineage=lineage or pb.Lineage(),
            signature=signature or SIGNATURE))

    async def upload(self, model: str, version: int, data: bytes, kind: int = common.EXPORTED_PROGRAM, *,
                     precision: int = common.PRECISION_FP32, target: str = "", sha256: str | None = None,
                     size: int | None = None, chunk: int = MIB, **header: Any) -> pb.Artifact:
        """UploadArtifact: header (declared digest and size default to the true ones), then chunks."""
        head = pb.ArtifactHeader(model=model, version=version, kind=kind, precision=precision, target=target,
                                 sha256=sha256_of(data) if sha256 is None else sha256,
                                 size_bytes=len(data) if size is None else size, **header)
        return await self.stub.UploadArtifact(artifact_stream(head, data, chunk))

    async def refused_upload(self, header: pb.ArtifactHeader | pb.DatasetVersionHeader, data: bytes,
                             invalid_after: int, chunk: int = MIB) -> grpc.aio.AioRpcError:
        """Stream an upload a correct registry refuses once more than `invalid_after` bytes arrived (or at
        the header); return its error. Past that point the stream waits for the verdict before sending
        more, so that the error is the registry's status and not grpc's own failed write to a call the
        server already ended (which the client library reports as INTERNAL "Internal error from Core")."""
        dataset = isinstance(header, pb.DatasetVersionHeader)
        message = pb.UploadDatasetVersionRequest if dataset else pb.UploadArtifactRequest
        holder: list[Any] = []

        async def verdict(timeout: float) -> None:
            deadline = asyncio.get_running_loop().time() + timeout
            while not holder[0].done() and asyncio.get_running_loop().time() < deadline:
                await asyncio.sleep(0.01)

        async def requests() -> AsyncIterator[Any]:
            yield message(header=header)
            await verdict(0.3)
            sent = 0
            for start in range(0, len(data), chunk):
                if sent > invalid_after:
                    await verdict(10.0)
                if holder[0].done():
                    return
                yield message(chunk=data[start:start + chunk])
                sent += len(data[start:start + chunk])

        call = (self.stub.UploadDatasetVersion if dataset else self.stub.UploadArtifact)(requests())
        holder.append(call)
        try:
            result = await call
        except grpc.aio.AioRpcError as exc:
            return exc
        raise AssertionError(f"the upload was accepted: {result}")

    async def finalize(self, model: str, version: int) -> pb.ModelVersion:
        return await self.stub.FinalizeVersion(pb.FinalizeVersionRequest(model=model, version=version))

    async def ready_version(self, model: str, key: str = "", lineage: pb.Lineage | None = None,
                            onnx_target: str = "") -> pb.ModelVersion:
        """A READY version with an exported program and a sample (and an ONNX artifact for a target)."""
        version = (await self.create_version(model, key=key, lineage=lineage)).version
        await self.upload(model, version, os.urandom(4096), common.EXPORTED_PROGRAM, filename="model.pt2")
        await self.upload(model, version, self.sample_npz(), common.SAMPLE, filename="sample.npz")
        await self.finalize(model, version)
        if onnx_target:
            await self.upload(model, version, os.urandom(2048), common.ONNX, target=onnx_target,
                              format=common.ONNX_FP32, filename="model.onnx")
        return await self.get_version(model, version)

    async def get_version(self, model: str, version: int) -> pb.ModelVersion:
        return await self.stub.GetVersion(pb.GetVersionRequest(model=model, version=version))

    async def all_versions(self, model: str, page_size: int = 0) -> list[pb.ModelVersion]:
        request = pb.ListVersionsRequest(model=model, page_size=page_size)
        return await every_page(self.stub.ListVersions, request, "versions")

    async def all_models(self, page_size: int = 0) -> list[pb.Model]:
        return await every_page(self.stub.ListModels, pb.ListModelsRequest(page_size=page_size), "models")

    async def artifacts(self, model: str, version: int) -> list[pb.Artifact]:
        return list((await self.stub.ListArtifacts(pb.ListArtifactsRequest(model=model, version=version))).artifacts)

    async def download(self, **request: Any) -> tuple[pb.Artifact, bytes]:
        """DownloadArtifact: the artifact record (first message) and the content of the chunks."""
        return await record_and_content(self.stub.DownloadArtifact(pb.DownloadArtifactRequest(**request)), "artifact")

    # -- datasets
    async def create_dataset(self, name: str | None = None, description: str = "") -> pb.Dataset:
        dataset = pb.Dataset(name=self.name("d") if name is None else name, description=description)
        return await self.stub.CreateDataset(pb.CreateDatasetRequest(dataset=dataset))

    async def upload_dataset(self, dataset: str, data: bytes, key: str = "", *, sha256: str | None = None,
                             size: int | None = None, metadata: Mapping[str, str] | None = None,
                             chunk: int = MIB) -> pb.DatasetVersion:
        head = pb.DatasetVersionHeader(dataset=dataset, sha256=sha256_of(data) if sha256 is None else sha256,
                                       size_bytes=len(data) if size is None else size,
                                       metadata=dict(metadata or {}), idempotency_key=key)
        return await self.stub.UploadDatasetVersion(dataset_stream(head, data, chunk))

    async def all_dataset_versions(self, dataset: str, page_size: int = 0) -> list[pb.DatasetVersion]:
        request = pb.ListDatasetVersionsRequest(dataset=dataset, page_size=page_size)
        return await every_page(self.stub.ListDatasetVersions, request, "versions")

    async def all_datasets(self, page_size: int = 0) -> list[pb.Dataset]:
        return await every_page(self.stub.ListDatasets, pb.ListDatasetsRequest(page_size=page_size), "datasets")

    async def download_dataset(self, dataset: str, version: int) -> tuple[pb.DatasetVersion, bytes]:
        call = self.stub.DownloadDatasetVersion(pb.DownloadDatasetVersionRequest(dataset=dataset, version=version))
        return await record_and_content(call, "dataset_version")

    # -- aliases
    async def set_alias(self, model: str, alias: str, version: int, actor: str = "tester",
                        reason: str = "test") -> pb.Alias:
        return await self.stub.SetAlias(pb.SetAliasRequest(model=model, alias=alias, version=version,
                                                           actor=actor, reason=reason))

    async def history(self, model: str, alias: str = "") -> list[pb.AliasMove]:
        return list((await self.stub.GetAliasHistory(pb.GetAliasHistoryRequest(model=model, alias=alias))).moves)


# ---- fixtures -------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def shared_nats(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    """One nats-server for the registries that live longer than a test."""
    server = start_nats(tmp_path_factory.mktemp("shared-nats"))
    yield server
    server.stop()


@dataclass
class Deployment:
    """A running registry deployment: its state, launcher and processes."""

    state: RegistryState
    launcher: RegistryLauncher
    processes: list[RegistryProcess] = field(default_factory=list)

    @property
    def process(self) -> RegistryProcess:
        return self.processes[0]


@pytest.fixture(scope="session", params=BACKENDS)
def shared_registry(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
                    shared_nats: NatsServer) -> Iterator[Deployment]:
    """One registry per backend, shared by the tests that only need the API (fresh names per test)."""
    root = tmp_path_factory.mktemp(f"registry-{request.param}")
    with contextlib.ExitStack() as stack:
        url = stack.enter_context(fresh_postgres_database()) if request.param == "postgres" else ""
        state = make_state(request.param, root, request, url)
        launcher = RegistryLauncher(state, shared_nats.url)
        stack.callback(launcher.stop_all)
        process = launcher.start_sync("shared", {
            "SPLITSTACK_REGISTRY_MAX_UPLOAD_BYTES": str(SHARED_MAX_UPLOAD_BYTES),
            "SPLITSTACK_REGISTRY_MAX_DATASET_ARRAY_BYTES": str(SHARED_MAX_DATASET_ARRAY_BYTES)})
        yield Deployment(state, launcher, [process])


@pytest.fixture
async def channel(shared_registry: Deployment, request: pytest.FixtureRequest) -> AsyncIterator[grpc.aio.Channel]:
    process = shared_registry.process
    assert process.proc.poll() is None, f"the shared registry died (rc {process.proc.returncode}):\n{process.log()}"
    note_log(request.node, f"shared-{shared_registry.state.backend}", process.log_path)
    async with open_channel(process.address) as channel:
        yield channel


@pytest.fixture
def stub(channel: grpc.aio.Channel) -> registry_pb2_grpc.RegistryStub:
    return registry_pb2_grpc.RegistryStub(channel)


@pytest.fixture
def api(stub: registry_pb2_grpc.RegistryStub, shared_registry: Deployment) -> RegistryApi:
    return RegistryApi(stub, shared_registry.state)


@pytest.fixture
def new_client(shared_registry: Deployment) -> Any:
    """`async with new_client() as api:` another client (own channel) of the shared registry."""
    return lambda: shared_registry.launcher.connect(shared_registry.process)


@pytest.fixture
async def events(shared_nats: NatsServer) -> AsyncIterator[EventLog]:
    """The streams the shared registries publish to."""
    async with open_event_log(shared_nats.url) as log:
        yield log


@pytest.fixture(params=BACKENDS)
def registry(request: pytest.FixtureRequest, tmp_path: Path, nats_server: NatsServer) -> Iterator[RegistryLauncher]:
    """Start/kill/restart registry processes on fresh state of the backend and a fresh nats-server."""
    state = make_state(request.param, tmp_path / "registry", request)
    launcher = RegistryLauncher(state, nats_server.url, request.node)
    yield launcher
    launcher.stop_all()


@pytest.fixture
def postgres_registry(request: pytest.FixtureRequest, tmp_path: Path,
                      nats_server: NatsServer) -> Iterator[RegistryLauncher]:
    """Like `registry`, on PostgreSQL + S3 only (for tests about several replicas)."""
    state = make_state("postgres", tmp_path / "registry", request)
    launcher = RegistryLauncher(state, nats_server.url, request.node)
    yield launcher
    launcher.stop_all()


@pytest.fixture(scope="module")
def replica_deployment(tmp_path_factory: pytest.TempPathFactory, shared_nats: NatsServer,
                       s3_server: S3Server) -> Iterator[Deployment]:
    """Two registry processes on one PostgreSQL database and one S3 bucket."""
    root = tmp_path_factory.mktemp("replicas")
    with contextlib.ExitStack() as stack:
        url = stack.enter_context(fresh_postgres_database())
        state = s3_state(root, url, s3_server)
        launcher = RegistryLauncher(state, shared_nats.url)
        stack.callback(launcher.stop_all)
        first = launcher.start_sync("replica-a")   # migrates the empty database alone
        second = launcher.start_sync("replica-b")
        yield Deployment(state, launcher, [first, second])


@pytest.fixture
def replicas(replica_deployment: Deployment, request: pytest.FixtureRequest) -> Deployment:
    """The replica deployment, with its logs attached to this test's report on failure."""
    for process in replica_deployment.processes:
        assert process.proc.poll() is None, f"replica {process.name} died:\n{process.log()}"
        note_log(request.node, process.name, process.log_path)
    return replica_deployment
