"""Composition root of the converter: settings, target, database, bus, outbox relay, registry
channel, work consumer and gRPC servicer.

Start-up: read ConverterSettings once; load the target files and pick this pool's target (a GPU
target also needs TensorRT and that GPU here: engines are built on the GPU they run on); create
the converter's tables; connect to NATS and declare the contract streams; start the outbox relay;
open the registry channel; start the durable work consumer `converter-<target>`; serve gRPC.
Shutdown is the chassis's one path: SIGTERM -> health NOT_SERVING -> RPCs drain -> tasks
cancelled -> the consumer stops (a running conversion gives its claim up) -> bus, channel and
database close.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from splitstack.chassis.bus import connect_bus
from splitstack.chassis.config import ConfigError
from splitstack.chassis.db import open_engine
from splitstack.chassis.outbox import Outbox, OutboxRelay
from splitstack.chassis.retry import RetryBudget
from splitstack.chassis.server import ServiceRuntime, run_service
from splitstack.chassis.tls import client_channel
from splitstack.common.v1 import common_pb2
from splitstack.contracts.events import CONSUMERS
from splitstack.contracts.stacks import inference_targets
from splitstack.converter.v1 import converter_pb2_grpc
from splitstack_converter import store as tables
from splitstack_converter.config import SERVICE_NAME, ConverterSettings, load_converter_settings
from splitstack_converter.conversion import Policy
from splitstack_converter.core import Converter
from splitstack_converter.handlers import WorkHandler
from splitstack_converter.pipeline import quiet_libraries, tensorrt
from splitstack_converter.pipeline.build import TargetBuild
from splitstack_converter.pipeline.gate import Tolerance
from splitstack_converter.pipeline.profile import Floors
from splitstack_converter.pipeline.runners import OrtOptions
from splitstack_converter.registry_client import RegistryClient
from splitstack_converter.servicer import SERVICE_NAME as GRPC_SERVICE, ConverterServicer

log = logging.getLogger(__name__)

RELAY_STOP_SECONDS = 5.0
CHANNEL_CLOSE_SECONDS = 5.0


def load_targets(settings: ConverterSettings) -> dict[str, common_pb2.InferenceTarget]:
    """Every known target; ConfigError when this pool's target is unknown or cannot run here."""
    try:
        targets = inference_targets(Path(settings.targets_dir) if settings.targets_dir else None)
    except ValueError as exc:
        raise ConfigError(f"target files: {exc}") from None
    target = targets.get(settings.target)
    if target is None:
        raise ConfigError(f"SPLITSTACK_CONVERTER_TARGET={settings.target!r} is not a known target "
                          f"(known: {', '.join(sorted(targets))})")
    if target.accelerator == common_pb2.GPU:
        problem = tensorrt.environment_problem(target.gpu_product)
        if problem:
            raise ConfigError(f"target {target.id!r} cannot be converted on this machine: {problem}")
    return targets


def policy_for(settings: ConverterSettings, target: common_pb2.InferenceTarget) -> Policy:
    """How this pool builds, judges and measures candidates, from its settings."""
    build = TargetBuild(
        target=target,
        ort=OrtOptions(settings.ort_intra_op_threads, settings.ort_inter_op_threads, target.accelerator),
        floors=Floors(settings.profile_min_runs, settings.profile_min_seconds, settings.profile_warmup_runs),
        engine_cache_dir=settings.engine_cache,
        limits=settings.child_limits(settings.child_timeout_seconds, gpu=target.accelerator == common_pb2.GPU))
    return Policy(build=build, default_tolerance=Tolerance(settings.max_metric_drop, settings.min_top1_agreement),
                  calibration_rows=settings.calibration_rows, optimization_level=settings.optimization_level,
                  switch_margin=settings.switch_margin, producer=settings.producer,
                  load_limits=settings.child_limits(settings.load_timeout_seconds,
                                                    gpu=target.accelerator == common_pb2.GPU),
                  allow_pickled_programs=settings.allow_pickled_programs)


async def build(settings: ConverterSettings) -> ServiceRuntime:
    """Everything the converter runs, owned by one ServiceRuntime (call `serve()` on it)."""
    runtime = ServiceRuntime(settings, SERVICE_NAME)
    try:
        await _assemble(runtime, settings)
    except BaseException:
        await runtime.stop()
        raise
    return runtime


async def _assemble(runtime: ServiceRuntime, settings: ConverterSettings) -> None:
    quiet_libraries()
    targets = load_targets(settings)
    target = targets[settings.target]
    engine = open_engine(settings.database_url)
    runtime.exit_stack.callback(engine.dispose)
    store = tables.ConversionStore(engine, Outbox(tables.outbox, settings.producer))
    await asyncio.to_thread(store.create_schema)
    executor = ThreadPoolExecutor(max_workers=settings.concurrency, thread_name_prefix="conversion")
    runtime.exit_stack.callback(executor.shutdown, wait=False, cancel_futures=True)
    channel = client_channel(settings.registry_addr, settings)   # closed after the bus (LIFO)
    runtime.exit_stack.push_async_callback(lambda: asyncio.wait_for(channel.close(), CHANNEL_CLOSE_SECONDS))
    bus = await connect_bus(settings, producer=settings.producer)
    runtime.exit_stack.push_async_callback(bus.close)
    await bus.ensure_streams()
    relay = OutboxRelay(engine, tables.outbox, bus, poll_interval=settings.relay_poll_seconds)
    runtime.start_task(relay.run_until_cancelled(RELAY_STOP_SECONDS), name="outbox-relay")
    registry = RegistryClient(channel, settings.registry_timeout_seconds,
                              RetryBudget(total_seconds=settings.registry_retry_seconds))
    core = Converter(settings, targets, store, registry, policy_for(settings, target), executor, relay.wake)
    consumer = CONSUMERS["converter"].for_target(target.id)
    await bus.work_consumer(consumer, WorkHandler(core, settings.max_deliver), max_deliver=settings.max_deliver,
                            ack_wait=settings.ack_wait_seconds, concurrency=settings.concurrency)
    runtime.add_service(converter_pb2_grpc.add_ConverterServicer_to_server, ConverterServicer(core), GRPC_SERVICE)
    log.info("converter pool for target %s (%s), consumer %s", target.id,
             common_pb2.Accelerator.Name(target.accelerator), consumer.durable)


async def serve() -> None:
    """Serve the converter until SIGTERM/SIGINT."""
    runtime = await build(load_converter_settings())
    await runtime.serve()


def main() -> None:
    """Console script `splitstack-converter`."""
    run_service(serve)


if __name__ == "__main__":
    main()
