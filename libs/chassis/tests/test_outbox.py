"""The transactional outbox against real SQLite/PostgreSQL and a real nats-server with JetStream.

Exactly-once is checked where it can break: a SIGKILL between commit and publish, a SIGKILL
between publish and mark-published, two relays racing over one table, and a stopped server.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import nats
import pytest
from prometheus_client import REGISTRY
from sqlalchemy import Engine, create_engine, event, insert, select
from sqlalchemy.orm import Session

from splitstack.chassis.config import ChassisSettings
from splitstack.chassis.faults import MARKER_DIR_ENV, POINTS_ENV, crash_env, crash_point_hit
from splitstack.chassis.outbox import (
    Outbox, OutboxPublishError, OutboxRelay, outbox_table, pending_count,
)
from splitstack.chassis.testing.servers import NatsServer, start_nats
from splitstack.contracts.envelope import MSG_ID_HEADER, unwrap
from splitstack.contracts.events import subject

CHILD_PATH = Path(__file__).with_name("outbox_child.py")
DATA_STREAM = "SPLITSTACK_DATA"


def _load_child():
    spec = importlib.util.spec_from_file_location("splitstack_outbox_child", CHILD_PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


child = _load_child()
outbox = child.outbox


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'state.db'}"
    return request.getfixturevalue("postgres_url")


@pytest.fixture
def postgres_engine(postgres_url: str) -> Iterator[Engine]:
    engine = create_engine(postgres_url)
    child.metadata.create_all(engine)
    yield engine
    engine.dispose()


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    engine = create_engine(db_url)
    child.metadata.create_all(engine)
    yield engine
    engine.dispose()


async def open_bus(url: str):
    from splitstack.chassis.bus import connect_bus

    bus = await connect_bus(ChassisSettings(nats_url=url), producer="test/outbox")
    await bus.ensure_streams()
    return bus


@pytest.fixture
async def bus(nats_server: NatsServer) -> AsyncIterator:
    bus = await open_bus(nats_server.url)
    yield bus
    await bus.close()


async def stream_event_ids(nats_url: str, stream: str = DATA_STREAM) -> list[str]:
    """Every message's Nats-Msg-Id in stream order (checked against the envelope inside)."""
    nc = await nats.connect(nats_url, allow_reconnect=False)
    try:
        js = nc.jetstream()
        state = (await js.stream_info(stream)).state
        ids = []
        for seq in range(state.first_seq, state.last_seq + 1) if state.messages else ():
            msg = await js.get_msg(stream, seq)
            assert unwrap(msg.data).event_id == msg.headers[MSG_ID_HEADER]
            ids.append(msg.headers[MSG_ID_HEADER])
        return ids
    finally:
        await nc.close()


def published_flags(engine: Engine) -> dict[str, bool]:
    with engine.connect() as conn:
        rows = conn.execute(select(outbox.c.event_id, outbox.c.published_at)).all()
    return {r.event_id: r.published_at is not None for r in rows}


def published_total() -> float:
    return REGISTRY.get_sample_value("splitstack_outbox_published_total", {"outbox": "outbox"}) or 0.0


def run_child(*args: str, env_extra: dict[str, str]) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in (POINTS_ENV, MARKER_DIR_ENV)}
    return subprocess.run([sys.executable, str(CHILD_PATH), *args], env={**env, **env_extra},
                          capture_output=True, text=True, timeout=120)


async def wait_until(predicate, timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not await predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.05)


# ---- adding events ---------------------------------------------------------------------------

def test_add_commits_event_with_state(engine: Engine) -> None:
    event_id = child.register(engine, "digits", 1)
    with engine.connect() as conn:
        row = conn.execute(select(outbox)).one()
        state = conn.execute(select(child.dataset_versions)).all()
    assert state == [("digits", 1)]
    assert (row.event_id, row.subject, row.published_at, row.attempts) == (event_id, "data.updated.digits", None, 0)
    event = unwrap(row.data)
    assert (event.event_id, event.producer) == (event_id, child.PRODUCER)
    assert event.payload == child.dataset_updated("digits", 1)
    assert pending_count(engine, outbox) == 1


