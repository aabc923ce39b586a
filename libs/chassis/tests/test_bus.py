"""The JetStream bus against a real nats-server: de-duplication, work and fan-out consumers,
poison messages, in-progress acks, restarts and connecting before the server is up."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Awaitable, Callable

import pytest
from prometheus_client import REGISTRY

from splitstack.chassis.bus import Bus, BusConnectError, connect_bus
from splitstack.chassis.config import ChassisSettings
from splitstack.chassis import consumers
from splitstack.chassis.consumers import Delivery, Terminate
from splitstack.chassis.testing.servers import NatsServer, free_port, start_nats
from splitstack.contracts.envelope import unwrap
from splitstack.contracts.events import CONSUMERS, StreamDef, subject
from splitstack.events.v1 import events_pb2
from splitstack.registry.v1 import registry_pb2

pytestmark = pytest.mark.timeout(30)

TRAINER = CONSUMERS["trainer"]


def settings(url: str, timeout: float = 5.0) -> ChassisSettings:
    return ChassisSettings(nats_url=url, nats_connect_timeout_seconds=timeout)


def data_updated(version: int) -> events_pb2.DataUpdated:
    return events_pb2.DataUpdated(dataset_version=registry_pb2.DatasetVersion(dataset="digits", version=version))


def promoted(version: int) -> events_pb2.ModelPromoted:
    return events_pb2.ModelPromoted(model="digits", alias="production", version=version)


async def wait_until(predicate: Callable[[], bool | Awaitable[bool]], timeout: float = 10.0) -> None:
    """Poll `predicate` (sync or async) until true; fail after `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = predicate()
        if isinstance(result, Awaitable):
            result = await result
        if result:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"condition not met within {timeout}s")


@pytest.fixture
async def new_bus(nats_server: NatsServer):
    """A factory of Bus connections to the test server (streams ensured); all closed afterwards."""
    buses: list[Bus] = []

    async def make(producer: str = "tester") -> Bus:
        bus = await connect_bus(settings(nats_server.url), producer=producer)
        buses.append(bus)
        await bus.ensure_streams()
        return bus

    yield make
    await asyncio.gather(*(bus.close(2.0) for bus in buses))


def counter(name: str, consumer: str) -> float:
    return REGISTRY.get_sample_value(name, {"consumer": consumer}) or 0.0


async def settled(bus: Bus, stream: str, consumer: str) -> bool:
    """Every message the consumer was given has been acked or terminated."""
    info = await bus.js.consumer_info(stream, consumer)
    return info.num_ack_pending == 0 and info.num_pending == 0


async def last_dead_letter(bus: Bus, consumer: str) -> events_pb2.DeadLetter:
    raw = await bus.js.get_last_msg("SPLITSTACK_DEADLETTER", subject("dead_letter", consumer=consumer))
    event = unwrap(raw.data)
    assert event.producer == bus.producer
    return event.payload


async def test_publish_deduplicates_by_event_id(new_bus):
    bus = await new_bus()
    await bus.ensure_streams()  # a second time: idempotent
    where = subject("data_updated", dataset="digits")
    first = await bus.publish(where, data_updated(1), event_id="evt-1")
    again = await bus.publish(where, data_updated(1), event_id="evt-1")
    other = await bus.publish(where, data_updated(2))
    assert (first.stream, first.duplicate) == ("SPLITSTACK_DATA", False)
    assert again.duplicate and again.seq == first.seq
    assert not other.duplicate and other.seq == first.seq + 1
    assert (await bus.js.stream_info("SPLITSTACK_DATA")).state.messages == 2


async def test_ensure_streams_updates_a_changed_definition(new_bus):
    bus = await new_bus()
    stream = StreamDef(name="SPLITSTACK_TEST", description="t", subjects=("test.a.>",), retention="limits",
                       storage="file", duplicate_window_seconds=60, max_age_days=1)
    await bus.ensure_streams([stream])
    wider = StreamDef(**{**stream.__dict__, "subjects": ("test.a.>", "test.b.>"), "max_age_days": 2})
    await bus.ensure_streams([wider])
    config = (await bus.js.stream_info("SPLITSTACK_TEST")).config
    assert config.subjects == ["test.a.>", "test.b.>"] and config.max_age == 2 * 86400


async def test_core_publish_reaches_core_subscribers(new_bus):
    bus = await new_bus()
    got: asyncio.Queue = asyncio.Queue()
    await bus.subscribe_core(subject("training_progress", job="*"), got.put)
    progress = events_pb2.TrainingProgress()
    await bus.publish_core(subject("training_progress", job="job-1"), progress)
    event = await asyncio.wait_for(got.get(), 5)
    assert event.producer == "tester" and event.type_name == "splitstack.events.v1.TrainingProgress"


async def test_failing_handler_is_dead_lettered_after_max_deliver(new_bus):
    bus = await new_bus("trainer")
    deliveries: list[int] = []
    letters: list[events_pb2.DeadLetter] = []
    before = counter("splitstack_bus_dead_letters_total", "trainer")

    async def always_fails(delivery: Delivery) -> None:
        deliveries.append(delivery.num_delivered)
        raise RuntimeError("model file is corrupt")

    await bus.work_consumer(TRAINER, always_fails, max_deliver=3, nak_delay=0.05, on_dead_letter=letters.append)
    sent = await bus.publish(subject("data_updated", dataset="digits"), data_updated(1), event_id="poison-1")
    await wait_until(lambda: letters)
    await wait_until(lambda: settled(bus, "SPLITSTACK_DATA", "trainer"))
    assert deliveries == [1, 2, 3]
    assert counter("splitstack_bus_dead_letters_total", "trainer") == before + 1
    letter = await last_dead_letter(bus, "trainer")
    assert letter == letters[0]
    assert (letter.consumer, letter.stream, letter.subject) == ("trainer", "SPLITSTACK_DATA", "data.updated.digits")
    assert (letter.event_id, letter.stream_sequence, letter.deliveries) == ("poison-1", sent.seq, 3)
    assert "RuntimeError: model file is corrupt" in letter.error and letter.at.seconds > 0


@pytest.mark.parametrize("case", ["undecodable", "terminate"])
async def test_hopeless_message_is_dead_lettered_on_first_delivery(new_bus, case):
    bus = await new_bus("trainer")
    deliveries: list[int] = []
    letters: list[events_pb2.DeadLetter] = []

    async def handler(delivery: Delivery) -> None:
        deliveries.append(delivery.num_delivered)
        raise Terminate("dataset version 1 does not exist")

    async def record(letter: events_pb2.DeadLetter) -> None:
        letters.append(letter)

    await bus.work_consumer(TRAINER, handler, max_deliver=5, nak_delay=0.05, on_dead_letter=record)
    where = subject("data_updated", dataset="digits")
    if case == "undecodable":
        await bus.publish_raw(where, b"\xff\x00 not an envelope", event_id="garbage-1")
    else:
        await bus.publish(where, data_updated(1), event_id="bad-1")
    await wait_until(lambda: letters)
    await wait_until(lambda: settled(bus, "SPLITSTACK_DATA", "trainer"))
    letter = await last_dead_letter(bus, "trainer")
    assert letter.deliveries == 1
    if case == "undecodable":
        assert deliveries == [] and letter.event_id == "garbage-1" and "envelope" in letter.error
    else:
        assert deliveries == [1] and letter.event_id == "bad-1"
        assert "dataset version 1 does not exist" in letter.error


async def test_work_consumer_shared_by_replicas_handles_each_message_once(new_bus):
    pool = CONSUMERS["converter"].for_target("cpu")
    replicas = [await new_bus("converter"), await new_bus("converter")]
    publisher = await new_bus("registry")
    handled: list[tuple[int, str, str]] = []

    def handler_of(replica: int):
        async def handle(delivery: Delivery) -> None:
            await asyncio.sleep(0.02)
            handled.append((replica, delivery.event.event_id, delivery.subject))
        return handle

    for i, bus in enumerate(replicas):
        await bus.work_consumer(pool, handler_of(i), concurrency=2)
    for i in range(30):
        await publisher.publish(subject("model_registered", model=f"m{i}"), events_pb2.ModelRegistered())
        for target in ("cpu", "t4"):
            await publisher.publish(subject("conversion_requested", model=f"m{i}", target=target),
                                    events_pb2.ConversionRequested())
    await wait_until(lambda: len(handled) >= 60)
    await wait_until(lambda: settled(publisher, "SPLITSTACK_MODELS", pool.durable))
    assert len(handled) == 60
    assert set(Counter(event_id for _, event_id, _ in handled).values()) == {1}
    assert not any(s.endswith(".t4") for _, _, s in handled)
    per_replica = Counter(replica for replica, _, _ in handled)
    assert per_replica[0] > 0 and per_replica[1] > 0, per_replica


async def test_a_payload_of_another_contract_message_is_dead_lettered_at_once(new_bus):
    """A poison event (the subject's contract says ModelRegistered; it carries DataUpdated) is
    terminated on its first delivery, and the next good event is handled."""
    bus = await new_bus("converter")
    pool = CONSUMERS["converter"].for_target("cpu")
    handled: list[str] = []
    letters: list[events_pb2.DeadLetter] = []

    async def handle(delivery: Delivery) -> None:
        handled.append(delivery.event.event_id)

    await bus.work_consumer(pool, handle, max_deliver=5, on_dead_letter=letters.append)
    await bus.publish(subject("model_registered", model="m"), data_updated(1), event_id="poison-type")
    await bus.publish(subject("model_registered", model="m"), events_pb2.ModelRegistered(), event_id="good")
    await wait_until(lambda: handled == ["good"] and len(letters) == 1)
    assert (letters[0].event_id, letters[0].deliveries) == ("poison-type", 1)
    assert "not its contract's splitstack.events.v1.ModelRegistered" in letters[0].error


async def test_fanout_delivers_every_message_to_every_replica(new_bus):
    publisher = await new_bus("registry")
    where = subject("model_promoted", model="digits", alias="production")
    await publisher.publish(where, promoted(1))  # before anyone listens
    seen: dict[str, list[int]] = {"a": [], "b": [], "replay": []}

    def recorder(name: str):
        async def record(delivery: Delivery) -> None:
            seen[name].append(delivery.event.payload.version)
        return record

    for name in ("a", "b"):
        bus = await new_bus("serving")
        await bus.fanout_consumer([subject("model_promoted", model="*", alias="*")], recorder(name))
    replay = await new_bus("serving")
    await replay.fanout_consumer(["model.promoted.>"], recorder("replay"), deliver_new_only=False)
    for version in range(2, 12):
        await publisher.publish(where, promoted(version))
    await wait_until(lambda: all(len(v) >= 10 for v in seen.values()) and len(seen["replay"]) >= 11)
    assert seen["a"] == seen["b"] == list(range(2, 12))
    assert seen["replay"] == list(range(1, 12))


async def test_long_handler_is_not_redelivered(new_bus):
    bus = await new_bus("trainer")
    deliveries: list[int] = []

    async def slow(delivery: Delivery) -> None:
        deliveries.append(delivery.num_delivered)
        await asyncio.sleep(2.5)

    await bus.work_consumer(TRAINER, slow, ack_wait=1.0, concurrency=2)
    await bus.publish(subject("data_updated", dataset="digits"), data_updated(1))
    await wait_until(lambda: deliveries)
    await wait_until(lambda: settled(bus, "SPLITSTACK_DATA", "trainer"), timeout=8)
    info = await bus.js.consumer_info("SPLITSTACK_DATA", "trainer")
    assert deliveries == [1] and info.num_redelivered == 0


async def fanout_recorder(bus: Bus) -> list[int]:
    versions: list[int] = []

    async def record(delivery: Delivery) -> None:
        versions.append(delivery.event.payload.version)

    await bus.fanout_consumer(["model.promoted.>"], record)
    return versions


async def test_fanout_survives_a_server_restart(new_bus, nats_server):
    publisher, follower = await new_bus("registry"), await new_bus("serving")
    versions = await fanout_recorder(follower)
    where = subject("model_promoted", model="digits", alias="production")
    for version in (1, 2, 3):
        await publisher.publish(where, promoted(version))
    await wait_until(lambda: len(versions) == 3)
    publisher_back = asyncio.create_task(publisher.reconnects.wait())
    nats_server.stop()
    restarted = start_nats(nats_server.data_dir, port=nats_server.ports["client"])
    try:
        await asyncio.wait_for(publisher_back, 10)
        for version in (4, 5, 6):
            await publisher.publish(where, promoted(version))
        await wait_until(lambda: len(versions) >= 6)
        assert versions == [1, 2, 3, 4, 5, 6]
    finally:
        await asyncio.gather(publisher.close(2.0), follower.close(2.0))
        restarted.stop()


async def test_fanout_recreates_a_vanished_consumer_where_it_left_off(new_bus, monkeypatch):
    monkeypatch.setattr(consumers, "FETCH_TIMEOUT_SECONDS", 1.0)  # the pull pending on it expires sooner
    publisher, follower = await new_bus("registry"), await new_bus("serving")
    versions = await fanout_recorder(follower)
    where = subject("model_promoted", model="digits", alias="production")
    await publisher.publish(where, promoted(1))
    await wait_until(lambda: versions == [1])
    (name,) = [c.name for c in await publisher.js.consumers_info("SPLITSTACK_MODELS")]
    await publisher.js.delete_consumer("SPLITSTACK_MODELS", name)
    for version in (2, 3):
        await publisher.publish(where, promoted(version))
    await wait_until(lambda: len(versions) >= 3)
    assert versions == [1, 2, 3]


async def test_close_is_bounded_with_a_stuck_handler(new_bus):
    bus = await new_bus("trainer")
    started = asyncio.Event()

    async def stuck(delivery: Delivery) -> None:
        started.set()
        await asyncio.Event().wait()

    subscription = await bus.work_consumer(TRAINER, stuck)
    await bus.publish(subject("data_updated", dataset="digits"), data_updated(1))
    await asyncio.wait_for(started.wait(), 5)
    begun = time.monotonic()
    await bus.close(timeout=0.5)
    await bus.close()  # idempotent
    await subscription.stop()
    assert time.monotonic() - begun < 3.0
    assert bus.nc.is_closed


async def test_connect_waits_for_a_server_that_starts_later(tmp_path):
    port = free_port()
    connecting = asyncio.create_task(connect_bus(settings(f"nats://127.0.0.1:{port}", 10.0), producer="early"))
    await asyncio.sleep(1.0)
    assert not connecting.done()
    server = start_nats(tmp_path / "nats", port=port)
    try:
        bus = await asyncio.wait_for(connecting, 10)
        await bus.ensure_streams()
        result = await bus.publish(subject("data_updated", dataset="digits"), data_updated(1))
        assert result.seq == 1
        await bus.close(2.0)
    finally:
        server.stop()


async def test_connect_gives_up_naming_the_url():
    url = f"nats://127.0.0.1:{free_port()}"
    begun = time.monotonic()
    with pytest.raises(BusConnectError, match=url):
        await connect_bus(settings(url, 0.5), producer="lonely")
    assert time.monotonic() - begun < 3.0
