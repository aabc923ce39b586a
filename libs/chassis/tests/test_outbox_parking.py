"""Poison outbox rows against a real nats-server: refused at write, parked at relay, never blocking.

A row NATS refuses for good (a subject with a newline, a payload past NATS' max payload, bytes
that are no envelope) used to be retried first, forever, so no later event was ever published.
Here such rows are refused by `Outbox.add` where a client could cause them, and any that reach the
table anyway are parked after bounded refusals while later rows publish in order; a NATS outage
parks nothing.
"""

from __future__ import annotations

import asyncio
import importlib.util
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import nats
import pytest
from prometheus_client import REGISTRY
from sqlalchemy import Engine, create_engine, insert, select
from sqlalchemy.orm import Session

from splitstack.chassis.config import ChassisSettings
from splitstack.chassis.outbox import Outbox, OutboxRelay, parked_table, pending_count
from splitstack.chassis.testing.servers import NatsServer, start_nats
from splitstack.contracts.envelope import MSG_ID_HEADER, unwrap, wrap
from splitstack.contracts.limits import MAX_EVENT_BYTES, OutOfBounds
from splitstack.contracts.events import subject
from splitstack.events.v1 import events_pb2
from splitstack.registry.v1 import registry_pb2


def _load_child():
    """The same tiny "dataset registry" schema as the outbox tests (its own module instance)."""
    spec = importlib.util.spec_from_file_location("splitstack_outbox_parking_child",
                                                  Path(__file__).with_name("outbox_child.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


child = _load_child()
outbox = child.outbox
parked = parked_table(child.metadata, outbox.name)
PRODUCER = "test/outbox-parking"
DEAD_LETTER_SUBJECT = "deadletter.outbox-test-outbox-parking"


@pytest.fixture(params=["sqlite", "postgresql"])
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    url = (f"sqlite:///{tmp_path / 'state.db'}" if request.param == "sqlite"
           else request.getfixturevalue("postgres_url"))
    engine = create_engine(url)
    child.metadata.create_all(engine)
    yield engine
    engine.dispose()


async def open_bus(url: str):
    from splitstack.chassis.bus import connect_bus

    bus = await connect_bus(ChassisSettings(nats_url=url), producer=PRODUCER)
    await bus.ensure_streams()
    return bus


@pytest.fixture
async def bus(nats_server: NatsServer) -> AsyncIterator:
    bus = await open_bus(nats_server.url)
    yield bus
    await bus.close()


def promoted(model: str, alias: str) -> events_pb2.ModelPromoted:
    return events_pb2.ModelPromoted(model=model, alias=alias, version=1)


def insert_raw(engine: Engine, subject_text: str, data: bytes, event_id: str) -> None:
    """A row as a service written before a rule existed (or by a bug) would leave it: no checks."""
    with engine.begin() as conn:
        conn.execute(insert(outbox).values(event_id=event_id, subject=subject_text, data=data, attempts=0))


def envelope_bytes(payload, event_id: str) -> bytes:
    return wrap(payload, producer=PRODUCER, event_id=event_id).SerializeToString()


async def stream_messages(nats_url: str, stream: str) -> list[tuple[str, str]]:
    """(subject, Nats-Msg-Id) of every message of `stream`, in stream order."""
    nc = await nats.connect(nats_url, allow_reconnect=False)
    try:
        js = nc.jetstream()
        state = (await js.stream_info(stream)).state
        found = []
        for seq in range(state.first_seq, state.last_seq + 1) if state.messages else ():
            msg = await js.get_msg(stream, seq)
            found.append((msg.subject, msg.headers[MSG_ID_HEADER]))
        return found
    finally:
        await nc.close()


def parked_rows(engine: Engine) -> list:
    with engine.connect() as conn:
        return conn.execute(select(parked).order_by(parked.c.id)).all()


def parked_total() -> float:
    return REGISTRY.get_sample_value("splitstack_outbox_parked_total", {"outbox": outbox.name}) or 0.0


# ---- refused at write: nothing stored ---------------------------------------------------------

@pytest.mark.parametrize("alias", ["prod\n", "prod ", "pro.d", "*", ">", ""])
def test_add_refuses_a_subject_nats_would_refuse_and_stores_nothing(engine: Engine, alias: str) -> None:
    bad = f"model.promoted.digits.{alias}"
    with Session(engine) as session, session.begin():
        with pytest.raises(ValueError):
            Outbox(outbox, PRODUCER).add(session, bad, promoted("digits", alias))
    assert pending_count(engine, outbox) == 0


def test_add_refuses_an_event_past_the_size_bound_and_stores_nothing(engine: Engine) -> None:
    huge = events_pb2.ModelPromoted(model="digits", alias="prod", version=1, reason="x" * (MAX_EVENT_BYTES + 1))
    with Session(engine) as session, session.begin():
        with pytest.raises(OutOfBounds, match="at most"):
            Outbox(outbox, PRODUCER).add(session, subject("model_promoted", model="digits", alias="prod"), huge)
    assert pending_count(engine, outbox) == 0


# ---- parked at relay: later rows still publish --------------------------------------------------

async def test_a_refused_row_is_parked_and_later_rows_publish_in_order(
        engine: Engine, bus, nats_server: NatsServer) -> None:
    before = child.register(engine, "digits", 1)
    insert_raw(engine, "model.promoted.digits.prod\n", envelope_bytes(promoted("digits", "prod\n"), "poison-1"),
               "poison-1")
    insert_raw(engine, "data.updated.digits", b"\x00not an envelope", "poison-2")
    after = [child.register(engine, "digits", v) for v in (2, 3)]
    relay = OutboxRelay(engine, outbox, bus, max_attempts=3, poll_interval=0.05)
    counted = parked_total()

    task = asyncio.create_task(relay.run())
    try:
        await _wait_until(lambda: pending_count(engine, outbox) == 0, "every row published or parked")
    finally:
        await asyncio.wait_for(relay.stop(timeout=5), 15)
    assert task.done() and task.exception() is None

    data = await stream_messages(nats_server.url, "SPLITSTACK_DATA")
    assert [event_id for _, event_id in data] == [before, *after]            # in order, each once
    rows = parked_rows(engine)
    assert [(r.event_id, r.attempts) for r in rows] == [("poison-1", 3), ("poison-2", 3)]
    assert "prod\\n" in rows[0].reason and "envelope" in rows[1].reason
    assert parked_total() - counted == 2
    with engine.connect() as conn:                               # moved, not copied
        assert conn.execute(select(outbox.c.event_id).where(outbox.c.event_id.like("poison-%"))).all() == []

    async def announced() -> list:
        return await stream_messages(nats_server.url, "SPLITSTACK_DEADLETTER")
    letters = await _eventually(announced, lambda found: len(found) == 2, "dead-letter announcements")
    assert {s for s, _ in letters} == {DEAD_LETTER_SUBJECT}


async def test_a_payload_nats_refuses_as_too_large_is_parked(tmp_path: Path) -> None:
    """NATS' own refusal (its max_payload, here set below the platform's bound) parks the row too."""
    server = start_nats(tmp_path / "nats", config_text="max_payload: 4096\n")
    engine = create_engine(f"sqlite:///{tmp_path / 'state.db'}")
    child.metadata.create_all(engine)
    bus = await open_bus(server.url)
    try:
        big = events_pb2.DataUpdated(dataset_version=registry_pb2.DatasetVersion(
            dataset="digits", version=9, metadata={"note": "y" * 8000}))
        insert_raw(engine, "data.updated.digits", envelope_bytes(big, "too-big"), "too-big")
        later = child.register(engine, "digits", 10)
        relay = OutboxRelay(engine, outbox, bus, max_attempts=2)
        for _ in range(3):
            await relay.relay_once()
        assert [(r.event_id, r.attempts) for r in parked_rows(engine)] == [("too-big", 2)]
        assert "refused by NATS" in parked_rows(engine)[0].reason
        assert [e for _, e in await stream_messages(server.url, "SPLITSTACK_DATA")] == [later]
    finally:
        await bus.close()
        engine.dispose()
        server.stop()


async def test_nats_being_down_parks_nothing_however_often_it_fails(
        engine: Engine, bus, nats_server: NatsServer) -> None:
    event_ids = [child.register(engine, "digits", v) for v in (1, 2)]
    nats_server.stop()
    relay = OutboxRelay(engine, outbox, bus, max_attempts=2)
    for _ in range(5):
        with pytest.raises(Exception):
            await relay.relay_once()
    assert parked_rows(engine) == [] and pending_count(engine, outbox) == 2

    restarted = start_nats(nats_server.data_dir, port=nats_server.ports["client"])
    try:
        async def drained() -> bool:
            try:
                await relay.relay_once()
            except Exception:  # noqa: BLE001  the bus is still reconnecting
                return False
            return pending_count(engine, outbox) == 0
        await _eventually(drained, bool, "rows published after NATS returned")
        assert [e for _, e in await stream_messages(restarted.url, "SPLITSTACK_DATA")] == event_ids
        assert parked_rows(engine) == []
    finally:
        restarted.stop()


async def _wait_until(predicate, what: str, timeout: float = 60.0) -> None:
    await _eventually(lambda: asyncio.to_thread(predicate), bool, what, timeout)


async def _eventually(produce, accept, what: str, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while True:
        value = await produce()
        if accept(value):
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}; last saw {value!r}")
        await asyncio.sleep(0.1)
