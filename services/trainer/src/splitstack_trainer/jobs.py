"""Making a job from a spec, and ending one: the two writes every path (API, retraining, runner) shares.

`JobFactory.prepare` checks the spec (specs.plan_job, in a thread: allow-list first, then the built-in
recipe in process or user code in a credential-free child, never imported here), pins the
dataset version through the registry (unknown version -> INVALID_ARGUMENT), downloads it into
the trainer's cache and checks its digest (mismatch -> INVALID_ARGUMENT), and builds the
JobConfig the executor's ranks will run. Nothing is stored and no process starts before all of
that passed. `finish_job` writes a terminal state together with its `training.finished` event.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from splitstack.chassis.errors import InvalidArgument
from splitstack.contracts.events import subject
from splitstack.events.v1 import events_pb2
from splitstack.registry.v1 import registry_pb2 as rpb
from splitstack.trainer.v1 import trainer_pb2 as pb
from splitstack_trainer.config import TrainerSettings
from splitstack_trainer.executors import Executor
from splitstack_trainer.jobconfig import JobConfig, code_version, message_json
from splitstack_trainer.records import is_terminal, new_job_id
from splitstack_trainer.registry_client import DigestMismatch, RegistryClient, RegistryRejected, sha256_of
from splitstack_trainer.specs import PlanDefaults, TrainingPlan, plan_job
from splitstack_trainer.store import Tx, utcnow

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PreparedJob:
    """A checked job, ready to be stored as QUEUED."""

    job_id: str
    plan: TrainingPlan
    config: JobConfig

    def row(self, spec: pb.JobSpec, *, retrain_policy: str = "", trigger_key: str | None = None) -> dict[str, Any]:
        return dict(id=self.job_id, model=self.plan.model, state=pb.QUEUED, executor=self.plan.executor,
                    idempotency_key=spec.idempotency_key or None, trigger_key=trigger_key,
                    retrain_policy=retrain_policy, spec=spec_bytes(spec), config=self.config.to_json(),
                    model_version=0, error="", attempts=0, handle="", metrics="{}", created_at=utcnow())


def spec_bytes(spec: pb.JobSpec) -> bytes:
    return spec.SerializeToString(deterministic=True)


class JobFactory:
    """Turns specs into prepared jobs."""

    def __init__(self, settings: TrainerSettings, defaults: PlanDefaults, executors: dict[str, Executor],
                 registry: RegistryClient) -> None:
        self.settings = settings
        self.defaults = defaults
        self.executors = executors
        self.registry = registry
        self._cache = Path(settings.work_dir).resolve() / "datasets"
        self._code_version = code_version(settings.code_version)

    async def plan(self, spec: pb.JobSpec, *, need_dataset: bool = True) -> TrainingPlan:
        return await asyncio.to_thread(plan_job, spec, self.defaults, need_dataset=need_dataset)

    async def prepare(self, spec: pb.JobSpec) -> PreparedJob:
        plan = await self.plan(spec)
        record = await self.verified_dataset(plan.dataset, plan.dataset_version)
        if plan.parent_version:
            await self._check_parent(plan.model, plan.parent_version)
        job_id = new_job_id()
        work_dir, dataset_path = self.executors[plan.executor].job_paths(job_id, record.sha256)
        config = JobConfig(
            job_id=job_id, model=plan.model, module=plan.module, datamodule=plan.datamodule,
            module_hparams=plan.module_hparams, datamodule_hparams=plan.datamodule_hparams,
            profile=message_json(plan.profile), max_epochs=plan.max_epochs, seed=plan.seed, dataset=plan.dataset,
            dataset_version=record.version, dataset_sha256=record.sha256, dataset_size=record.size_bytes,
            dataset_path=str(dataset_path), work_dir=str(work_dir), required_targets=plan.required_targets,
            primary_metric=message_json(plan.primary_metric),
            promotion_policy=message_json(plan.promotion_policy) if plan.promotion_policy is not None else None,
            parent_version=plan.parent_version, code_version=self._code_version, recipe=plan.recipe,
            progress_interval_seconds=self.settings.progress_interval_seconds, hyperparameters=plan.hyperparameters,
            peer_retry_seconds=self.settings.peer_retry_seconds)
        return PreparedJob(job_id, plan, config)

    async def _check_parent(self, model: str, version: int) -> None:
        try:
            await self.registry.version(model, version)
        except RegistryRejected as exc:
            raise InvalidArgument(f"parent_version {version} of model {model!r} is not in the registry "
                                  f"({exc.details})") from None

    async def verified_dataset(self, dataset: str, version: int) -> rpb.DatasetVersion:
        """The registry's record of the version (0: latest), its blob cached here and digest-checked."""
        wanted = f"dataset {dataset!r} version {version}" if version else f"the latest version of dataset {dataset!r}"
        try:
            record = await self.registry.dataset_version(dataset, version)
        except RegistryRejected as exc:
            if exc.code == grpc.StatusCode.NOT_FOUND:
                raise InvalidArgument(f"{wanted} is not in the registry ({exc.details})") from None
            raise InvalidArgument(f"{wanted}: {exc}") from None
        cached = self._cache / f"{record.sha256}.npz"
        if cached.is_file() and await asyncio.to_thread(sha256_of, cached) == record.sha256:
            return record
        try:
            await self.registry.download_dataset(record, cached)
        except DigestMismatch as exc:
            raise InvalidArgument(f"dataset digest mismatch: {exc}") from None
        return record


def finish_job(tx: Tx, job_id: str, state: int, *, error: str = "", version: int = 0,
               metrics: dict[str, float] | None = None, progress: pb.Progress | None = None) -> bool:
    """Write terminal `state` and its training.finished event; False when the job had already ended."""
    row = tx.job(job_id, lock=True)
    if row is None or is_terminal(row.state):
        return False
    values: dict[str, Any] = dict(state=state, error=error, model_version=version,
                                  metrics=json.dumps(metrics or {}), finished_at=utcnow())
    if progress is not None:
        values["progress"] = progress.SerializeToString()
    tx.update_job(job_id, **values)
    finished = events_pb2.TrainingFinished(job_id=job_id, model=row.model, state=state, version=version,
                                           error=error, metrics=metrics or {})
    tx.add_event(subject("training_finished", model=row.model), finished, event_id=f"training.finished:{job_id}")
    log.info("job %s %s%s", job_id, pb.JobState.Name(state), f": {error}" if error else "")
    return True
