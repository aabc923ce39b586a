"""The fuzzed stack: nats-server and the four services as real processes (the end-to-end suite's `Stack`),
seeded with a little real state, plus the checks the fuzzer runs after each batch of inputs.

Seeding, through the registry API only (no required targets anywhere, so no conversion runs unless asked):
models `fuzz-served` and `fuzz-dynamic` (MANUAL promotion), each with a READY version whose cpu serving choice
is a tiny ONNX model (`x` FP32 [batch, 4], resp. [batch, n] -> `y` = Relu(x * scale)) and whose `production`
alias serving follows; model `fuzz-model` with a READY version (a cpu serving choice too, so a fuzzed
RequestConversion finds nothing to build) and a PENDING version; dataset `fuzz-data` with one .npz version. The
trainer gets a cancelled job and a disabled retrain policy, so job ids and policy names exist too. `Seeds`
carries those names to the near-valid strategies.

Invariants: every process alive (`revive` restarts a dead one, and the caller reports it); registry lists
consistent (`registry_inconsistencies`: every artifact of every version downloads and matches its SHA-256,
every serving choice names an artifact of its version, every dataset version downloads and matches, a
dataset's latest version is its highest); every job, retrain policy and conversion listed reads back
(`listed_but_unreadable`); events still flow (`canary_*`: a fresh dataset version's
data.updated reaches the trainer's consumer; a RequestConversion's conversion.requested goes out through the
converter's outbox and is handled by the cpu pool; a fresh alias move reaches serving, which serves it).
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

import grpc  # noqa: E402
import nats  # noqa: E402
import nats.js.errors  # noqa: E402
import numpy as np  # noqa: E402
import onnx  # noqa: E402
from onnx import TensorProto, helper  # noqa: E402

sys.path.insert(0, str(Path(__file__).parents[1] / "e2e"))  # the end-to-end suite's stack helpers
from e2e_stack import SERVICES, Stack  # noqa: E402

from fuzz_rpcs import SERVED_INPUT, SERVED_OUTPUT, SERVED_WIDTH, Seeds, npz_bytes  # noqa: E402
from inference import grpc_service_pb2 as ipb  # noqa: E402
from inference import grpc_service_pb2_grpc as ipb_grpc  # noqa: E402
from splitstack.common.v1 import common_pb2 as common  # noqa: E402
from splitstack.contracts.envelope import unwrap  # noqa: E402
from splitstack.converter.v1 import converter_pb2 as cpb  # noqa: E402
from splitstack.converter.v1 import converter_pb2_grpc  # noqa: E402
from splitstack.events.v1 import events_pb2  # noqa: E402
from splitstack.registry.v1 import registry_pb2 as rpb  # noqa: E402
from splitstack.registry.v1 import registry_pb2_grpc  # noqa: E402
from splitstack.trainer.v1 import trainer_pb2 as tpb  # noqa: E402
from splitstack.trainer.v1 import trainer_pb2_grpc  # noqa: E402

T = TypeVar("T")
MIB = 1 << 20
SERVED = "fuzz-served"
DYNAMIC = "fuzz-dynamic"                # served too: input x FP32 [batch, n], so odd widths reach the model
PLAIN_MODEL = "fuzz-model"
DATASET = "fuzz-data"
CANARY_DATASET = "fuzz-canary"          # never named by the fuzzer's seeds, so no policy retrains on it
CANARY_MODEL = "fuzz-canary-model"      # RequestConversion canaries
RPC_SECONDS = 60.0
EVENT_TIMEOUT = 120.0
CHANNEL_OPTIONS = [("grpc.max_receive_message_length", 64 * MIB), ("grpc.max_send_message_length", 64 * MIB)]
CONSUMERS = {"trainer": ("SPLITSTACK_DATA", "trainer"), "converter": ("SPLITSTACK_MODELS", "converter-cpu"),
             "serving": ("SPLITSTACK_MODELS", "serving-promotions")}   # service -> (stream, consumer label)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def tiny_onnx(scale: float = 1.0, dynamic: bool = False) -> bytes:
    """y = Relu(x * scale) for x FP32 [batch, 4] (or [batch, n]): a servable model that loads in milliseconds."""
    width = "n" if dynamic else SERVED_WIDTH
    graph = helper.make_graph(
        [helper.make_node("Mul", [SERVED_INPUT, "scale"], ["scaled"]), helper.make_node("Relu", ["scaled"], [SERVED_OUTPUT])],
        "fuzz", [helper.make_tensor_value_info(SERVED_INPUT, TensorProto.FLOAT, ["batch", width])],
        [helper.make_tensor_value_info(SERVED_OUTPUT, TensorProto.FLOAT, ["batch", width])],
        [helper.make_tensor("scale", TensorProto.FLOAT, [], [scale])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    buffer = io.BytesIO()
    onnx.save(model, buffer)
    return buffer.getvalue()


def wait_until(check: Callable[[], T], timeout: float, what: str, pause: float = 0.2) -> T:
    """Poll `check()` until truthy; AssertionError naming `what` (and the last error) after `timeout`."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            result = check()
        except (AssertionError, grpc.RpcError) as exc:
            result, last = None, exc
        if result:
            return result
        time.sleep(pause)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}" + (f": {last}" if last else ""))


