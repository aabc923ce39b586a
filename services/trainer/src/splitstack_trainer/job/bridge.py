"""The job process's connection to the platform: NATS and the registry, on an event loop of its own.

Lightning trains synchronously on the main thread; the bus (progress on core NATS) and the
registry client (dataset download, registration) are asyncio code. A `PlatformBridge` runs one
event loop in a background thread for both: `call` runs a coroutine there and waits for it,
`publish_progress` hands a message over without waiting. Progress is best-effort: while NATS is
unreachable, messages are dropped (the job's outcome goes through the registry, not the bus).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc

from splitstack.chassis.bus import Bus, connect_bus
from splitstack.chassis.tls import client_channel
from splitstack.contracts.events import subject
from splitstack.events.v1 import events_pb2
from splitstack.trainer.v1 import trainer_pb2 as pb
from splitstack_trainer.config import JobEnvironment
from splitstack_trainer.registry_client import RegistryClient

log = logging.getLogger(__name__)

T = TypeVar("T")
CLOSE_SECONDS = 10.0


class PlatformBridge:
    """An event loop thread holding the bus and the registry channel of one job process."""

    def __init__(self, env: JobEnvironment, job_id: str) -> None:
        self._env = env
        self._job_id = job_id
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="platform-bridge", daemon=True)
        self._bus: Bus | None = None
        self._connecting: asyncio.Task | None = None
        self._channel: grpc.aio.Channel | None = None
        self._sending: set[asyncio.Task] = set()
        self.registry: RegistryClient | None = None

    def __enter__(self) -> PlatformBridge:
        self._thread.start()
        self.call(self._open)
        return self

    def __exit__(self, *exc_info: object) -> None:
        try:
            self.call(self._close, timeout=CLOSE_SECONDS + 2)
        except Exception as exc:  # noqa: BLE001 - closing must not hide the job's own outcome
            log.warning("closing the platform connections: %s", exc)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(CLOSE_SECONDS)

    def call(self, fn: Callable[[], Awaitable[T]], timeout: float | None = None) -> T:
        """Run `fn()` on the bridge's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(_run(fn), self._loop).result(timeout)

    def publish_progress(self, progress: pb.Progress) -> None:
        """Send `progress` on training.progress.<job> without waiting (dropped while NATS is away)."""
        message = events_pb2.TrainingProgress(progress=progress)
        self._loop.call_soon_threadsafe(self._send, message)

    def _send(self, message: events_pb2.TrainingProgress) -> None:
        task = self._loop.create_task(self._publish(message))
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)

    async def _open(self) -> None:
        self._channel = client_channel(self._env.registry_addr, self._env)
        self.registry = RegistryClient(self._channel, self._env.registry_timeout_seconds)
        self._connecting = asyncio.create_task(self._connect())

    async def _connect(self) -> None:
        try:
            self._bus = await connect_bus(self._env, producer=f"trainer-job/{self._job_id}")
        except Exception as exc:  # noqa: BLE001 - progress is best-effort; training goes on
            log.warning("no progress reports: cannot reach NATS at %s: %s", self._env.nats_url, exc)

    async def _publish(self, message: events_pb2.TrainingProgress) -> None:
        if self._bus is None:
            return
        try:
            await self._bus.publish_core(subject("training_progress", job=self._job_id), message)
        except Exception as exc:  # noqa: BLE001
            log.debug("progress not sent: %s", exc)

    async def _close(self) -> None:
        if self._sending:
            await asyncio.wait(list(self._sending), timeout=CLOSE_SECONDS / 2)
        if self._connecting is not None and not self._connecting.done():
            self._connecting.cancel()
        if self._bus is not None:
            try:
                await asyncio.wait_for(self._bus.nc.flush(), CLOSE_SECONDS / 2)
            except Exception as exc:  # noqa: BLE001
                log.debug("flushing progress: %s", exc)
            await asyncio.wait_for(self._bus.close(), CLOSE_SECONDS / 2)
        if self._channel is not None:
            await asyncio.wait_for(self._channel.close(), CLOSE_SECONDS / 2)


async def _run(fn: Callable[[], Awaitable[Any]]) -> Any:
    return await fn()
