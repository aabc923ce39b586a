"""Black-box test support: real `splitstack-registry` and `splitstack-trainer` processes, clients of
their gRPC APIs with deadlines, the digits dataset, and readers of the event streams.

The trainer is reached only through gRPC and NATS, as in a deployment; the registry runs on SQLite
and a local artifact directory. Every process writes its output to a log file, attached to the
report of a test that fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import uuid
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import nats
import nats.js.errors
import numpy as np
from sklearn.datasets import load_digits

from splitstack.chassis.testing.processes import ServiceProcess, spawn_service
from splitstack.contracts.envelope import MSG_ID_HEADER, Event, unwrap
from splitstack.registry.v1 import registry_pb2 as rpb
from splitstack.registry.v1 import registry_pb2_grpc
from splitstack.trainer.v1 import trainer_pb2 as pb
from splitstack.trainer.v1 import trainer_pb2_grpc

MIB = 1024 * 1024
START_TIMEOUT_SECONDS = 90.0
RPC_TIMEOUT_SECONDS = 60.0
JOB_TIMEOUT_SECONDS = 120.0
CHANNEL_OPTIONS = [("grpc.max_receive_message_length", 64 * MIB), ("grpc.max_send_message_length", 64 * MIB)]
TERMINAL = (pb.SUCCEEDED, pb.FAILED, pb.CANCELLED)

# Fast settings for tests: small epochs, frequent progress, quick polls.
FAST_TRAINER_ENV = {
    "SPLITSTACK_TRAINER_DEFAULT_MAX_EPOCHS": "3",
    "SPLITSTACK_TRAINER_PROGRESS_INTERVAL_SECONDS": "0.2",
    "SPLITSTACK_TRAINER_WATCH_POLL_SECONDS": "0.2",
    "SPLITSTACK_TRAINER_RETRAIN_TICK_SECONDS": "0.1",
    "SPLITSTACK_TRAINER_RELAY_POLL_SECONDS": "0.2",
    "SPLITSTACK_TRAINER_CANCEL_GRACE_SECONDS": "3",
    "SPLITSTACK_TRAINER_SHUTDOWN_GRACE_SECONDS": "5",
    "SPLITSTACK_TRAINER_KUBERNETES_POLL_SECONDS": "0.2",
}
SMALL_MLP = {"hidden": 32, "layers": 1}     # where a test does not need the 1024-wide network


# ---- processes -------------------------------------------------------------------------------------

def spawn(command: str, name: str, root: Path, env: Mapping[str, str],
          crash_points: Iterable[str] = ()) -> ServiceProcess:
    """Start console script `command` under `root` (logs in `root/run`) and wait until it is ready."""
    return spawn_service(command, name, root / "run", env, cwd=root, crash_points=crash_points,
                         ready_timeout=START_TIMEOUT_SECONDS)


def start_registry(root: Path, nats_url: str, *, port: int = 0, crash_points: Iterable[str] = (),
                   process_name: str = "registry") -> ServiceProcess:
    """A registry on SQLite + a local artifact directory under `root` (on `port` when given: a restart
    where its clients expect it)."""
    env = {"SPLITSTACK_NATS_URL": nats_url, "SPLITSTACK_REGISTRY_DATABASE_URL": f"sqlite:///{root / 'registry.db'}",
           "SPLITSTACK_REGISTRY_ARTIFACT_DIR": str(root / "artifacts"),
           "SPLITSTACK_REGISTRY_RELAY_POLL_SECONDS": "0.2", "SPLITSTACK_REGISTRY_SHUTDOWN_GRACE_SECONDS": "5"}
    if port:
        env["SPLITSTACK_REGISTRY_GRPC_PORT"] = str(port)
    return spawn("splitstack-registry", process_name, root, env, crash_points)


@dataclass
class TrainerLauncher:
    """Starts (and restarts) trainer processes on one state directory."""

    root: Path
    nats_url: str
    registry_addr: str
    extra_env: dict[str, str] = field(default_factory=dict)
    started: list[ServiceProcess] = field(default_factory=list)

    def env(self, **extra: str) -> dict[str, str]:
        return {"SPLITSTACK_NATS_URL": self.nats_url, "SPLITSTACK_REGISTRY_ADDR": self.registry_addr,
                "SPLITSTACK_TRAINER_DATABASE_URL": f"sqlite:///{self.root / 'trainer.db'}",
                "SPLITSTACK_TRAINER_WORK_DIR": str(self.root / "work"), **FAST_TRAINER_ENV,
                **self.extra_env, **extra}

    def start(self, crash_points: Iterable[str] = (), **extra: str) -> ServiceProcess:
        name = f"trainer-{len(self.started) + 1}"
        process = spawn("splitstack-trainer", name, self.root, self.env(**extra), crash_points)
        self.started.append(process)
        return process

    def stop_all(self) -> None:
        for process in self.started:
            process.stop()

    def log_files(self) -> list[tuple[str, Path]]:
        files = [(p.name, p.log_path) for p in self.started]
        files += [(f"{p.parent.name}/{p.name}", p) for p in sorted((self.root / "work" / "jobs").glob("*/rank-*.log"))]
        return files


# ---- gRPC ------------------------------------------------------------------------------------------

@contextlib.asynccontextmanager
async def open_channel(address: str) -> AsyncIterator[grpc.aio.Channel]:
    channel = grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
    try:
        yield channel
    finally:
        await asyncio.wait_for(channel.close(), 10)


def name(prefix: str) -> str:
    """A fresh name obeying the naming rule."""
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def digits_npz(rows: int | None = None, seed: int = 0) -> bytes:
    """scikit-learn's bundled digits as the trainer's datasets hold them (inputs N x 64 in [0, 1], labels)."""
    data = load_digits()
    inputs, labels = (data.data / 16.0).astype(np.float32), data.target.astype(np.int64)
    if rows is not None:
        order = np.random.default_rng(seed).permutation(len(inputs))[:rows]
        inputs, labels = inputs[order], labels[order]
    buffer = io.BytesIO()
    np.savez(buffer, inputs=inputs, labels=labels)
    return buffer.getvalue()


class RegistryApi:
    """The registry steps the trainer tests need."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.stub = registry_pb2_grpc.RegistryStub(channel)

    async def dataset(self, dataset: str, versions: Iterable[bytes]) -> list[rpb.DatasetVersion]:
        """Create `dataset` and upload each blob as a version."""
        await self.stub.CreateDataset(rpb.CreateDatasetRequest(dataset=rpb.Dataset(name=dataset)),
                                      timeout=RPC_TIMEOUT_SECONDS)
        return [await self.upload_dataset(dataset, data) for data in versions]

    async def upload_dataset(self, dataset: str, data: bytes) -> rpb.DatasetVersion:
        header = rpb.DatasetVersionHeader(dataset=dataset, sha256=hashlib.sha256(data).hexdigest(),
                                          size_bytes=len(data))

        async def parts() -> AsyncIterator[rpb.UploadDatasetVersionRequest]:
            yield rpb.UploadDatasetVersionRequest(header=header)
            yield rpb.UploadDatasetVersionRequest(chunk=data)

        return await self.stub.UploadDatasetVersion(parts(), timeout=RPC_TIMEOUT_SECONDS)

    async def version(self, model: str, version: int) -> rpb.ModelVersion:
        return await self.stub.GetVersion(rpb.GetVersionRequest(model=model, version=version),
                                          timeout=RPC_TIMEOUT_SECONDS)

    async def versions(self, model: str) -> list[rpb.ModelVersion]:
        try:
            page = await self.stub.ListVersions(rpb.ListVersionsRequest(model=model, page_size=1000),
                                                timeout=RPC_TIMEOUT_SECONDS)
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                return []
            raise
        return list(page.versions)

    async def download(self, sha256: str) -> bytes:
        content = b""
        async for part in self.stub.DownloadArtifact(rpb.DownloadArtifactRequest(sha256=sha256),
                                                     timeout=RPC_TIMEOUT_SECONDS):
            if part.WhichOneof("part") == "chunk":
                content += part.chunk
        return content


