"""One conversion of one model version for this pool's target, from fetch to registration.

fetch (version READY, exported program and sample downloaded, digests verified; primary metric
and tolerance resolved) -> export -> optimize -> one candidate per target format (quantize /
build) -> gate -> profile -> select -> crash point `converter.mid_conversion` -> register: every
accepted candidate's artifact is uploaded first (with its gate result and profile), the serving
choice is written last, so a conversion that fails or dies before the end registers no choice.
CPU-heavy stages run in the pool's executor; progress goes to the store through `progress`.

Nothing the registry holds is trusted: the exported program is loaded and exported in a child
process without credentials and under the pool's time and memory limits (see
`pipeline.isolation`), its ONNX model is checked here; ONNX Runtime optimizes, quantizes, gates
and measures in children too. An artifact already registered under a candidate's key (an
interrupted earlier attempt, or anybody with access to the registry's API) is downloaded, its
digest verified, and gated and measured here like a fresh candidate; its recorded gate result
and profile are ignored.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable, Mapping
from concurrent.futures import Executor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from splitstack.chassis.faults import crash_point
from splitstack.common.v1 import common_pb2
from splitstack.contracts import handoff
from splitstack.converter.v1 import converter_pb2 as pb
from splitstack.registry.v1 import registry_pb2
from splitstack_converter.pipeline import PipelineError
from splitstack_converter.pipeline.build import CandidateBuilder, TargetBuild
from splitstack_converter.pipeline.candidates import Candidate
from splitstack_converter.pipeline.gate import Tolerance, check_metric, resolve_tolerance
from splitstack_converter.pipeline.isolation import ChildLimits
from splitstack_converter.pipeline.sample import load_sample
from splitstack_converter.pipeline.select import Selection, choose
from splitstack_converter.pipeline.worker import export_in_child, optimize_in_child
from splitstack_converter.registry_client import DigestMismatch, RegistryClient, RegistryRejected
from splitstack_converter.store import conversion_id

log = logging.getLogger(__name__)

CRASH_POINT = "converter.mid_conversion"
STAGE_OF_FORMAT = {common_pb2.ONNX_FP32: "optimize", common_pb2.ONNX_INT8: "quantize",
                   common_pb2.TENSORRT_FP16: "build", common_pb2.TENSORRT_INT8: "build"}

Progress = Callable[[Callable[[pb.Conversion], None]], Awaitable[None]]


@dataclass(frozen=True)
class ConversionJob:
    """What to convert, and the event that asked for it."""

    model: str
    version: int
    target: str
    trigger_event_id: str
    explicit: bool                                   # conversion.requested (True) or model.registered
    tolerance: common_pb2.GateTolerance | None = None
    requested_by: str = ""
    announced_digests: Mapping[int, str] = field(default_factory=dict)   # artifact kind -> sha256

    @property
    def id(self) -> str:
        return conversion_id(self.model, self.version, self.target)


@dataclass(frozen=True)
class Policy:
    """How this pool converts: its target build settings and the gate and selection rules."""

    build: TargetBuild
    default_tolerance: Tolerance
    calibration_rows: int = 512
    optimization_level: str = "basic"
    switch_margin: float = 0.10
    producer: str = "converter"
    load_limits: ChildLimits = ChildLimits()    # the child that loads and exports the program
    allow_pickled_programs: bool = False        # let torch unpickle arbitrary objects in that child


class ConversionRun:
    """Runs one claimed conversion; `candidates` holds the verdicts so far (also after a failure)."""

    def __init__(self, job: ConversionJob, policy: Policy, registry: RegistryClient, workdir: Path,
                 executor: Executor, progress: Progress) -> None:
        self.job = job
        self.policy = policy
        self.registry = registry
        self.workdir = workdir
        self.candidates: list[Candidate] = []
        self.stage = "fetch"
        self._executor = executor
        self._progress = progress

    async def execute(self) -> registry_pb2.ServingChoice:
        """Convert, register and return the serving choice; PipelineError when the conversion fails."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        program, sample_path, metric, tolerance = await self._fetch()
        await self._enter("export")
        exported, optimized = self.workdir / "exported.onnx", self.workdir / "optimized.onnx"
        info = await self._thread(functools.partial(
            export_in_child, program, exported, self.workdir / "child-export", self.policy.load_limits,
            allow_pickle=self.policy.allow_pickled_programs))
        await self._enter("optimize")
        await self._thread(optimize_in_child, exported, optimized, self.policy.optimization_level,
                           self.workdir / "child-optimize", self.policy.build.limits)
        sample = await self._thread(load_sample, sample_path, info.features, self.policy.calibration_rows)
        builder = CandidateBuilder(self.policy.build, optimized, info, sample, self.workdir)
        for fmt in self.policy.build.target.candidate_formats:
            await self._enter(STAGE_OF_FORMAT.get(fmt, "build"))
            self.candidates.append(await self._thread(builder.build, fmt))
        await self._judge(builder, metric, tolerance)
        selection = self._select()
        crash_point(CRASH_POINT)
        await self._enter("register")
        return await self._register(selection, builder, metric, tolerance)

    # -- stages
    async def _fetch(self) -> tuple[Path, Path, common_pb2.PrimaryMetric, Tolerance]:
        job = self.job
        try:
            version = await self.registry.get_version(job.model, job.version)
            model = await self.registry.get_model(job.model)
        except RegistryRejected as exc:
            raise PipelineError("fetch", str(exc)) from None
        if version.state != registry_pb2.READY:
            raise PipelineError("fetch", f"model {job.model!r} version {job.version} is not READY (not finalized)")
        program = await self._download(version, common_pb2.EXPORTED_PROGRAM, handoff.EXPORTED_PROGRAM_FILENAME)
        sample = await self._download(version, common_pb2.SAMPLE, handoff.SAMPLE_FILENAME)
        metric = next((m for m in (version.lineage.primary_metric, model.primary_metric) if m.name),
                      handoff.DEFAULT_PRIMARY_METRIC)
        check_metric(metric)
        try:
            tolerance = resolve_tolerance(self.policy.default_tolerance, model.labels, job.tolerance)
        except ValueError as exc:
            raise PipelineError("fetch", f"gate tolerance: {exc}") from None
        await self._progress(lambda record: record.tolerance.CopyFrom(tolerance.to_pb()))
        return program, sample, metric, tolerance

    async def _download(self, version: registry_pb2.ModelVersion, kind: int, filename: str) -> Path:
        name = common_pb2.ArtifactKind.Name(kind)
        found = [a for a in version.artifacts if a.kind == kind and not a.target]
        if not found:
            raise PipelineError("fetch", f"model {self.job.model!r} version {self.job.version} has no {name} artifact")
        artifact = found[0]
        announced = self.job.announced_digests.get(kind)
        if announced and announced != artifact.sha256:
            raise PipelineError("fetch", f"{name}: the event announced sha256 {announced}, the registry holds "
                                         f"{artifact.sha256}")
        dest = self.workdir / filename
        try:
            await self.registry.download(artifact.sha256, dest)
        except (DigestMismatch, RegistryRejected) as exc:
            raise PipelineError("fetch", f"{name}: {exc}") from None
        return dest

    async def _judge(self, builder: CandidateBuilder, metric: common_pb2.PrimaryMetric, tolerance: Tolerance) -> None:
        await self._enter("gate")
        for candidate in self.candidates:
            if candidate.path is not None:
                await self._thread(builder.gate, candidate, metric, tolerance)
        await self._publish_candidates()
        await self._enter("profile")
        for candidate in self.candidates:
            if candidate.accepted:
                await self._thread(builder.profile, candidate)
        await self._publish_candidates()

    def _select(self) -> Selection:
        selection = choose(self.candidates, self.policy.build.target.selection_metric, self.policy.switch_margin)
        for candidate in self.candidates:
            if candidate is selection.chosen:
                candidate.reason = f"{_registered_note(candidate)}chosen: {selection.reason}"
            elif candidate.accepted:
                candidate.reason = f"{_registered_note(candidate)}passed, not chosen: {candidate.gate.reason}"
        log.info("%s: %s", self.job.id, selection.reason)
        return selection

    async def _register(self, selection: Selection, builder: CandidateBuilder, metric: common_pb2.PrimaryMetric,
                        tolerance: Tolerance) -> registry_pb2.ServingChoice:
        """Upload every accepted candidate, then write the serving choice (last)."""
        job = self.job
        try:
            selection = await self._adopt_registered(selection, builder, metric, tolerance)
            for candidate in self.candidates:
                if candidate.accepted and candidate.path is not None and not candidate.adopted:
                    await self.registry.upload(self._header(candidate), candidate.path)
            request = registry_pb2.SetServingChoiceRequest(
                model=job.model, version=job.version, target=job.target, artifact_sha256=selection.chosen.sha256,
                candidates=[c.to_pb() for c in self.candidates], reason=selection.reason)
            try:
                return await self.registry.set_serving_choice(request)
            except RegistryRejected as exc:
                existing = await self.registry.serving_choice(job.model, job.version, job.target)
                if existing is None:
                    raise
                log.warning("%s: the registry already holds a serving choice (%s); keeping it", job.id, exc)
                return existing
        except RegistryRejected as exc:
            raise PipelineError("register", str(exc)) from None

    async def _adopt_registered(self, selection: Selection, builder: CandidateBuilder,
                                metric: common_pb2.PrimaryMetric, tolerance: Tolerance) -> Selection:
        """An artifact registered under an accepted candidate's key with other bytes (an interrupted
        earlier attempt, or a client of the registry) is kept, since keys are immutable; but what it
        says about itself is not: it is downloaded (digest verified), gated and measured here."""
        version = await self.registry.get_version(self.job.model, self.job.version)
        stored = {(a.kind, a.precision): a for a in version.artifacts if a.target == self.job.target}
        adopted = False
        for candidate in self.candidates:
            found = stored.get((candidate.kind, candidate.precision))
            if candidate.accepted and found is not None and found.sha256 != candidate.sha256:
                log.info("%s: a %s artifact %s is registered already; gating and measuring it", self.job.id,
                         candidate.name, found.sha256)
                await self._judge_registered(candidate, found, builder, metric, tolerance)
                adopted = True
        if adopted:
            await self._publish_candidates()
        return self._select() if adopted else selection

    async def _judge_registered(self, candidate: Candidate, found: registry_pb2.Artifact, builder: CandidateBuilder,
                                metric: common_pb2.PrimaryMetric, tolerance: Tolerance) -> None:
        """Replace `candidate` by the registered artifact `found`, with this pool's own verdicts on it."""
        path = self.workdir / f"registered-{candidate.filename}"
        try:
            await self.registry.download(found.sha256, path)
        except DigestMismatch as exc:
            raise PipelineError("register", f"the registered {candidate.name} artifact: {exc}") from None
        candidate.adopt(path, found.sha256)
        await self._thread(builder.gate, candidate, metric, tolerance)
        if candidate.accepted:
            await self._thread(builder.profile, candidate)
        candidate.reason = f"{_registered_note(candidate)}{candidate.reason}"

    def _header(self, candidate: Candidate) -> registry_pb2.ArtifactHeader:
        size = candidate.path.stat().st_size
        return registry_pb2.ArtifactHeader(
            model=self.job.model, version=self.job.version, kind=candidate.kind, precision=candidate.precision,
            target=self.job.target, sha256=candidate.sha256, size_bytes=size, filename=candidate.filename,
            format=candidate.format, profile=candidate.profile, gate=candidate.gate,
            metadata={**candidate.metadata, "converter": self.policy.producer})

    # -- helpers
    async def _enter(self, stage: str) -> None:
        self.stage = stage
        await self._progress(lambda record: setattr(record, "stage", stage))

    async def _publish_candidates(self) -> None:
        current = [c.to_pb() for c in self.candidates]

        def mutate(record: pb.Conversion) -> None:
            del record.candidates[:]
            record.candidates.extend(current)

        await self._progress(mutate)

    async def _thread(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)


def _registered_note(candidate: Candidate) -> str:
    """How a candidate's reason starts when it stands for an artifact registered before (judged here)."""
    return f"registered artifact {candidate.sha256[:12]} re-gated here: " if candidate.adopted else ""
