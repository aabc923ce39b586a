"""Clients of the stack's contracts, and nothing else: the registry and trainer gRPC APIs (generated
stubs, every call with a deadline), the Open Inference Protocol of serving, and the JetStream streams
the services publish to (subjects from `splitstack.contracts.events`).

`Predictor` is a client thread that keeps asking serving for predictions while a test runs and
records every failure with its time, so a test can prove that nothing failed except while serving
itself was down.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
import nats
import nats.js.errors
import numpy as np

from inference import grpc_service_pb2 as ipb
from inference import grpc_service_pb2_grpc as ipb_grpc
from splitstack.common.v1 import common_pb2 as common
from splitstack.converter.v1 import converter_pb2 as cpb
from splitstack.converter.v1 import converter_pb2_grpc
from splitstack.contracts.envelope import MSG_ID_HEADER, Event, unwrap
from splitstack.contracts.events import STREAMS
from splitstack.registry.v1 import registry_pb2 as rpb
from splitstack.registry.v1 import registry_pb2_grpc
from splitstack.trainer.v1 import trainer_pb2 as tpb
from splitstack.trainer.v1 import trainer_pb2_grpc

MIB = 1024 * 1024
RPC_SECONDS = 30.0
PREDICT_SECONDS = 5.0
CHANNEL_OPTIONS = [("grpc.max_receive_message_length", 64 * MIB), ("grpc.max_send_message_length", 64 * MIB)]
RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


def channel(address: str) -> grpc.Channel:
    return grpc.insecure_channel(address, options=CHANNEL_OPTIONS)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def npz(**arrays: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def read_npz(data: bytes) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(data)) as loaded:
        return {key: loaded[key] for key in loaded.files}


def patiently(call: Callable[..., Any], *args: Any, timeout: float = 120.0, **kwargs: Any) -> Any:
    """`call(*args, **kwargs)`, retried while the peer is unreachable (a restart in progress)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return call(*args, timeout=RPC_SECONDS, **kwargs)
        except grpc.RpcError as exc:
            if exc.code() not in RETRYABLE or time.monotonic() > deadline:
                raise
            time.sleep(0.3)


class RegistryClient:
    """The registry API (retrying while the registry restarts)."""

    def __init__(self, address: str) -> None:
        self.channel = channel(address)
        self.stub = registry_pb2_grpc.RegistryStub(self.channel)

    def close(self) -> None:
        self.channel.close()

    def create_dataset(self, name: str) -> None:
        patiently(self.stub.CreateDataset, rpb.CreateDatasetRequest(dataset=rpb.Dataset(name=name)))

    def upload_dataset(self, name: str, data: bytes) -> rpb.DatasetVersion:
        header = rpb.DatasetVersionHeader(dataset=name, sha256=sha256(data), size_bytes=len(data),
                                          idempotency_key=f"e2e-{sha256(data)[:16]}")
        parts = [rpb.UploadDatasetVersionRequest(header=header), rpb.UploadDatasetVersionRequest(chunk=data)]
        return patiently(lambda timeout: self.stub.UploadDatasetVersion(iter(parts), timeout=timeout))

    def create_model(self, model: rpb.Model) -> rpb.Model:
        return patiently(self.stub.CreateModel, rpb.CreateModelRequest(model=model))

    def version(self, model: str, version: int) -> rpb.ModelVersion:
        return patiently(self.stub.GetVersion, rpb.GetVersionRequest(model=model, version=version))

    def versions(self, model: str) -> list[rpb.ModelVersion]:
        try:
            page = patiently(self.stub.ListVersions, rpb.ListVersionsRequest(model=model, page_size=1000))
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                return []
            raise
        return list(page.versions)

    def alias(self, model: str, alias: str = "production") -> int:
        """The version `alias` points at (0 when it does not exist)."""
        try:
            return patiently(self.stub.ResolveAlias, rpb.ResolveAliasRequest(model=model, alias=alias)).alias.version
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                return 0
            raise

    def history(self, model: str) -> list[rpb.AliasMove]:
        try:
            return list(patiently(self.stub.GetAliasHistory, rpb.GetAliasHistoryRequest(model=model)).moves)
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                return []
            raise

    def set_alias(self, model: str, version: int, reason: str, alias: str = "production") -> rpb.Alias:
        request = rpb.SetAliasRequest(model=model, alias=alias, version=version, actor="e2e-operator", reason=reason)
        return patiently(self.stub.SetAlias, request)

    def download(self, sha: str = "", **key: Any) -> tuple[rpb.Artifact, bytes]:
        """An artifact by digest (or key) and its content."""
        def fetch(timeout: float) -> tuple[rpb.Artifact, bytes]:
            record, content = None, bytearray()
            for part in self.stub.DownloadArtifact(rpb.DownloadArtifactRequest(sha256=sha, **key), timeout=timeout):
                if part.WhichOneof("part") == "artifact":
                    record = part.artifact
                else:
                    content += part.chunk
            return record, bytes(content)
        return patiently(fetch)

    def upload(self, header: rpb.ArtifactHeader, data: bytes) -> rpb.Artifact:
        header.sha256, header.size_bytes = sha256(data), len(data)
        parts = [rpb.UploadArtifactRequest(header=header)]
        parts += [rpb.UploadArtifactRequest(chunk=data[i:i + MIB]) for i in range(0, len(data), MIB)]
        return patiently(lambda timeout: self.stub.UploadArtifact(iter(parts), timeout=timeout))

    def create_version(self, model: str, key: str, lineage: rpb.Lineage, signature: common.Signature) -> int:
        request = rpb.CreateVersionRequest(model=model, idempotency_key=key, lineage=lineage, signature=signature)
        return patiently(self.stub.CreateVersion, request).version

    def finalize(self, model: str, version: int) -> rpb.ModelVersion:
        return patiently(self.stub.FinalizeVersion, rpb.FinalizeVersionRequest(model=model, version=version))

    def set_serving_choice(self, model: str, version: int, target: str, artifact_sha: str, reason: str) -> Any:
        request = rpb.SetServingChoiceRequest(model=model, version=version, target=target,
                                              artifact_sha256=artifact_sha, reason=reason)
        return patiently(self.stub.SetServingChoice, request)