class TrainerApi:
    """The trainer's API with deadlines, and waiting helpers."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.stub = trainer_pb2_grpc.TrainerStub(channel)

    async def submit(self, spec: pb.JobSpec) -> pb.Job:
        return await self.stub.SubmitJob(pb.SubmitJobRequest(spec=spec), timeout=RPC_TIMEOUT_SECONDS)

    async def get(self, job_id: str) -> pb.Job:
        return await self.stub.GetJob(pb.GetJobRequest(id=job_id), timeout=RPC_TIMEOUT_SECONDS)

    async def jobs(self, model: str = "", state: int = 0) -> list[pb.Job]:
        reply = await self.stub.ListJobs(pb.ListJobsRequest(model=model, state=state, page_size=1000),
                                         timeout=RPC_TIMEOUT_SECONDS)
        return list(reply.jobs)

    async def set_policy(self, policy: pb.RetrainPolicy) -> pb.RetrainPolicy:
        return await self.stub.SetRetrainPolicy(pb.SetRetrainPolicyRequest(policy=policy), timeout=RPC_TIMEOUT_SECONDS)

    async def only_job(self, model: str, timeout: float = JOB_TIMEOUT_SECONDS) -> pb.Job:
        """Wait for a job of `model` to exist; there must be exactly one."""
        deadline = asyncio.get_running_loop().time() + timeout
        while not (jobs := await self.jobs(model=model)):
            assert asyncio.get_running_loop().time() < deadline, f"no job of {model} within {timeout}s"
            await asyncio.sleep(0.1)
        assert len(jobs) == 1, [(j.id, j.spec.dataset_version) for j in jobs]
        return jobs[0]

    async def cancel(self, job_id: str, reason: str = "test") -> pb.Job:
        return await self.stub.CancelJob(pb.CancelJobRequest(id=job_id, reason=reason), timeout=RPC_TIMEOUT_SECONDS)

    async def wait(self, job_id: str, states: Iterable[int] = TERMINAL, timeout: float = JOB_TIMEOUT_SECONDS,
                   check: Any = None) -> pb.Job:
        """Poll GetJob until the job is in one of `states` (and `check(job)` holds, if given)."""
        wanted = set(states)
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            job = await self.get(job_id)
            if job.state in wanted and (check is None or check(job)):
                return job
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"job {job_id} not in {[pb.JobState.Name(s) for s in wanted]} within "
                                     f"{timeout}s: {job}")
            await asyncio.sleep(0.1)

    async def fails(self, call: Any, code: grpc.StatusCode, *words: str) -> str:
        """Await `call`; assert it fails with `code` and a message naming every word (case-insensitive)."""
        try:
            result = await call
        except grpc.aio.AioRpcError as exc:
            details = exc.details() or ""
            assert exc.code() == code, f"expected {code.name}, got {exc.code().name}: {details}"
            for word in words:
                assert word.lower() in details.lower(), f"{code.name} message does not name {word!r}: {details}"
            return details
        raise AssertionError(f"expected {code.name}, but the call succeeded: {result}")


def retrain_policy(policy_name: str, model: str, dataset: str, **fields: Any) -> pb.RetrainPolicy:
    """An enabled policy retraining `model` (small digits-mlp, one epoch) on every version of `dataset`."""
    template = spec(model, dataset, max_epochs=1)
    template.ClearField("dataset")
    values: dict[str, Any] = {"debounce_seconds": 0.0, "enabled": True, **fields}
    return pb.RetrainPolicy(name=policy_name, model=model, dataset=dataset, template=template, **values)


def spec(model: str, dataset: str, **fields: Any) -> pb.JobSpec:
    """A digits-mlp job spec (small network) unless fields say otherwise."""
    fields.setdefault("recipe", "digits-mlp")
    hyperparameters = fields.pop("hyperparameters", SMALL_MLP if fields["recipe"] == "digits-mlp" else {})
    job = pb.JobSpec(model=model, dataset=dataset, **fields)
    job.hyperparameters.update(hyperparameters)
    return job


# ---- events ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class StoredEvent:
    """One message stored in a contract stream, decoded."""

    subject: str
    msg_id: str
    event: Event

    @property
    def payload(self) -> Any:
        return self.event.payload


class EventLog:
    """Reads stored stream messages (JetStream get-by-sequence) and collects core-NATS progress."""

    def __init__(self, nc: nats.NATS) -> None:
        self.nc = nc
        self.js = nc.jetstream()

    async def read(self, stream: str, pattern: str = ">") -> list[StoredEvent]:
        found: list[StoredEvent] = []
        seq = 1
        while True:
            try:
                msg = await self.js.get_msg(stream, seq=seq, subject=pattern, next=True)
            except nats.js.errors.NotFoundError:
                return found
            found.append(StoredEvent(msg.subject, (msg.headers or {}).get(MSG_ID_HEADER, ""), unwrap(msg.data or b"")))
            seq = msg.seq + 1

    async def wait_for(self, stream: str, pattern: str, count: int = 1, timeout: float = 30.0) -> list[StoredEvent]:
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            found = await self.read(stream, pattern)
            if len(found) >= count:
                return found
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"expected {count} event(s) on {pattern} within {timeout}s, got {len(found)}")
            await asyncio.sleep(0.1)

    @contextlib.asynccontextmanager
    async def progress(self, job_id: str = "*") -> AsyncIterator[list[pb.Progress]]:
        """Collect training.progress.<job> messages while the block runs."""
        seen: list[pb.Progress] = []

        async def on_message(msg: Any) -> None:
            seen.append(unwrap(msg.data).payload.progress)

        sub = await self.nc.subscribe(f"training.progress.{job_id}", cb=on_message)
        try:
            yield seen
        finally:
            await sub.unsubscribe()


@contextlib.asynccontextmanager
async def open_event_log(url: str) -> AsyncIterator[EventLog]:
    nc = await nats.connect(url, connect_timeout=5, max_reconnect_attempts=3)
    try:
        yield EventLog(nc)
    finally:
        await asyncio.wait_for(nc.close(), 5)


def job_processes(job_id: str) -> list[int]:
    """Pids of live processes whose command line carries `job_id` (the job's ranks)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes()
                status = (entry / "stat").read_text()
            except OSError:
                continue
            if job_id.encode() in cmdline and b"splitstack_trainer.job" in cmdline and ") Z " not in status:
                found.append(int(entry.name))
    return found
