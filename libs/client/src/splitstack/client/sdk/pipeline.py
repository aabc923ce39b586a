"""`Pipeline.train_and_deploy`: data -> training -> conversion -> promotion -> serving, in one call.

The steps, each through the services' APIs: publish the data when given a file; submit the job and
follow it; wait for the target's serving choice (requesting the conversion when the model does not
require that target); subscribe to `model.deployed.<model>.<target>`, then promote the alias unless
it already names this version or a newer one (an alias never moves backwards), or the model's AUTO
promotion policy rejected the version (the Deployment then says so); wait until serving
reports the version (the event, or serving answering with it). When the target's serving does not
follow the model (it does not know it, or has not swapped within FOLLOW_GRACE_SECONDS), the
version is loaded there explicitly (RepositoryModelLoad).
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from splitstack.client.sdk.errors import PlatformError
from splitstack.client.sdk.events import EventSubscription
from splitstack.client.sdk.platform import Platform
from splitstack.client.sdk.registry import dataset_bytes
from splitstack.client.sdk.training import job_spec
from splitstack.common.v1 import common_pb2
from splitstack.contracts.events import subject
from splitstack.contracts.names import is_valid_name
from splitstack.registry.v1 import registry_pb2 as rpb
from splitstack.trainer.v1 import trainer_pb2 as tpb

log = logging.getLogger(__name__)

FOLLOW_GRACE_SECONDS = 30.0   # how long serving may take to follow a promotion before the version is loaded



@dataclass
class Deployment:
    """What `train_and_deploy` produced: the version, where it serves, and the numbers behind it."""

    model: str
    version: int
    target: str
    endpoint: str                                   # the serving address of the target
    serving_choice: rpb.ServingChoice               # the chosen artifact (format, precision) and every candidate
    profile: common_pb2.MeasuredProfile             # the chosen candidate's measured profile
    metrics: dict[str, float] = field(default_factory=dict)   # validation metrics of the version
    job: tpb.Job | None = None
    promoted_alias: str | None = None               # None: not promoted (see `promotion`, or a newer version)
    promotion: Any = None                           # the registry's PromotionDecision for the version, if made

    @property
    def format(self) -> str:
        return common_pb2.ModelFormat.Name(self.serving_choice.artifact.format)

    @property
    def precision(self) -> str:
        return common_pb2.Precision.Name(self.serving_choice.artifact.precision)

    def summary(self) -> str:
        """A few human-readable lines: version, metrics, chosen artifact, latency."""
        point = self.profile.points[0] if self.profile.points else None
        latency = (f"p50 {point.p50_ms:.3f} ms, p99 {point.p99_ms:.3f} ms at batch {point.batch_size}"
                   if point else "no latency measured")
        metrics = ", ".join(f"{k} {v:.4f}" for k, v in sorted(self.metrics.items())) or "no metrics"
        alias = f"{self.promoted_alias} -> " if self.promoted_alias else ""
        where = (f"serving on {self.target} at {self.endpoint}" if self.promoted_alias
                 else f"NOT promoted ({self.promotion.reason if self.promotion else 'the alias names a newer version'})")
        return (f"{self.model} {alias}version {self.version} {where}\n"
                f"  metrics: {metrics}\n  artifact: {self.format} ({self.precision}), {latency}\n"
                f"  why: {self.serving_choice.reason}")


def chosen_profile(choice: rpb.ServingChoice) -> common_pb2.MeasuredProfile:
    """The measured profile of the chosen artifact (from the artifact, else its candidate)."""
    if choice.artifact.profile.points:
        return choice.artifact.profile
    for candidate in choice.candidates:
        if candidate.artifact_sha256 == choice.artifact.sha256:
            return candidate.profile
    return choice.artifact.profile


def promotion_decision(version: rpb.ModelVersion) -> Any:
    """The registry's promotion decision on `version`, or None while undecided."""
    if "promotion" not in rpb.ModelVersion.DESCRIPTOR.fields_by_name or not version.HasField("promotion"):
        return None
    return version.promotion


def rejected_by_policy(model: rpb.Model, decision: Any) -> bool:
    """True when an AUTO promotion policy decided against the version (the pipeline then leaves it)."""
    if decision is None or model.promotion_policy.mode != rpb.PromotionPolicy.AUTO:
        return False
    return decision.outcome == type(decision).REJECTED


class Deadline:
    """What is left of the overall timeout; `expired(what)` raises TimeoutError naming the step."""

    def __init__(self, seconds: float) -> None:
        self.seconds, self.end = seconds, time.monotonic() + seconds

    def left(self) -> float:
        return max(0.0, self.end - time.monotonic())

    def expired(self, what: str) -> TimeoutError:
        return TimeoutError(f"train_and_deploy timed out after {self.seconds:g}s: {what}")


