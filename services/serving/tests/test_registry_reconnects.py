"""Reconciliation after reconnects: promotions missed while the fan-out consumer was gone are
caught up when the connection to NATS, or to the registry, comes back."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from registry_support import RegistryProcess, registry_client, wait_for_events

from splitstack.chassis.testing.servers import NatsServer, free_port, start_nats


@dataclass
class RestartableStack:
    """NATS and a registry on fixed ports (and their own state), so both can be restarted in place."""

    root: Path
    nats_port: int
    registry_port: int
    nats: NatsServer | None = None
    registry: RegistryProcess | None = None

    @property
    def nats_url(self) -> str:
        return f"nats://127.0.0.1:{self.nats_port}"

    @property
    def registry_address(self) -> str:
        return f"127.0.0.1:{self.registry_port}"

    def start_nats(self) -> None:
        self.nats = start_nats(self.root / "nats", port=self.nats_port)

    def start_registry(self) -> None:
        self.registry = RegistryProcess.start(self.root / "registry", self.nats_url, port=self.registry_port)

    def stop(self) -> None:
        if self.registry is not None:
            self.registry.stop()
        if self.nats is not None:
            self.nats.stop()


@pytest.fixture
def restartable(tmp_path: Path) -> Iterator[RestartableStack]:
    stack = RestartableStack(tmp_path / "stack", free_port(), free_port())
    try:
        stack.start_nats()
        stack.start_registry()
        yield stack
    finally:
        stack.stop()


async def wait_until(condition: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        await asyncio.sleep(0.05)


async def test_missed_promotions_are_caught_up_after_nats_and_registry_reconnects(restartable, follow, model_name,
                                                                                  onnx_models) -> None:
    async with registry_client(restartable.registry_address) as registry:
        await registry.create_model(model_name)
        for seed in (1, 2, 3):
            await registry.register(model_name, {"cpu": onnx_models[seed]})
        await registry.promote(model_name, 1)
    running = await follow(models=(model_name,), instance="reconnecting", nats_url=restartable.nats_url,
                           registry_addr=restartable.registry_address)
    await wait_until(lambda: running.service.core.ready, "serving is ready")
    await running.service.promotions.stop()  # from now on this replica hears of no promotion

    async with registry_client(restartable.registry_address) as registry:
        await registry.promote(model_name, 2)
    await wait_for_events(restartable.nats_url, f"model.promoted.{model_name}.production", 2)
    assert running.repository.current_version(model_name) == "1"
    restartable.nats.stop()
    restartable.start_nats()
    await wait_until(lambda: running.repository.current_version(model_name) == "2", "caught up after NATS came back")

    async with registry_client(restartable.registry_address) as registry:
        await registry.promote(model_name, 3)
    await wait_for_events(restartable.nats_url, f"model.promoted.{model_name}.production", 3)
    restartable.registry.stop()
    await asyncio.to_thread(restartable.start_registry)
    await wait_until(lambda: running.repository.current_version(model_name) == "3",
                     "caught up after the registry came back")