def test_rolled_back_transaction_leaves_no_event(engine: Engine) -> None:
    with Session(engine) as session:
        session.begin()
        session.execute(insert(child.dataset_versions).values(dataset="digits", version=1))
        Outbox(outbox, "test").add(session, subject("data_updated", dataset="digits"),
                                   child.dataset_updated("digits", 1))
        session.rollback()
    assert pending_count(engine, outbox) == 0
    with engine.connect() as conn:
        assert conn.execute(select(child.dataset_versions)).all() == []


@pytest.mark.parametrize("bad_subject", ["training.progress.job-1", "orders.created.x", "data.updated.a.b"])
def test_subject_outside_contract_streams_is_rejected(engine: Engine, bad_subject: str) -> None:
    with Session(engine) as session, session.begin():
        with pytest.raises(ValueError, match=bad_subject.replace(".", r"\.")):
            Outbox(outbox, "test").add(session, bad_subject, child.dataset_updated("a", 1))
    assert pending_count(engine, outbox) == 0


def test_payload_of_another_subject_is_rejected(engine: Engine) -> None:
    with Session(engine) as session, session.begin():
        with pytest.raises(ValueError, match="ModelPromoted"):
            Outbox(outbox, "test").add(session, subject("model_promoted", model="m", alias="prod"),
                                       child.dataset_updated("a", 1))


def test_outbox_table_fits_service_metadata(tmp_path: Path) -> None:
    from sqlalchemy import MetaData, inspect

    metadata = MetaData()
    table = outbox_table(metadata, "registry_outbox")
    engine = create_engine(f"sqlite:///{tmp_path / 'x.db'}")
    metadata.create_all(engine)
    columns = {c["name"] for c in inspect(engine).get_columns("registry_outbox")}
    assert columns == {"id", "event_id", "subject", "data", "created_at", "published_at", "attempts", "last_error"}
    with engine.begin() as conn:  # ids autoincrement on SQLite too (BigInteger variant)
        for n in range(2):
            Outbox(table, "t").add(conn, subject("data_updated", dataset="d"), child.dataset_updated("d", n))
        assert conn.execute(select(table.c.id).order_by(table.c.id)).scalars().all() == [1, 2]
    engine.dispose()


# ---- relaying --------------------------------------------------------------------------------

async def test_relay_publishes_pending_events_in_order_once(engine: Engine, bus, nats_server: NatsServer) -> None:
    event_ids = [child.register(engine, "digits", v) for v in range(1, 6)]
    relay = OutboxRelay(engine, outbox, bus, batch_size=2)
    before = published_total()
    assert [await relay.relay_once() for _ in range(4)] == [2, 2, 1, 0]
    assert await stream_event_ids(nats_server.url) == event_ids
    assert published_flags(engine) == dict.fromkeys(event_ids, True)
    assert pending_count(engine, outbox) == 0
    assert published_total() - before == 5


async def test_run_relays_soon_after_wake_from_a_thread(engine: Engine, bus, nats_server: NatsServer) -> None:
    first_id = child.register(engine, "digits", 1)
    relay = OutboxRelay(engine, outbox, bus, poll_interval=60)  # after its first batch only wake() can help
    task = asyncio.create_task(relay.run())

    async def stream_holds(*event_ids: str) -> bool:
        return await stream_event_ids(nats_server.url) == list(event_ids)

    await wait_until(lambda: stream_holds(first_id), what="the first batch")

    def commit_and_wake() -> str:
        event_id = child.register(engine, "digits", 2)
        relay.wake()
        return event_id

    second_id = await asyncio.to_thread(commit_and_wake)
    await wait_until(lambda: stream_holds(first_id, second_id), timeout=20, what="the woken relay")
    await asyncio.wait_for(relay.stop(timeout=5), 10)
    assert task.done() and task.exception() is None