def on_bus(url: str, work: Callable[[nats.NATS], Awaitable[T]]) -> T:
    """Run `work(nc)` on a fresh NATS connection (closed afterwards)."""
    async def run() -> T:
        nc = await nats.connect(url, connect_timeout=5, max_reconnect_attempts=0)
        try:
            return await work(nc)
        finally:
            await nc.close()
    return asyncio.run(run())


@dataclass
class FuzzStack:
    """A started, seeded stack and its channels."""

    stack: Stack
    channels: dict[str, grpc.Channel] = field(default_factory=dict)
    seeds: Seeds | None = None
    restarts: list[str] = field(default_factory=list)
    served_version: int = 0               # the version of SERVED that production should point at
    dynamic_version: int = 0              # and of DYNAMIC

    @classmethod
    def start(cls, root: Path) -> FuzzStack:
        fuzz = cls(Stack(root, [SERVED, DYNAMIC]))
        fuzz.stack.start_nats()
        fuzz.stack.start("registry")
        fuzz.channels = {s: grpc.insecure_channel(fuzz.stack.address(s), options=CHANNEL_OPTIONS) for s in SERVICES}
        fuzz.seed_registry()
        for service in ("trainer", "serving", "converter"):
            fuzz.stack.launch(service)
        for service in ("trainer", "serving", "converter"):
            fuzz.stack.wait_up(service)
        fuzz.seeds = fuzz.seed_services()
        return fuzz

    def stop(self) -> None:
        for channel in self.channels.values():
            channel.close()
        self.stack.stop()

    @property
    def nats_url(self) -> str:
        return self.stack.nats_url

    @property
    def registry(self) -> registry_pb2_grpc.RegistryStub:
        return registry_pb2_grpc.RegistryStub(self.channels["registry"])

    @property
    def trainer(self) -> trainer_pb2_grpc.TrainerStub:
        return trainer_pb2_grpc.TrainerStub(self.channels["trainer"])

    @property
    def converter(self) -> converter_pb2_grpc.ConverterStub:
        return converter_pb2_grpc.ConverterStub(self.channels["converter"])

    @property
    def serving(self) -> ipb_grpc.GRPCInferenceServiceStub:
        return ipb_grpc.GRPCInferenceServiceStub(self.channels["serving"])

    # ---- seeding ---------------------------------------------------------------------------------------

    def upload(self, header: rpb.ArtifactHeader, data: bytes) -> rpb.Artifact:
        header.sha256, header.size_bytes = sha256(data), len(data)
        parts = [rpb.UploadArtifactRequest(header=header)]
        parts += [rpb.UploadArtifactRequest(chunk=data[i:i + MIB]) for i in range(0, len(data), MIB)]
        return self.registry.UploadArtifact(iter(parts), timeout=RPC_SECONDS)

    def register(self, model: str, *, finalize: bool = True, onnx_bytes: bytes | None = None) -> int:
        """A version of `model` as the trainer registers it (a program that is not one, a real sample);
        with `onnx_bytes`, also its cpu ONNX and serving choice, as the cpu converter pool would."""
        key = uuid.uuid4().hex[:12]
        lineage = rpb.Lineage(training_job=key, metrics={"accuracy": 0.5},
                              primary_metric=common.PrimaryMetric(name="accuracy", direction=common.MAXIMIZE),
                              primary_metric_value=0.5)
        version = self.registry.CreateVersion(rpb.CreateVersionRequest(model=model, idempotency_key=key, lineage=lineage),
                                              timeout=RPC_SECONDS).version
        if not finalize:
            return version
        for kind, data, name in ((common.EXPORTED_PROGRAM, b"not a program " + key.encode(), "model.pt2"),
                                 (common.SAMPLE, npz_bytes(), "sample.npz")):
            self.upload(rpb.ArtifactHeader(model=model, version=version, kind=kind, filename=name,
                                           precision=common.PRECISION_FP32), data)
        self.registry.FinalizeVersion(rpb.FinalizeVersionRequest(model=model, version=version), timeout=RPC_SECONDS)
        if onnx_bytes is not None:
            artifact = self.upload(rpb.ArtifactHeader(model=model, version=version, kind=common.ONNX, target="cpu",
                                                      precision=common.PRECISION_FP32, format=common.ONNX_FP32,
                                                      filename="model.onnx"), onnx_bytes)
            self.registry.SetServingChoice(rpb.SetServingChoiceRequest(
                model=model, version=version, target="cpu", artifact_sha256=artifact.sha256, reason="fuzz seed"),
                timeout=RPC_SECONDS)
        return version

    def restore_served(self, model: str) -> None:
        """Put `model` (a followed one) back as it was: MANUAL policy, production on its good version, loaded."""
        self.manual_policy(model)
        self.promote(model, self.served_version if model == SERVED else self.dynamic_version)
        self.serving.RepositoryModelLoad(ipb.RepositoryModelLoadRequest(model_name=model), timeout=RPC_SECONDS)

    def manual_policy(self, model: str) -> None:
        self.registry.SetPromotionPolicy(rpb.SetPromotionPolicyRequest(
            model=model, policy=rpb.PromotionPolicy(mode=rpb.PromotionPolicy.MANUAL), actor="fuzz"), timeout=RPC_SECONDS)

    def promote(self, model: str, version: int, alias: str = "production") -> None:
        self.registry.SetAlias(rpb.SetAliasRequest(model=model, alias=alias, version=version, actor="fuzz",
                                                   reason="fuzz"), timeout=RPC_SECONDS)

    def upload_dataset(self, name: str, data: bytes) -> rpb.DatasetVersion:
        header = rpb.DatasetVersionHeader(dataset=name, sha256=sha256(data), size_bytes=len(data))
        parts = [rpb.UploadDatasetVersionRequest(header=header), rpb.UploadDatasetVersionRequest(chunk=data)]
        return self.registry.UploadDatasetVersion(iter(parts), timeout=RPC_SECONDS)

    def seed_registry(self) -> None:
        manual = rpb.PromotionPolicy(mode=rpb.PromotionPolicy.MANUAL)
        for name, targets in ((SERVED, []), (DYNAMIC, []), (PLAIN_MODEL, []), (CANARY_MODEL, [])):
            self.registry.CreateModel(rpb.CreateModelRequest(model=rpb.Model(
                name=name, required_targets=targets, promotion_policy=manual)), timeout=RPC_SECONDS)
        self.served_version = self.register(SERVED, onnx_bytes=tiny_onnx())
        self.promote(SERVED, self.served_version)
        self.dynamic_version = self.register(DYNAMIC, onnx_bytes=tiny_onnx(dynamic=True))
        self.promote(DYNAMIC, self.dynamic_version)
        self.register(PLAIN_MODEL, onnx_bytes=tiny_onnx(2.0))
        self.register(PLAIN_MODEL, finalize=False)
        for name in (DATASET, CANARY_DATASET):
            self.registry.CreateDataset(rpb.CreateDatasetRequest(dataset=rpb.Dataset(name=name)), timeout=RPC_SECONDS)
        self.upload_dataset(DATASET, npz_bytes(16))

    def seed_services(self) -> Seeds:
        """A cancelled job and a disabled policy; wait until serving serves; collect the seeds."""
        spec = tpb.JobSpec(model=PLAIN_MODEL, dataset=DATASET, recipe="digits-mlp", max_epochs=1,
                           profile_override=common.TrainingProfile(name="fuzz-cpu", accelerator=common.CPU,
                                                                   precision="32-true", batch_size=8, devices=1,
                                                                   nodes=1))
        job = self.trainer.SubmitJob(tpb.SubmitJobRequest(spec=spec), timeout=RPC_SECONDS)
        self.trainer.CancelJob(tpb.CancelJobRequest(id=job.id, reason="fuzz seed"), timeout=RPC_SECONDS)
        self.trainer.SetRetrainPolicy(tpb.SetRetrainPolicyRequest(policy=tpb.RetrainPolicy(
            name="fuzz-policy", model=PLAIN_MODEL, dataset=DATASET, template=spec, debounce_seconds=3600,
            max_concurrent_jobs=1, enabled=False)), timeout=RPC_SECONDS)
        wait_until(lambda: self.serving.ServerReady(ipb.ServerReadyRequest(), timeout=5).ready, EVENT_TIMEOUT,
                   "serving to serve the followed models")
        return self.collect_seeds([job.id])

    def collect_seeds(self, jobs: list[str]) -> Seeds:
        models, versions, shas = [SERVED, PLAIN_MODEL], set(), []
        for model in models:
            for version in self.registry.ListVersions(rpb.ListVersionsRequest(model=model), timeout=RPC_SECONDS).versions:
                versions.add(version.version)
                shas += [a.sha256 for a in version.artifacts]
        data = self.registry.ListDatasetVersions(rpb.ListDatasetVersionsRequest(dataset=DATASET), timeout=RPC_SECONDS)
        shas += [v.sha256 for v in data.versions]
        profiles = [p.name for p in self.trainer.ListProfiles(tpb.ListProfilesRequest(), timeout=RPC_SECONDS).profiles]
        served = self.serving.ModelMetadata(ipb.ModelMetadataRequest(name=SERVED), timeout=RPC_SECONDS)
        return Seeds(models=models, versions=sorted(versions), datasets=[DATASET],
                     dataset_versions=[v.version for v in data.versions], shas=shas, jobs=jobs,
                     policies=["fuzz-policy"], profiles=profiles, served=SERVED, served_versions=list(served.versions),
                     dynamic=DYNAMIC)

    # ---- invariants ------------------------------------------------------------------------------------

    def revive(self) -> list[str]:
        """Restart every service process that died; the names of the dead (each a finding)."""
        dead = [s for s in SERVICES if self.stack.current[s].proc.poll() is not None]
        for service in dead:
            self.restarts.append(f"{service} (exit {self.stack.current[service].proc.returncode})")
            self.stack.start(service)
        return dead

    def cleanup_work(self) -> None:
        """Cancel jobs the fuzzer got started and delete its retrain policies (keeps the machine quiet)."""
        for job in self.trainer.ListJobs(tpb.ListJobsRequest(page_size=1000), timeout=RPC_SECONDS).jobs:
            if job.state in (tpb.QUEUED, tpb.RUNNING):
                self.trainer.CancelJob(tpb.CancelJobRequest(id=job.id, reason="fuzz clean-up"), timeout=RPC_SECONDS)
        for policy in self.trainer.ListRetrainPolicies(tpb.ListRetrainPoliciesRequest(), timeout=RPC_SECONDS).policies:
            if policy.name != "fuzz-policy":
                self.trainer.DeleteRetrainPolicy(tpb.DeleteRetrainPolicyRequest(name=policy.name), timeout=RPC_SECONDS)

    def registry_inconsistencies(self) -> list[str]:
        """Half-stored records: artifacts or dataset versions without their blob, dangling choices."""
        problems: list[str] = []
        for model in self._all(lambda token: self.registry.ListModels(
                rpb.ListModelsRequest(page_size=100, page_token=token), timeout=RPC_SECONDS), "models"):
            for version in self._all(lambda token, m=model.name: self.registry.ListVersions(
                    rpb.ListVersionsRequest(model=m, page_size=100, page_token=token), timeout=RPC_SECONDS), "versions"):
                problems += self._version_problems(version)
        for dataset in self._all(lambda token: self.registry.ListDatasets(
                rpb.ListDatasetsRequest(page_size=100, page_token=token), timeout=RPC_SECONDS), "datasets"):
            problems += self._dataset_problems(dataset)
        return problems

    def listed_but_unreadable(self) -> list[str]:
        """Records the trainer and the converter list but cannot read back (a half-written row)."""
        problems: list[str] = []
        for job in self._all(lambda token: self.trainer.ListJobs(
                tpb.ListJobsRequest(page_size=100, page_token=token), timeout=RPC_SECONDS), "jobs"):
            problems += self._unreadable(f"job {job.id!r}", lambda j=job: self.trainer.GetJob(
                tpb.GetJobRequest(id=j.id), timeout=RPC_SECONDS))
        for policy in self.trainer.ListRetrainPolicies(tpb.ListRetrainPoliciesRequest(), timeout=RPC_SECONDS).policies:
            problems += self._unreadable(f"retrain policy {policy.name!r}", lambda p=policy: self.trainer.GetRetrainPolicy(
                tpb.GetRetrainPolicyRequest(name=p.name), timeout=RPC_SECONDS))
        for conversion in self._all(lambda token: self.converter.ListConversions(
                cpb.ListConversionsRequest(page_size=100, page_token=token), timeout=RPC_SECONDS), "conversions"):
            problems += self._unreadable(f"conversion {conversion.id!r}", lambda c=conversion: self.converter.GetConversion(
                cpb.GetConversionRequest(model=c.model, version=c.version, target=c.target), timeout=RPC_SECONDS))
        return problems

    @staticmethod
    def _unreadable(what: str, read: Callable[[], object]) -> list[str]:
        try:
            read()
        except grpc.RpcError as exc:
            return [f"{what} is listed but reading it fails: {exc.code().name} {exc.details()}"]
        return []

    @staticmethod
    def _all(page: Callable[[str], object], field_name: str) -> list:
        found, token = [], ""
        for _ in range(1000):
            response = page(token)
            found += list(getattr(response, field_name))
            token = response.next_page_token
            if not token:
                return found
        raise AssertionError(f"listing {field_name} never ended (page token loops)")

    def _version_problems(self, version: rpb.ModelVersion) -> list[str]:
        where = f"{version.model!r} v{version.version}"
        problems = [f"{where}: artifact {a.sha256[:12]} ({common.ArtifactKind.Name(a.kind)}): {p}"
                    for a in version.artifacts if (p := self._blob_problem(a.sha256, a.size_bytes, artifact=True))]
        digests = {a.sha256 for a in version.artifacts}
        problems += [f"{where}: serving choice {c.target!r} names {c.artifact.sha256[:12]}, not an artifact of it"
                     for c in version.serving_choices if c.artifact.sha256 not in digests]
        return problems

    def _dataset_problems(self, dataset: rpb.Dataset) -> list[str]:
        versions = self._all(lambda token: self.registry.ListDatasetVersions(
            rpb.ListDatasetVersionsRequest(dataset=dataset.name, page_size=100, page_token=token),
            timeout=RPC_SECONDS), "versions")
        problems = [f"dataset {dataset.name!r} v{v.version}: {p}" for v in versions
                    if (p := self._blob_problem(v.sha256, v.size_bytes, dataset=(dataset.name, v.version)))]
        highest = max((v.version for v in versions), default=0)
        if dataset.latest_version != highest:
            problems.append(f"dataset {dataset.name!r}: latest_version {dataset.latest_version}, highest listed {highest}")
        return problems

    def _blob_problem(self, digest: str, size: int, artifact: bool = False,
                      dataset: tuple[str, int] | None = None) -> str:
        try:
            if artifact:
                parts = self.registry.DownloadArtifact(rpb.DownloadArtifactRequest(sha256=digest), timeout=RPC_SECONDS)
            else:
                parts = self.registry.DownloadDatasetVersion(rpb.DownloadDatasetVersionRequest(
                    dataset=dataset[0], version=dataset[1]), timeout=RPC_SECONDS)
            content = b"".join(p.chunk for p in parts if p.WhichOneof("part") == "chunk")
        except grpc.RpcError as exc:
            return f"download fails: {exc.code().name} {exc.details()}"
        if sha256(content) != digest or len(content) != size:
            return f"content has sha256 {sha256(content)[:12]} and {len(content)} bytes"
        return ""

    # ---- events still flow -----------------------------------------------------------------------------

    def consumer_state(self, service: str) -> tuple[int, int, int]:
        """(ack floor stream sequence, acks pending, messages pending) of `service`'s consumer."""
        stream, label = CONSUMERS[service]

        async def state(nc: nats.NATS) -> tuple[int, int, int]:
            js = nc.jetstream()
            if service != "serving":
                info = await js.consumer_info(stream, label)
            else:  # the fan-out consumer is ephemeral: "<label>-<random>"
                infos = [i for i in await js.consumers_info(stream) if (i.name or "").startswith(f"{label}-")]
                if not infos:
                    return (0, 0, 0)
                info = infos[0]
            return (info.ack_floor.stream_seq or 0, info.num_ack_pending or 0, info.num_pending or 0)
        return on_bus(self.nats_url, state)

    def wait_settled(self, service: str, sequence: int, timeout: float = EVENT_TIMEOUT) -> None:
        """Wait until `service`'s consumer has acked or terminated everything up to stream `sequence`."""
        def settled() -> bool:
            floor, ack_pending, _ = self.consumer_state(service)
            return floor >= sequence and ack_pending == 0
        wait_until(settled, timeout, f"{CONSUMERS[service][1]} to settle stream sequence {sequence} "
                                     f"(state: {self.consumer_state(service)})", pause=0.3)

    def last_sequence(self, stream: str, subject: str) -> int:
        async def last(nc: nats.NATS) -> int:
            try:
                return (await nc.jetstream().get_last_msg(stream, subject)).seq
            except nats.js.errors.NotFoundError:
                return 0
        return on_bus(self.nats_url, last)

    def dead_letters(self, consumer: str) -> list[events_pb2.DeadLetter]:
        """Every DeadLetter event `consumer` published."""
        async def read(nc: nats.NATS) -> list[events_pb2.DeadLetter]:
            js = nc.jetstream()
            info = await js.stream_info("SPLITSTACK_DEADLETTER")
            letters = []
            for seq in range(info.state.first_seq or 1, (info.state.last_seq or 0) + 1):
                try:
                    msg = await js.get_msg("SPLITSTACK_DEADLETTER", seq)
                except nats.js.errors.NotFoundError:
                    continue
                if msg.subject == f"deadletter.{consumer}":
                    letters.append(unwrap(msg.data).payload)
            return letters
        return on_bus(self.nats_url, read)

    def canary_data(self) -> int:
        """A fresh dataset version through the registry: its data.updated must reach the trainer's consumer."""
        version = self.upload_dataset(CANARY_DATASET, npz_bytes(8 + len(self.restarts)) + uuid.uuid4().bytes)
        subject = f"data.updated.{CANARY_DATASET}"
        sequence = wait_until(lambda: self._published("SPLITSTACK_DATA", subject, lambda p: p.dataset_version.version
                                                     == version.version), EVENT_TIMEOUT,
                              f"{subject} v{version.version} published by the registry's outbox")
        self.wait_settled("trainer", sequence)
        return sequence

    def canary_conversion(self) -> int:
        """RequestConversion of a fresh version (its cpu serving choice already written): the request must go
        out through the converter's outbox, reach the cpu pool's consumer and end SUCCEEDED (nothing to build)."""
        version = self.register(CANARY_MODEL, onnx_bytes=tiny_onnx())
        self.converter.RequestConversion(cpb.RequestConversionRequest(model=CANARY_MODEL, version=version, target="cpu",
                                                                      requested_by="fuzz canary"), timeout=RPC_SECONDS)
        subject = f"conversion.requested.{CANARY_MODEL}.cpu"
        sequence = wait_until(lambda: self._published("SPLITSTACK_MODELS", subject, lambda p: p.version == version),
                              EVENT_TIMEOUT, f"{subject} v{version} published by the converter's outbox")
        self.wait_settled("converter", sequence)

        def succeeded() -> bool:
            return self.converter.GetConversion(cpb.GetConversionRequest(
                model=CANARY_MODEL, version=version, target="cpu"), timeout=RPC_SECONDS).state == cpb.SUCCEEDED
        wait_until(succeeded, EVENT_TIMEOUT, f"the cpu conversion of {CANARY_MODEL} v{version} to succeed")
        return sequence

    def canary_promotion(self) -> int:
        """A fresh version of the served model promoted by SetAlias: serving must serve it. (The policy is
        put back to MANUAL first: under a fuzzed AUTO policy the registry would promote the version on
        FinalizeVersion, before its serving choice exists.)"""
        self.manual_policy(SERVED)
        version = self.register(SERVED, onnx_bytes=tiny_onnx(1.0 + len(self.restarts) + time.time() % 1))
        self.promote(SERVED, version)
        self.served_version = version

        def served() -> bool:
            return self.serving.ModelReady(ipb.ModelReadyRequest(name=SERVED, version=str(version)), timeout=10).ready
        wait_until(served, EVENT_TIMEOUT, f"serving to serve {SERVED} v{version} after its promotion")
        return version

    def _published(self, stream: str, subject: str, match: Callable[[object], bool]) -> int:
        """The stream sequence of the last message on `subject` if its payload matches, else 0."""
        async def find(nc: nats.NATS) -> int:
            try:
                msg = await nc.jetstream().get_last_msg(stream, subject)
            except nats.js.errors.NotFoundError:
                return 0
            try:
                payload = unwrap(msg.data).payload
            except ValueError:  # a poison the fuzzer published on the same subject
                return 0
            return msg.seq if match(payload) else 0
        return on_bus(self.nats_url, find)
