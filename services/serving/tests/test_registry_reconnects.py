"""Reconciliation after reconnects: promotions missed while the fan-out consumer was gone are
caught up when the connection to NATS, or to the registry, comes back."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from registry_support import registry_client, wait_for_events


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
