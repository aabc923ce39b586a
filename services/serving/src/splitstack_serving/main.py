"""Composition root: settings -> model source -> repository -> core -> gRPC servicer -> runtime.

The server answers liveness, reflection and metrics from the start, but the whole server's health,
inference.GRPCInferenceService's health, ServerReady and the ready file all wait until every
configured model is loaded *and* warmed (at once when none is configured).

- Directory mode (no `SPLITSTACK_REGISTRY_ADDR`): the configured models load from `model_dir` in
  the background; one that fails stops the process (a configuration error should be loud).
- Registry mode: connect to NATS, declare the streams, subscribe a fan-out consumer to the followed
  aliases' promotions, then reconcile with the registry (again after every reconnect to NATS or
  to the registry); swaps are announced on `model.deployed.<model>.<target>`. See lifecycle.py.

On SIGTERM the chassis drains in-flight RPCs (whose batches still run), stops following
promotions, flushes deployment announcements, closes the bus, then releases every version.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path

import grpc

from inference import grpc_service_pb2_grpc as pb_grpc
from splitstack.chassis.bus import Bus, Subscription, connect_bus
from splitstack.chassis.config import ConfigError, load_settings
from splitstack.chassis.retry import RetryBudget
from splitstack.chassis.server import ServiceRuntime, run_service
from splitstack.chassis.tls import client_channel
from splitstack.registry.v1 import registry_pb2_grpc

from splitstack_serving.backend import BackendOptions
from splitstack_serving.batching import BatchPolicy
from splitstack_serving.cache import ArtifactCache
from splitstack_serving.config import SERVICE, ServingSettings
from splitstack_serving.core import InferenceCore
from splitstack_serving.handlers import PROMOTIONS_CONSUMER, PromotionHandler
from splitstack_serving.limits import ServingLimits
from splitstack_serving.lifecycle import (ModelLifecycle, follow_bus_reconnects, follow_registry_channel,
                                          parse_followed)
from splitstack_serving.registry_source import RegistryModelSource
from splitstack_serving.repository import ModelRepository
from splitstack_serving.servicer import SERVER_NAME, SERVICE_NAME, InferenceServicer
from splitstack_serving.source import DirectoryModelSource, ModelSource

CHANNEL_CLOSE_SECONDS = 5.0
# Reconnect to a registry that went away within seconds, not gRPC's default of up to two minutes.
REGISTRY_CHANNEL_OPTIONS = [("grpc.initial_reconnect_backoff_ms", 500), ("grpc.min_reconnect_backoff_ms", 500),
                            ("grpc.max_reconnect_backoff_ms", 5000)]
PROMOTION_NAK_SECONDS = 2.0


@dataclass
class ServingService:
    """One serving process's parts, wired."""

    settings: ServingSettings
    runtime: ServiceRuntime
    repository: ModelRepository
    core: InferenceCore
    lifecycle: ModelLifecycle | None = None
    registry_channel: grpc.aio.Channel | None = None
    bus: Bus | None = None
    promotions: Subscription | None = None

    async def start_models(self) -> None:
        """After the server started: load (directory mode) or follow (registry mode) the models."""
        if self.lifecycle is None:
            await self.load_startup_models()
        else:
            await self.follow_registry()

    async def load_startup_models(self) -> None:
        """Directory mode: load the configured models, then report ready."""
        await self.core.load_startup_models(self.settings.models)
        self.mark_ready()

    async def follow_registry(self) -> None:
        """Registry mode: bus, promotions (fan-out), reconciler and reconnect watchers; readiness
        follows once every followed model is loaded and warmed."""
        assert self.lifecycle is not None and self.registry_channel is not None
        self.bus = await connect_bus(self.settings, producer=self.settings.producer)
        self.runtime.on_shutdown(self.stop_following)  # runs before the repository's release
        await self.bus.ensure_streams()
        self.lifecycle.attach(self.bus.publish)
        subjects = self.lifecycle.subjects()
        if subjects:  # subscribed before the first reconciliation, so no promotion falls in between
            self.promotions = await self.bus.fanout_consumer(subjects, PromotionHandler(self.lifecycle),
                                                             name=PROMOTIONS_CONSUMER, nak_delay=PROMOTION_NAK_SECONDS)
        self.runtime.start_task(self.lifecycle.run_reconciler(), name="reconciler")
        self.runtime.start_task(follow_bus_reconnects(self.bus.reconnects, self.lifecycle), name="nats-reconnects")
        self.runtime.start_task(follow_registry_channel(self.registry_channel, self.lifecycle),
                                name="registry-reconnects")

    async def stop_following(self) -> None:
        """Stop handling promotions, flush deployment announcements, close the bus."""
        grace = self.settings.shutdown_grace_seconds
        if self.promotions is not None:
            await self.promotions.stop(grace)
        if self.lifecycle is not None:
            await self.lifecycle.close(grace)
        if self.bus is not None:
            await self.bus.close(grace)

    def mark_ready(self) -> None:
        """Every configured model is loaded and warmed: ServerReady, health and the ready file say so."""
        self.core.ready = True
        self.runtime.set_serving(True, SERVICE_NAME)
        self.runtime.mark_ready()