async def test_publish_failure_leaves_rows_pending_until_server_returns(
        engine: Engine, bus, nats_server: NatsServer) -> None:
    event_ids = [child.register(engine, "digits", v) for v in range(1, 4)]
    nats_server.stop()
    relay = OutboxRelay(engine, outbox, bus, poll_interval=0.1, max_backoff=0.5)
    with pytest.raises(OutboxPublishError) as failed:
        await relay.relay_once()
    assert (failed.value.event_id, failed.value.published) == (event_ids[0], 0)
    with engine.connect() as conn:
        rows = conn.execute(select(outbox.c.attempts, outbox.c.last_error).order_by(outbox.c.id)).all()
    assert rows[0].attempts == 1 and rows[0].last_error
    assert [r.attempts for r in rows[1:]] == [0, 0]
    assert pending_count(engine, outbox) == 3

    restarted = start_nats(nats_server.data_dir, port=nats_server.ports["client"])
    try:
        task = asyncio.create_task(relay.run())

        async def all_published() -> bool:
            return await asyncio.to_thread(pending_count, engine, outbox) == 0

        await wait_until(all_published, timeout=60, what="pending rows to be published after restart")
        await relay.stop(timeout=10)
        assert task.done()
        assert sorted(await stream_event_ids(restarted.url)) == sorted(event_ids)
    finally:
        restarted.stop()


# ---- exactly once across crashes -------------------------------------------------------------

async def test_exactly_once_across_kill_between_commit_and_publish(
        db_url: str, engine: Engine, bus, nats_server: NatsServer, tmp_path: Path) -> None:
    died = run_child("write", db_url, "digits", "evt-after-commit",
                     env_extra=crash_env(["test.after_commit"], tmp_path))
    assert died.returncode == -signal.SIGKILL, died.stderr
    assert crash_point_hit(tmp_path, "test.after_commit")
    assert await stream_event_ids(nats_server.url) == []

    assert await OutboxRelay(engine, outbox, bus).relay_once() == 1
    assert await OutboxRelay(engine, outbox, bus).relay_once() == 0
    assert await stream_event_ids(nats_server.url) == ["evt-after-commit"]
    with engine.connect() as conn:
        assert conn.execute(select(child.dataset_versions)).all() == [("digits", 1)]
    assert published_flags(engine) == {"evt-after-commit": True}


async def test_exactly_once_across_kill_between_publish_and_mark(
        db_url: str, engine: Engine, nats_server: NatsServer, tmp_path: Path) -> None:
    child.register(engine, "digits", 1, "evt-after-publish")
    died = run_child("relay", db_url, nats_server.url, env_extra=crash_env(["outbox.after_publish"], tmp_path))
    assert died.returncode == -signal.SIGKILL, died.stderr
    assert crash_point_hit(tmp_path, "outbox.after_publish")
    assert await stream_event_ids(nats_server.url) == ["evt-after-publish"]
    assert published_flags(engine) == {"evt-after-publish": False}

    relayed = run_child("relay", db_url, nats_server.url, env_extra={})
    assert relayed.returncode == 0, relayed.stderr
    assert await stream_event_ids(nats_server.url) == ["evt-after-publish"]
    assert published_flags(engine) == {"evt-after-publish": True}


class CountingBus:
    """Wraps the real bus: counts this relay's publishes and the duplicates the server reported."""

    def __init__(self, bus, gate: asyncio.Event | None = None) -> None:
        self.bus, self.gate = bus, gate
        self.event_ids: list[str] = []
        self.duplicates = 0
        self.gate_timed_out = False
        self.first_publish = asyncio.Event()

    async def publish_raw(self, subject: str, data: bytes, *, event_id: str):
        if self.gate is not None:  # hold this relay's first batch (and its row locks) open
            try:
                await asyncio.wait_for(self.gate.wait(), 20)
            except TimeoutError:
                self.gate_timed_out = True
                raise
        result = await self.bus.publish_raw(subject, data, event_id=event_id)
        self.event_ids.append(event_id)
        self.duplicates += bool(result.duplicate)
        self.first_publish.set()
        return result


