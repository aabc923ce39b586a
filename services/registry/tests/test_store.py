"""Concurrency and persistence: two registry replicas on one database never lose or duplicate anything.

Each test runs two Registry instances with separate engines (as two processes would) over one
database, on PostgreSQL (row locks + unique constraints) and on one SQLite file (IMMEDIATE write
transactions + a busy timeout), and races them: version numbering, idempotency keys, model
creation, dataset versions, alias moves and finalization. Afterwards the stored rows and the
outbox must hold each change exactly once.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from sqlalchemy import Engine, insert, select

from splitstack.chassis.errors import AlreadyExists, Unavailable, status_for
from splitstack.chassis.outbox import Outbox, OutboxRelay
from splitstack.common.v1 import common_pb2 as c
from splitstack.contracts.envelope import unwrap
from splitstack.registry.v1 import registry_pb2 as pb
from splitstack_registry import records, tables
from splitstack_registry.blobs import LocalBlobStore
from splitstack_registry.core import Registry
from splitstack_registry.migrations import upgrade_to_head
from splitstack_registry.store import Store, open_engine


class Replica:
    """One registry 'process': its own engine, blob store and core over the shared database and dir."""

    def __init__(self, url: str, artifacts: Path) -> None:
        self.engine: Engine = open_engine(url)
        upgrade_to_head(self.engine)
        self.blobs = LocalBlobStore(artifacts)
        self.store = Store(self.engine, Outbox(tables.outbox, "registry/test"))
        self.registry = Registry(self.store, self.blobs, max_upload_bytes=1 << 20, chunk_bytes=4096)

    def close(self) -> None:
        self.registry.close()
        self.blobs.close()
        self.engine.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/registry.db"
    return request.getfixturevalue("postgres_url")


@pytest.fixture
def replicas(database_url: str, tmp_path: Path) -> Iterator[tuple[Registry, Registry]]:
    pair = [Replica(database_url, tmp_path / "artifacts") for _ in range(2)]
    yield pair[0].registry, pair[1].registry
    for replica in pair:
        replica.close()


def outbox(registry: Registry) -> list[tuple[str, str, object]]:
    o = tables.outbox
    with registry.store.engine.connect() as conn:
        rows = conn.execute(select(o.c.subject, o.c.event_id, o.c.data).order_by(o.c.id)).all()
    return [(r.subject, r.event_id, unwrap(bytes(r.data)).payload) for r in rows]


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


async def stream(data: bytes) -> AsyncIterator[bytes]:
    yield data


async def settle(*awaitables: object) -> list[object]:
    """Run concurrently; return each result or the exception it raised."""
    return await asyncio.gather(*awaitables, return_exceptions=True)  # type: ignore[arg-type]


async def ready(r: Registry, model: str = "digits") -> pb.ModelVersion:
    v = await r.create_version(pb.CreateVersionRequest(model=model))
    for kind in (c.EXPORTED_PROGRAM, c.SAMPLE):
        content = b"%d-%d" % (kind, v.version)
        await r.upload_artifact(pb.ArtifactHeader(model=model, version=v.version, kind=kind, sha256=sha(content),
                                                  size_bytes=len(content)), stream(content))
    return await r.finalize_version(model, v.version)


async def test_two_replicas_number_versions_without_gap_or_duplicate(replicas: tuple[Registry, Registry]) -> None:
    a, b = replicas
    await a.create_model(pb.Model(name="digits"))
    made = await settle(*(r.create_version(pb.CreateVersionRequest(model="digits")) for r in (a, b) * 30))
    assert all(isinstance(v, pb.ModelVersion) for v in made), [v for v in made if not isinstance(v, pb.ModelVersion)]
    assert sorted(v.version for v in made) == list(range(1, 61))
    listed, _ = await b.list_versions("digits", 100, "")
    assert [v.version for v in listed] == list(range(1, 61))
    assert (await a.create_version(pb.CreateVersionRequest(model="digits"))).version == 61


async def test_racing_retries_with_one_idempotency_key_create_one_version(replicas: tuple[Registry, Registry]) -> None:
    a, b = replicas
    await a.create_model(pb.Model(name="digits"))
    same = pb.CreateVersionRequest(model="digits", idempotency_key="job-7", lineage=pb.Lineage(training_job="job-7"))
    other = pb.CreateVersionRequest(model="digits", idempotency_key="job-7", lineage=pb.Lineage(training_job="x"))
    results = await settle(*(r.create_version(same) for r in (a, b) * 6), *(r.create_version(other) for r in (a, b)))
    versions = [v for v in results if isinstance(v, pb.ModelVersion)]
    errors = [e for e in results if not isinstance(e, pb.ModelVersion)]
    assert {v.version for v in versions} == {1}
    assert all(isinstance(e, AlreadyExists) for e in errors), errors
    winner = versions[0].lineage.training_job
    assert len(errors) == (2 if winner == "job-7" else 12)
    assert len((await b.list_versions("digits", 100, ""))[0]) == 1


async def test_racing_creates_of_one_model_store_it_once(replicas: tuple[Registry, Registry]) -> None:
    a, b = replicas
    spec = pb.Model(name="digits", required_targets=["cpu"])
    results = await settle(*(r.create_model(spec) for r in (a, b) * 5),
                           a.create_model(pb.Model(name="digits", description="another")))
    models = [m for m in results if isinstance(m, pb.Model)]
    assert all(m == models[0] for m in models) and len(models) >= 10
    assert all(isinstance(e, AlreadyExists) for e in results if not isinstance(e, pb.Model))
    assert len((await b.list_models(10, ""))[0]) == 1


async def test_finalize_from_both_replicas_announces_once(replicas: tuple[Registry, Registry]) -> None:
    a, b = replicas
    await a.create_model(pb.Model(name="digits"))
    for version in range(1, 4):
        await a.create_version(pb.CreateVersionRequest(model="digits"))
        for kind in (c.EXPORTED_PROGRAM, c.SAMPLE):
            content = b"%d-%d" % (kind, version)
            await b.upload_artifact(pb.ArtifactHeader(model="digits", version=version, kind=kind, sha256=sha(content),
                                                      size_bytes=len(content)), stream(content))
    results = await settle(*(r.finalize_version("digits", v) for v in (1, 2, 3) for r in (a, b, a, b)))
    assert all(isinstance(v, pb.ModelVersion) and v.state == pb.READY for v in results), results
    registered = [(s, e) for s, e, _ in outbox(a) if s.startswith("model.registered")]
    assert len(registered) == 3 and len({e for _, e in registered}) == 3


async def test_dataset_versions_from_both_replicas(replicas: tuple[Registry, Registry]) -> None:
    a, b = replicas
    await a.create_dataset(pb.Dataset(name="digits"))
    contents = []
    for rows in range(1, 9):
        buffer = io.BytesIO()
        np.savez(buffer, inputs=np.zeros((rows, 2)))
        contents.append(buffer.getvalue())

    def header(data: bytes, key: str = "") -> pb.DatasetVersionHeader:
        return pb.DatasetVersionHeader(dataset="digits", sha256=sha(data), size_bytes=len(data), idempotency_key=key)

    made = await settle(*(r.upload_dataset_version(header(d), stream(d)) for r, d in zip((a, b) * 4, contents)))
    assert sorted(v.version for v in made) == list(range(1, 9))           # type: ignore[union-attr]
    assert sorted(v.row_count for v in made) == list(range(1, 9))         # type: ignore[union-attr]
    keyed = await settle(*(r.upload_dataset_version(header(contents[0], "k"), stream(contents[0])) for r in (a, b) * 3))
    assert {v.version for v in keyed} == {9}                              # type: ignore[union-attr]
    updated = [e for s, e, _ in outbox(b) if s == "data.updated.digits"]
    assert len(updated) == 9 and len(set(updated)) == 9


async def test_racing_alias_moves_form_one_history(replicas: tuple[Registry, Registry]) -> None:
    a, b = replicas
    await a.create_model(pb.Model(name="digits"))
    for _ in range(3):
        await ready(a)
    targets = [1, 2, 3, 2, 1, 3, 3, 1, 2, 2, 3, 1]
    results = await settle(*(r.set_alias(pb.SetAliasRequest(model="digits", alias="production", version=v,
                                                            actor=f"actor-{i}"))
                             for i, (r, v) in enumerate(zip((a, b) * 6, targets))))
    assert all(isinstance(x, pb.Alias) for x in results), results
    history = await b.get_alias_history("digits", "production")
    assert history[0].from_version == 0
    assert all(m.from_version == prev.to_version for prev, m in zip(history, history[1:]))
    assert all(m.from_version != m.to_version for m in history)
    current, _ = await a.resolve_alias("digits", "production")
    assert current.version == history[-1].to_version
    promoted = [p for s, _, p in outbox(a) if s == "model.promoted.digits.production"]
    assert [(p.previous_version, p.version) for p in promoted] == [(m.from_version, m.to_version) for m in history]


async def test_write_reruns_a_transaction_that_lost_a_uniqueness_race(database_url: str, tmp_path: Path) -> None:
    replica = Replica(database_url, tmp_path / "artifacts")
    try:
        await replica.registry.create_model(pb.Model(name="digits"))
        attempts: list[int] = []

        def insert_blindly_once(tx: object) -> str:
            attempts.append(1)
            if len(attempts) == 1:   # as a racing replica would: insert what another already committed
                now = records.utcnow()
                tx.conn.execute(insert(tables.models).values(  # type: ignore[attr-defined]
                    name="digits", uid="x", spec=b"", policy=b"", policy_updated_at=now, created_at=now))
            return tx.model_row("digits").uid  # type: ignore[attr-defined]

        uid = await asyncio.to_thread(replica.store.write, insert_blindly_once)
        assert len(attempts) == 2 and uid != "x"
    finally:
        replica.close()


async def test_an_unreachable_database_is_unavailable(tmp_path: Path) -> None:
    engine = open_engine("postgresql+psycopg://postgres@127.0.0.1:1/none?connect_timeout=2")
    blobs = LocalBlobStore(tmp_path / "artifacts")
    try:
        registry = Registry(Store(engine, Outbox(tables.outbox, "registry/test")), blobs, max_upload_bytes=10,
                            chunk_bytes=10)
        with pytest.raises(Unavailable) as failure:
            await registry.get_model("digits")
        assert status_for(failure.value) == grpc.StatusCode.UNAVAILABLE and "database" in str(failure.value)
    finally:
        registry.close()
        blobs.close()
        engine.dispose()


class SlowPublisher:
    """Stands in for the bus: every publish takes a few event-loop turns, as a network round trip does."""

    def __init__(self) -> None:
        self.published: list[str] = []

    async def publish_raw(self, subject: str, data: bytes, *, event_id: str) -> None:
        await asyncio.sleep(0.005)
        self.published.append(event_id)


async def test_writers_waiting_for_the_database_never_starve_the_relay(database_url: str, tmp_path: Path) -> None:
    """Many writers queue for SQLite's lock while the relay holds it across publishes: all finish."""
    replica = Replica(database_url, tmp_path / "artifacts")
    publisher = SlowPublisher()
    relay = OutboxRelay(replica.engine, tables.outbox, publisher, poll_interval=0.01, batch_size=3)
    relaying = asyncio.create_task(relay.run())
    try:
        r = replica.registry
        await r.create_model(pb.Model(name="digits"))
        limit = asyncio.Semaphore(16)

        async def register() -> pb.ModelVersion:
            async with limit:
                return await ready(r)

        made = await asyncio.wait_for(asyncio.gather(*(register() for _ in range(40))), timeout=25)
        assert sorted(v.version for v in made) == list(range(1, 41))
        for _ in range(500):
            if len(publisher.published) >= 40:
                break
            await asyncio.sleep(0.01)
        assert len(set(publisher.published)) == 40
    finally:
        await relay.stop()
        await relaying
        replica.close()