class Pipeline:
    """The platform's steps end to end, for one model version at a time."""

    def __init__(self, platform: Platform) -> None:
        self.platform = platform

    def train_and_deploy(self, model_config: tpb.JobSpec | Mapping[str, Any], data: Any, *, target: str = "cpu",
                         alias: str = "production", timeout: float = 900,
                         on_progress: Callable[[tpb.Job], None] | None = None) -> Deployment:
        """Train `model_config` on `data`, convert for `target`, promote `alias`, wait until it serves.

        `data`: a dataset name (its latest version), `(name, version)`, or a local `.npz` file
        (published first, to `spec.dataset` or a dataset named like the model).
        """
        spec = tpb.JobSpec()
        spec.CopyFrom(job_spec(model_config))          # the caller's message is left as it was
        serving = self.platform.serving(target)       # a target without serving fails before anything runs
        if not spec.model:
            raise ValueError("the job spec names no model")
        deadline = Deadline(timeout)
        self._resolve_data(spec, data)
        job = self._train(spec, deadline, on_progress)
        version = job.model_version
        choice = self._serving_choice(spec.model, version, target, deadline)
        found = self.platform.version(spec.model, version)
        deployment = Deployment(spec.model, version, target, serving.address, choice, chosen_profile(choice),
                                dict(found.lineage.metrics), job, promotion=promotion_decision(found))
        if rejected_by_policy(self.platform.model(spec.model), deployment.promotion):
            log.warning("the promotion policy of %s rejected version %d: %s", spec.model, version,
                        deployment.promotion.reason)
            return deployment
        deployment.promoted_alias = self._promote_and_wait(deployment, alias, deadline, job.id)
        log.info("deployed %s version %d on %s", spec.model, version, target)
        return deployment

    # --- steps ---------------------------------------------------------------------------------

    def _resolve_data(self, spec: tpb.JobSpec, data: Any) -> None:
        """Fill spec.dataset / dataset_version from `data`, publishing a local file first."""
        if isinstance(data, tuple) and len(data) == 2:
            spec.dataset, spec.dataset_version = str(data[0]), int(data[1])
            return
        if isinstance(data, str) and is_valid_name(data):
            spec.dataset, spec.dataset_version = data, 0
            return
        if isinstance(data, (str, os.PathLike)) and not Path(data).is_file():
            raise ValueError(f"data {str(data)!r} is neither a dataset name nor an existing file")
        if isinstance(data, (str, os.PathLike, bytes)):
            content = dataset_bytes(data)
            dataset = spec.dataset or spec.model
            key = f"sha256:{hashlib.sha256(content).hexdigest()}"   # the same file again is the same version
            published = self.platform.publish_dataset(dataset, content, idempotency_key=key)
            spec.dataset, spec.dataset_version = dataset, published.version
            return
        raise ValueError(f"data must be a dataset name, (name, version), or a local .npz file; got {data!r}")

    def _train(self, spec: tpb.JobSpec, deadline: Deadline, on_progress: Callable[[tpb.Job], None] | None) -> tpb.Job:
        job = self.platform.submit(spec)
        try:
            for job in self.platform.watch(job.id, timeout=deadline.left()):
                if on_progress is not None:
                    on_progress(job)
        except TimeoutError:
            raise deadline.expired(f"training job {job.id} had not ended") from None
        if job.state != tpb.SUCCEEDED:
            raise PlatformError("trainer", grpc.StatusCode.ABORTED,
                                f"training job {job.id} ended {tpb.JobState.Name(job.state)}: {job.error or 'no reason given'}",
                                job=job)
        return job

    def _serving_choice(self, model: str, version: int, target: str, deadline: Deadline) -> rpb.ServingChoice:
        if target not in self.platform.model(model).required_targets:
            log.info("%s does not require target %s; requesting its conversion", model, target)
            self.platform.convert(model, version, target)
        try:
            return self.platform.wait_serving_choice(model, version, target, timeout=deadline.left())
        except TimeoutError as exc:
            raise deadline.expired(str(exc)) from None

    def _promote_and_wait(self, deployment: Deployment, alias: str, deadline: Deadline, job_id: str) -> str | None:
        model, version, target = deployment.model, deployment.version, deployment.target
        subscription = self._deployed_events(model, target)
        try:
            current = self.platform.registry.alias(model, alias)
            if current is not None and current.version > version:
                log.warning("%s@%s already names version %d, newer than %d: not moved back", model, alias,
                            current.version, version)
                return None
            if current is None or current.version < version:
                self.platform.promote(model, version, alias, reason=f"train_and_deploy (job {job_id})")
            self._wait_deployed(model, version, target, subscription, deadline)
            return alias
        finally:
            if subscription is not None:
                subscription.close()

    def _deployed_events(self, model: str, target: str) -> EventSubscription | None:
        if not self.platform.endpoints.nats_url:
            return None   # no event bus known: serving is polled instead
        try:
            return self.platform.subscribe([subject("model_deployed", model=model, target=target)])
        except (ValueError, TimeoutError) as exc:
            log.warning("cannot watch model.deployed (%s); polling serving instead", exc)
            return None

    def _wait_deployed(self, model: str, version: int, target: str, events: EventSubscription | None,
                       deadline: Deadline) -> None:
        """Until serving answers with `version`: give a following serving time to swap by itself,
        else (or when it does not know the model at all) load the version there explicitly."""
        serving = self.platform.serving(target)
        if any(entry.name == model for entry in serving.index()):
            try:
                self.platform.wait_serving_version(model, version, target=target, events=events,
                                                   timeout=min(FOLLOW_GRACE_SECONDS, deadline.left()))
                return
            except TimeoutError:
                log.info("serving on %s did not move %s to version %d within %gs; loading it there", target, model,
                         version, FOLLOW_GRACE_SECONDS)
        else:
            log.info("serving on %s does not follow %s; loading version %d there", target, model, version)
        serving.load(model, version, timeout=max(1.0, deadline.left()))
        try:
            self.platform.wait_serving_version(model, version, target=target, timeout=deadline.left(), events=events)
        except TimeoutError as exc:
            raise deadline.expired(str(exc)) from None