def default_policy(settings: ServingSettings) -> BatchPolicy:
    """The batch policy every model starts from."""
    return BatchPolicy(max_batch_size=settings.max_batch_size, max_queue_delay_us=settings.max_queue_delay_us,
                       max_queue_size=settings.max_queue_size, batching=settings.batching,
                       instances=settings.model_instances)


def serving_limits(settings: ServingSettings) -> ServingLimits:
    """The operator's caps on what clients can make this process hold."""
    return ServingLimits(
        load_max_batch_size=settings.load_max_batch_size, load_max_queue_size=settings.load_max_queue_size,
        load_max_queue_delay_us=settings.load_max_queue_delay_us, load_max_instances=settings.load_max_instances,
        max_versions_per_model=settings.max_versions_per_model, max_loaded_models=settings.max_loaded_models,
        stream_max_pending=settings.stream_max_pending, stream_max_pending_bytes=settings.stream_max_pending_bytes)


def _check_model_count(settings: ServingSettings) -> None:
    named = {spec.partition("@")[0].partition(":")[0].strip() for spec in settings.models}
    if len(named) > settings.max_loaded_models:
        raise ConfigError(f"SPLITSTACK_SERVING_MODELS names {len(named)} models, more than "
                          f"SPLITSTACK_SERVING_MAX_LOADED_MODELS ({settings.max_loaded_models})")


def _check_directory_models(settings: ServingSettings) -> None:
    for spec in settings.models:
        if "@" in spec:
            raise ConfigError(f"SPLITSTACK_SERVING_MODELS entry {spec!r} names an alias, which needs the registry "
                              "(set SPLITSTACK_REGISTRY_ADDR); without it use 'name' or 'name:version'")


def _registry_source(settings: ServingSettings, runtime: ServiceRuntime,
                     aliases: dict[str, str]) -> tuple[RegistryModelSource, grpc.aio.Channel]:
    channel = client_channel(settings.registry_addr, settings, options=REGISTRY_CHANNEL_OPTIONS)
    runtime.exit_stack.push_async_callback(lambda: asyncio.wait_for(channel.close(), CHANNEL_CLOSE_SECONDS))
    cache = ArtifactCache(Path(settings.cache_dir), max_bytes=settings.cache_max_bytes)
    retry = RetryBudget(total_seconds=settings.registry_retry_seconds, first_pause=0.2, max_pause=5.0)
    source = RegistryModelSource(registry_pb2_grpc.RegistryStub(channel), cache, settings.target, aliases,
                                 timeout=settings.registry_timeout_seconds,
                                 download_timeout=settings.download_timeout_seconds, retry=retry)
    return source, channel


def build_service(settings: ServingSettings) -> ServingService:
    """Wire the service (inside the event loop); nothing runs until `runtime.start()` / `serve()`."""
    runtime = ServiceRuntime(settings, SERVER_NAME)
    _check_model_count(settings)
    limits = serving_limits(settings)
    followed = parse_followed(settings.models) if settings.registry_addr else []
    channel = None
    source: ModelSource
    if settings.registry_addr:
        source, channel = _registry_source(settings, runtime, {m.name: m.alias for m in followed})
    else:
        _check_directory_models(settings)
        source = DirectoryModelSource(Path(settings.model_dir))
    options = BackendOptions(target=settings.target, intra_op_threads=settings.ort_intra_op_threads,
                             inter_op_threads=settings.ort_inter_op_threads)
    repository = ModelRepository(source, options, default_policy(settings), settings.release_timeout_seconds,
                                 limits)
    if isinstance(source, RegistryModelSource):
        source.cache.keep_in_use(repository.digests_in_use)
        repository.on_release(source.cache.evict)
    core = InferenceCore(repository)
    servicer = InferenceServicer(core, repository, limits, settings.max_message_bytes)
    runtime.add_service(pb_grpc.add_GRPCInferenceServiceServicer_to_server, servicer, SERVICE_NAME)
    runtime.defer_readiness()
    runtime.set_serving(False, SERVICE_NAME)
    runtime.on_shutdown(repository.close)
    service = ServingService(settings, runtime, repository, core, registry_channel=channel)
    if isinstance(source, RegistryModelSource):
        service.lifecycle = ModelLifecycle(repository, source, followed, target=settings.target,
                                           replica=settings.instance, on_ready=service.mark_ready)
        repository.on_swap(service.lifecycle.announce_swap)
    return service


async def serve(settings: ServingSettings | None = None) -> None:
    """Run the service until SIGTERM/SIGINT."""
    service = build_service(settings or load_settings(ServingSettings, SERVICE))
    service.runtime.start_task(service.start_models(), name="startup-models")
    await service.runtime.serve()


def main() -> None:
    """The `splitstack-serving` command."""
    run_service(serve)


if __name__ == "__main__":
    main()
