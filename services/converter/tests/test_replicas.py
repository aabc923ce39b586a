"""Exactly one conversion per (version, target): several replicas, redelivered and duplicated events,
and a converter killed in the middle of a conversion.

Each test runs its own NATS, registry and converter pool (replicas share one SQLite database), with
short ack-wait and lease times so that a dead replica's work is taken over within seconds.
"""

from __future__ import annotations

import asyncio

import pytest
from converter_models import HandOff
from converter_support import (ServiceProcess, conversion_artifacts, fresh_name, get_version, open_channel,
                               open_event_log, register_version)

from splitstack.converter.v1 import converter_pb2 as cpb
from splitstack.converter.v1 import converter_pb2_grpc
from splitstack.registry.v1 import registry_pb2_grpc

pytestmark = pytest.mark.timeout(240)

STARTED = "starting conversion"
SETTLE_SECONDS = 3.0


def starts(processes: list[ServiceProcess], model: str) -> int:
    """How many conversion attempts of `model` the replicas' logs record."""
    return sum(line.count(f"{STARTED} {model}.") for p in processes for line in p.log().splitlines())


async def test_two_replicas_and_redelivered_events_convert_once(fresh_stack, handoffs: dict[str, HandOff]) -> None:
    pool = fresh_stack.pool
    a, b = pool.spawn(), pool.spawn()
    replicas = [pool.wait(a), pool.wait(b)]
    mlp = handoffs["mlp"]
    model = fresh_name("replicated")
    async with open_channel(fresh_stack.registry.address) as channel, open_event_log(fresh_stack.nats.url) as events:
        stub = registry_pb2_grpc.RegistryStub(channel)
        version = (await register_version(stub, model, mlp.program, mlp.sample)).version
        registered = (await events.wait_for(f"model.registered.{model}"))[0]
        # The same announcement again under new message ids, while the first delivery is being converted:
        # the other replica receives them, finds the live claim and waits it out.
        await events.publish_copy(registered)
        await events.publish_copy(registered)
        await events.wait_for(f"model.converted.{model}.cpu")
        # ... and after the conversion: the serving choice in the registry settles them at once.
        await events.publish_copy(registered)
        async with open_channel(replicas[1].address) as converter_channel:
            await converter_pb2_grpc.ConverterStub(converter_channel).RequestConversion(
                cpb.RequestConversionRequest(model=model, version=version, target="cpu"))
        await asyncio.sleep(SETTLE_SECONDS)
        handled = [p.log().count(f"{model}.{version}.cpu is") + p.log().count(f"{model}.{version}.cpu already")
                   for p in replicas]
        assert sum(handled) >= 3, handled          # the duplicates were seen and found done or busy
        assert len(await events.read(f"model.converted.{model}.>")) == 1
        assert await events.read(f"conversion.failed.{model}.>") == []
        found = await get_version(stub, model, version)
        assert len(conversion_artifacts(found)) == 2 and len(found.serving_choices) == 1
    assert starts(replicas, model) == 1, pool.logs()
    assert all(p.proc.poll() is None for p in replicas)


async def test_killed_mid_conversion_recovers_with_one_conversion(fresh_stack, handoffs: dict[str, HandOff]) -> None:
    pool = fresh_stack.pool
    doomed = pool.start(crash_points=["converter.mid_conversion"])
    cnn = handoffs["cnn"]
    model = fresh_name("crashed")
    async with open_channel(fresh_stack.registry.address) as channel, open_event_log(fresh_stack.nats.url) as events:
        stub = registry_pb2_grpc.RegistryStub(channel)
        version = (await register_version(stub, model, cnn.program, cnn.sample)).version
        assert await asyncio.to_thread(doomed.proc.wait, 120) == -9
        assert doomed.crashed_at("converter.mid_conversion")
        found = await get_version(stub, model, version)
        assert conversion_artifacts(found) == [] and list(found.serving_choices) == []   # nothing half-registered

        survivor = pool.start()
        converted = await events.wait_for(f"model.converted.{model}.cpu")
        await asyncio.sleep(SETTLE_SECONDS)
        assert len(await events.read(f"model.converted.{model}.>")) == 1 and len(converted) == 1
        found = await get_version(stub, model, version)
        assert len(conversion_artifacts(found)) == 2 and len(found.serving_choices) == 1
    assert starts([doomed], model) == 1 and starts([survivor], model) == 1
    async with open_channel(survivor.address) as channel:
        record = await converter_pb2_grpc.ConverterStub(channel).GetConversion(
            cpb.GetConversionRequest(model=model, version=version, target="cpu"))
    assert record.state == cpb.SUCCEEDED
    assert record.serving_choice.artifact.sha256 == found.serving_choices[0].artifact.sha256