async def test_concurrent_relays_skip_each_others_locked_rows(
        postgres_url: str, postgres_engine: Engine, bus, nats_server: NatsServer) -> None:
    with Session(postgres_engine) as session, session.begin():
        box = Outbox(outbox, "test")
        event_ids = [box.add(session, subject("data_updated", dataset="digits"), child.dataset_updated("digits", n))
                     for n in range(200)]
    other_engine = create_engine(postgres_url)
    second = CountingBus(bus)
    # The first relay cannot publish until the second has: with plain FOR UPDATE the second would
    # block on the first's locks (timeout); without locks it would claim the same rows (duplicates).
    first = CountingBus(bus, gate=second.first_publish)
    relays = [OutboxRelay(postgres_engine, outbox, first, batch_size=20, poll_interval=0.05),
              OutboxRelay(other_engine, outbox, second, batch_size=20, poll_interval=0.05)]
    tasks = [asyncio.create_task(relay.run()) for relay in relays]
    try:
        async def drained() -> bool:
            return await asyncio.to_thread(pending_count, postgres_engine, outbox) == 0

        await wait_until(drained, timeout=60, what="both relays to drain the outbox")
    finally:
        await asyncio.gather(*(relay.stop(timeout=10) for relay in relays))
        other_engine.dispose()
    assert all(t.done() and t.exception() is None for t in tasks)
    assert not first.gate_timed_out, "the second relay could not claim rows while the first held its locks"
    publishes = (len(first.event_ids), len(second.event_ids))
    assert min(publishes) > 0 and sum(publishes) == 200, publishes
    assert len(set(first.event_ids) | set(second.event_ids)) == 200
    assert first.duplicates + second.duplicates == 0
    assert sorted(await stream_event_ids(nats_server.url)) == sorted(event_ids)
    assert published_flags(postgres_engine) == dict.fromkeys(event_ids, True)


class BlockedBus:
    """A bus whose publish waits until released: a slow or unreachable NATS."""

    def __init__(self) -> None:
        self.entered = asyncio.Event()
        self.release = asyncio.Event()

    async def publish_raw(self, subject: str, data: bytes, *, event_id: str):
        self.entered.set()
        await self.release.wait()
        return None


async def test_sqlite_writers_are_not_stalled_by_a_slow_publish(tmp_path: Path) -> None:
    # The way an embedded service runs SQLite: every transaction takes the write lock at BEGIN.
    engine = create_engine(f"sqlite:///{tmp_path / 'state.db'}", connect_args={"timeout": 2})

    @event.listens_for(engine, "connect")
    def _no_implicit_begin(dbapi_connection, _record) -> None:
        dbapi_connection.isolation_level = None

    @event.listens_for(engine, "begin")
    def _begin_immediate(conn) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE")

    child.metadata.create_all(engine)
    child.register(engine, "digits", 1)
    bus = BlockedBus()
    relay = OutboxRelay(engine, outbox, bus)
    relaying = asyncio.create_task(relay.relay_once())
    await asyncio.wait_for(bus.entered.wait(), 10)
    started = time.monotonic()
    await asyncio.to_thread(child.register, engine, "digits", 2)  # must not wait for the publish
    assert time.monotonic() - started < 1.5
    bus.release.set()
    assert await asyncio.wait_for(relaying, 10) == 1
    assert pending_count(engine, outbox) == 1
    engine.dispose()


def test_chassis_sqlite_engine_uses_wal_and_lets_readers_in_beside_a_writer(tmp_path: Path) -> None:
    from splitstack.chassis.db import READ_ONLY_OPTION, open_engine

    engine = open_engine(f"sqlite:///{tmp_path / 'nested' / 'state.db'}")
    child.metadata.create_all(engine)
    with engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
    writer = engine.connect()
    writer.begin()  # BEGIN IMMEDIATE: holds the write lock until commit
    try:
        with engine.connect() as reader:
            reader.execution_options(**{READ_ONLY_OPTION: True})
            with reader.begin():
                assert reader.execute(select(outbox)).all() == []
    finally:
        writer.rollback()
        writer.close()
    engine.dispose()
