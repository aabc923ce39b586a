"""Composition root of the registry: settings, database, blobs, bus, outbox relay, gRPC servicer.

Start-up: read RegistrySettings once, migrate the database to head, open the blob store (which
sweeps spool files of crashed uploads), connect to NATS and declare the contract streams, start
the outbox relay as a background task (woken after every commit that added events), start the
orphan sweeper (unreferenced blobs, now and periodically), register the servicer and serve.
Shutdown is the chassis's one path: SIGTERM -> health NOT_SERVING -> in-flight RPCs drain -> the
relay finishes its batch -> the bus drains -> blobs and engine close.
"""

from __future__ import annotations

import asyncio
import logging

from splitstack.chassis.bus import connect_bus
from splitstack.chassis.outbox import Outbox, OutboxRelay
from splitstack.chassis.server import ServiceRuntime, run_service
from splitstack.registry.v1 import registry_pb2_grpc
from splitstack_registry import tables
from splitstack_registry.blobs import open_blob_store
from splitstack_registry.config import SERVICE_NAME, RegistrySettings, load_registry_settings
from splitstack_registry.core import Registry
from splitstack_registry.migrations import upgrade_to_head
from splitstack_registry.servicer import SERVICE_NAME as GRPC_SERVICE, RegistryServicer
from splitstack_registry.store import Store, open_engine
from splitstack_registry.sweeper import OrphanSweeper

log = logging.getLogger(__name__)

RELAY_STOP_SECONDS = 5.0


async def build(settings: RegistrySettings) -> ServiceRuntime:
    """Everything the registry runs, owned by one ServiceRuntime (call `serve()` on it)."""
    runtime = ServiceRuntime(settings, SERVICE_NAME)
    try:
        await _assemble(runtime, settings)
    except BaseException:
        await runtime.stop()  # releases whatever was opened before the failure
        raise
    return runtime


async def _assemble(runtime: ServiceRuntime, settings: RegistrySettings) -> None:
    logging.getLogger("alembic").setLevel(logging.WARNING)  # migrations.upgrade_to_head logs what changed
    engine = open_engine(settings.database_url)
    runtime.exit_stack.callback(engine.dispose)
    await asyncio.to_thread(upgrade_to_head, engine)
    blobs = await asyncio.to_thread(open_blob_store, settings)
    runtime.exit_stack.callback(blobs.close)
    bus = await connect_bus(settings, producer=settings.producer)
    runtime.exit_stack.push_async_callback(bus.close)
    await bus.ensure_streams()
    relay = OutboxRelay(engine, tables.outbox, bus, poll_interval=settings.relay_poll_seconds)
    runtime.start_task(relay.run_until_cancelled(RELAY_STOP_SECONDS), name="outbox-relay")
    store = Store(engine, Outbox(tables.outbox, settings.producer))
    core = Registry(store, blobs, max_upload_bytes=settings.max_upload_bytes, chunk_bytes=settings.chunk_bytes,
                    max_dataset_array_bytes=settings.max_dataset_array_bytes, on_events=relay.wake)
    runtime.exit_stack.callback(core.close)
    sweeper = OrphanSweeper(store, blobs, grace_seconds=settings.orphan_grace_seconds,
                            interval_seconds=settings.orphan_sweep_seconds)
    runtime.start_task(sweeper.run_until_cancelled(), name="orphan-sweeper")
    servicer = RegistryServicer(core, upload_idle_seconds=settings.upload_idle_seconds)
    runtime.add_service(registry_pb2_grpc.add_RegistryServicer_to_server, servicer, GRPC_SERVICE)


async def serve() -> None:
    """Serve the registry until SIGTERM/SIGINT."""
    runtime = await build(load_registry_settings())
    await runtime.serve()


def main() -> None:
    """Console script `splitstack-registry`."""
    run_service(serve)


if __name__ == "__main__":
    main()