class TrainerClient:
    """The trainer API."""

    def __init__(self, address: str) -> None:
        self.channel = channel(address)
        self.stub = trainer_pb2_grpc.TrainerStub(self.channel)

    def close(self) -> None:
        self.channel.close()

    def submit(self, spec: tpb.JobSpec) -> tpb.Job:
        return patiently(self.stub.SubmitJob, tpb.SubmitJobRequest(spec=spec))

    def job(self, job_id: str) -> tpb.Job:
        return patiently(self.stub.GetJob, tpb.GetJobRequest(id=job_id))

    def jobs(self, model: str) -> list[tpb.Job]:
        return list(patiently(self.stub.ListJobs, tpb.ListJobsRequest(model=model, page_size=1000)).jobs)

    def set_policy(self, policy: tpb.RetrainPolicy) -> tpb.RetrainPolicy:
        return patiently(self.stub.SetRetrainPolicy, tpb.SetRetrainPolicyRequest(policy=policy))


class ConverterClient:
    """The converter API (conversion records of its pool)."""

    def __init__(self, address: str) -> None:
        self.channel = channel(address)
        self.stub = converter_pb2_grpc.ConverterStub(self.channel)

    def close(self) -> None:
        self.channel.close()

    def conversions(self, model: str) -> list[cpb.Conversion]:
        request = cpb.ListConversionsRequest(model=model, page_size=1000)
        return list(patiently(self.stub.ListConversions, request).conversions)


# ---- serving ------------------------------------------------------------------------------------------

def infer_request(model: str, rows: np.ndarray, version: str = "") -> ipb.ModelInferRequest:
    request = ipb.ModelInferRequest(model_name=model, model_version=version)
    request.inputs.add(name="x", datatype="FP32", shape=rows.shape)
    request.raw_input_contents.append(np.ascontiguousarray(rows, dtype=np.float32).tobytes())
    return request


def logits_of(response: ipb.ModelInferResponse) -> np.ndarray:
    tensor = response.outputs[0]
    return np.frombuffer(response.raw_output_contents[0], np.float32).reshape(tuple(tensor.shape))


