"""Composition root of the trainer: settings, profiles, database, registry channel, bus, outbox relay,
executors, job runner, retraining, progress subscription, work consumer and gRPC servicer.

Start-up: read TrainerSettings once; load the training profiles (contracts data plus
`profiles_dir`); create the tables; open the registry channel; connect to NATS and declare the
contract streams; start the outbox relay (training.finished); build the executors (local always,
kubernetes when configured); every registry call rides out a registry restart for
`peer_retry_seconds`; start the job runner (which first recovers jobs a previous process
left RUNNING) and the retraining ticker; subscribe to `training.progress.*`; start the durable
work consumer `trainer` on `data.updated.>`; serve gRPC.
Shutdown is the chassis's one path: SIGTERM -> health NOT_SERVING -> RPCs drain -> tasks
cancelled -> the runner stops following its jobs and the local executor stops their ranks (they
stay RUNNING in the database and resume from their checkpoints at the next start) -> bus,
channel and database close.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import torch

from splitstack.chassis.bus import connect_bus
from splitstack.chassis.config import ConfigError
from splitstack.chassis.db import open_engine
from splitstack.chassis.outbox import Outbox, OutboxRelay
from splitstack.chassis.retry import RetryBudget
from splitstack.chassis.server import ServiceRuntime, run_service
from splitstack.chassis.tls import client_channel
from splitstack.common.v1 import common_pb2
from splitstack.contracts.events import CONSUMERS, SUBJECTS
from splitstack.contracts.stacks import training_profiles
from splitstack.trainer.v1 import trainer_pb2_grpc
from splitstack_trainer import store as tables
from splitstack_trainer.config import SERVICE_NAME, TrainerSettings, load_trainer_settings
from splitstack_trainer.core import Trainer
from splitstack_trainer.executors import Executor
from splitstack_trainer.executors.local import LocalExecutor
from splitstack_trainer.feed import JobFeed, ProgressBook
from splitstack_trainer.handlers import DataUpdatedHandler, ProgressHandler
from splitstack_trainer.jobs import JobFactory
from splitstack_trainer.overrides import OverrideLimits
from splitstack_trainer.registry_client import RegistryClient
from splitstack_trainer.retrain import Retraining
from splitstack_trainer.runner import JobRunner
from splitstack_trainer.servicer import SERVICE_NAME as GRPC_SERVICE, TrainerServicer
from splitstack_trainer.specs import PlanDefaults
from splitstack_trainer.usercode import CodeChecker

log = logging.getLogger(__name__)

RELAY_STOP_SECONDS = 5.0
CHANNEL_CLOSE_SECONDS = 5.0


def load_profiles(settings: TrainerSettings) -> dict[str, common_pb2.TrainingProfile]:
    """Every training profile; ConfigError on a bad profile file or an unknown default profile."""
    try:
        profiles = training_profiles(Path(settings.profiles_dir) if settings.profiles_dir else None)
    except ValueError as exc:
        raise ConfigError(f"training profile files: {exc}") from None
    if settings.default_profile not in profiles:
        raise ConfigError(f"SPLITSTACK_TRAINER_DEFAULT_PROFILE={settings.default_profile!r} is not a known profile "
                          f"(known: {', '.join(sorted(profiles))})")
    return profiles


def build_executors(settings: TrainerSettings) -> dict[str, Executor]:
    executors: dict[str, Executor] = {"local": LocalExecutor(settings)}
    if settings.kubernetes_enabled:
        from splitstack_trainer.executors.kubernetes import KubernetesExecutor

        executors["kubernetes"] = KubernetesExecutor(settings)
    if settings.default_executor not in executors:
        raise ConfigError(f"SPLITSTACK_TRAINER_DEFAULT_EXECUTOR={settings.default_executor!r} is not configured "
                          "(the kubernetes executor needs SPLITSTACK_TRAINER_KUBERNETES_NAMESPACE and _IMAGE)")
    return executors


async def build(settings: TrainerSettings) -> ServiceRuntime:
    """Everything the trainer runs, owned by one ServiceRuntime (call `serve()` on it)."""
    runtime = ServiceRuntime(settings, SERVICE_NAME)
    try:
        await _assemble(runtime, settings)
    except BaseException:
        await runtime.stop()
        raise
    return runtime


async def _assemble(runtime: ServiceRuntime, settings: TrainerSettings) -> None:
    profiles = load_profiles(settings)
    executors = build_executors(settings)
    engine = open_engine(settings.database_url)
    runtime.exit_stack.callback(engine.dispose)
    store = tables.Store(engine, Outbox(tables.outbox, settings.producer))
    await asyncio.to_thread(store.create_schema)
    channel = client_channel(settings.registry_addr, settings)
    runtime.exit_stack.push_async_callback(lambda: asyncio.wait_for(channel.close(), CHANNEL_CLOSE_SECONDS))
    bus = await connect_bus(settings, producer=settings.producer)
    runtime.exit_stack.push_async_callback(bus.close)
    await bus.ensure_streams()
    relay = OutboxRelay(engine, tables.outbox, bus, poll_interval=settings.relay_poll_seconds)
    runtime.start_task(relay.run_until_cancelled(RELAY_STOP_SECONDS), name="outbox-relay")
    db = tables.Database(store, relay.wake)
    runtime.exit_stack.callback(db.close)
    registry = RegistryClient(channel, settings.registry_timeout_seconds, RetryBudget(settings.peer_retry_seconds))
    trainer = _core(settings, profiles, executors, db, registry)
    runtime.on_shutdown(trainer.runner.close)
    await bus.subscribe_core(SUBJECTS["training_progress"].wildcard(), ProgressHandler(trainer))
    runtime.start_task(trainer.runner.run(), name="job-runner")
    runtime.start_task(trainer.retraining.run(), name="retraining")
    await bus.work_consumer(CONSUMERS["trainer"], DataUpdatedHandler(trainer), max_deliver=settings.max_deliver,
                            ack_wait=settings.ack_wait_seconds, concurrency=1)
    runtime.add_service(trainer_pb2_grpc.add_TrainerServicer_to_server, TrainerServicer(trainer), GRPC_SERVICE)
    log.info("trainer: executors %s (default %s), profiles %s", ", ".join(executors), settings.default_executor,
             ", ".join(sorted(profiles)))


def _core(settings: TrainerSettings, profiles: dict[str, common_pb2.TrainingProfile],
          executors: dict[str, Executor], db: tables.Database, registry: RegistryClient) -> Trainer:
    defaults = PlanDefaults(profiles=profiles, profile=settings.default_profile, executor=settings.default_executor,
                            executors=tuple(executors), max_epochs=settings.default_max_epochs,
                            required_targets=settings.default_required_targets,
                            gpu_available=torch.cuda.is_available(), code=CodeChecker.from_settings(settings),
                            override_limits=OverrideLimits.from_settings(settings))
    factory = JobFactory(settings, defaults, executors, registry)
    feed, progress = JobFeed(), ProgressBook(persist_seconds=max(1.0, settings.progress_interval_seconds))
    changed = _JobChanged()
    runner = JobRunner(db, executors, registry, progress, settings.max_attempts, on_change=changed)
    retraining = Retraining(db, factory, settings.retrain_tick_seconds, on_job=changed)
    trainer = Trainer(db, factory, runner, retraining, feed, progress, profiles, settings.watch_poll_seconds)
    changed.target = trainer
    return trainer


class _JobChanged:
    """A job changed: wake the runner, tell watchers (the Trainer exists only after its parts)."""

    target: Trainer | None = None

    def __call__(self, job_id: str) -> None:
        if self.target is not None:
            self.target.runner.wake()
            self.target.changed(job_id)


async def serve() -> None:
    """Serve the trainer until SIGTERM/SIGINT."""
    runtime = await build(load_trainer_settings())
    await runtime.serve()


def main() -> None:
    """Console script `splitstack-trainer`."""
    run_service(serve)


if __name__ == "__main__":
    main()