class ServingClient:
    """The Open Inference Protocol of one serving process."""

    def __init__(self, address: str) -> None:
        self.channel = channel(address)
        self.stub = ipb_grpc.GRPCInferenceServiceStub(self.channel)

    def close(self) -> None:
        self.channel.close()

    def infer(self, model: str, rows: np.ndarray, timeout: float = PREDICT_SECONDS) -> ipb.ModelInferResponse:
        return self.stub.ModelInfer(infer_request(model, rows), timeout=timeout)

    def served(self, model: str) -> tuple[str, str]:
        """(current version, artifact sha256) serving answers `model` with now ("", "" when it cannot)."""
        try:
            response = self.infer(model, np.zeros((1, 64), np.float32), timeout=2.0)
        except grpc.RpcError:
            return "", ""
        return response.model_version, response.parameters["artifact_sha256"].string_param

    def accuracy(self, model: str, inputs: np.ndarray, labels: np.ndarray) -> tuple[float, set[str]]:
        """Top-1 accuracy of what serves `model` on the rows (batches of 32), and the versions that answered."""
        correct, versions = 0, set()
        for start in range(0, len(inputs), 32):
            response = self.infer(model, inputs[start:start + 32])
            correct += int((logits_of(response).argmax(axis=1) == labels[start:start + 32]).sum())
            versions.add(response.model_version)
        return correct / len(inputs), versions


@dataclass
class Outcome:
    at: float
    version: str = ""
    error: str = ""


@dataclass
class Predictor:
    """A thread predicting `rows` on `model` every `pause` seconds; every outcome is recorded."""

    address: str
    model: str
    rows: np.ndarray
    pause: float = 0.05
    outcomes: list[Outcome] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"predictor-{self.model}", daemon=True)

    def __enter__(self) -> Predictor:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)

    def _run(self) -> None:
        client = ServingClient(self.address)
        try:
            while not self._stop.is_set():
                try:
                    response = client.infer(self.model, self.rows)
                    self.outcomes.append(Outcome(time.monotonic(), version=response.model_version))
                except grpc.RpcError as exc:
                    self.outcomes.append(Outcome(time.monotonic(), error=f"{exc.code().name}: {exc.details()}"))
                self._stop.wait(self.pause)
        finally:
            client.close()

    def failures(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.error]

    def versions(self) -> list[str]:
        """The versions that answered, in order, without repeats."""
        seen: list[str] = []
        for outcome in self.outcomes:
            if outcome.version and (not seen or seen[-1] != outcome.version):
                seen.append(outcome.version)
        return seen

    def wait_answered(self, version: str, timeout: float = 60.0) -> None:
        """Wait until `version` has answered at least once."""
        deadline = time.monotonic() + timeout
        while not any(o.version == version for o in list(self.outcomes)):
            assert time.monotonic() < deadline, f"version {version} never answered; seen {self.versions()}"
            time.sleep(0.1)


# ---- events -------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class StoredEvent:
    """One message a contract stream stores."""

    stream: str
    subject: str
    msg_id: str
    event: Event

    @property
    def payload(self) -> Any:
        return self.event.payload


async def _read_streams(url: str) -> list[StoredEvent]:
    nc = await nats.connect(url, connect_timeout=5, max_reconnect_attempts=1, allow_reconnect=False)
    try:
        js = nc.jetstream()
        found: list[StoredEvent] = []
        for stream in STREAMS:
            found += [e async for e in _stored(js, stream)]
        return found
    finally:
        await asyncio.wait_for(nc.close(), 5)


async def _stored(js: Any, stream: str) -> AsyncIterator[StoredEvent]:
    seq = 1
    while True:
        try:
            msg = await js.get_msg(stream, seq=seq, subject=">", next=True)
        except nats.js.errors.NotFoundError:
            return
        yield StoredEvent(stream, msg.subject, (msg.headers or {}).get(MSG_ID_HEADER, ""), unwrap(msg.data or b""))
        seq = msg.seq + 1


def stored_events(url: str) -> list[StoredEvent]:
    """Every message every contract stream holds, stream by stream in sequence order."""
    return asyncio.run(_read_streams(url))


def events_on(url: str, prefix: str) -> list[StoredEvent]:
    """The stored events whose subject starts with `prefix`."""
    return [e for e in stored_events(url) if e.subject.startswith(prefix)]
