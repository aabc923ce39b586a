"""Persistence: the engine, transactions, and every read and write of the registry's tables.

`Store.write(fn)` runs `fn(tx)` in one write transaction and commits; state and the outbox rows
announcing it (`tx.add_event`) therefore commit together. On PostgreSQL the rows that order
concurrent writers are locked with SELECT ... FOR UPDATE (`lock=True`): the model row while a
version number is taken, an alias moves, a version is finalized or gains a serving choice (the
promotion policy's decision), the dataset row while a dataset version is numbered, the version row
while it is finalized or gains artifacts and serving choices (always after its model's row). On
SQLite every write transaction begins IMMEDIATE (one writer at a time, waiting up to the busy
timeout), so concurrent requests of one process queue instead of failing with "database is locked".
Unique constraints back every rule that races could break; a write that loses such a race
raises IntegrityError and `write` runs `fn` again, which then finds the winner's row.

Everything here is synchronous SQLAlchemy Core; the core calls it from its own database threads.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from google.protobuf import message as pb_message
from sqlalchemy import Connection, Engine, Row, delete, func, insert, select, text, update
from sqlalchemy.exc import IntegrityError

from splitstack.chassis.db import READ_ONLY_OPTION
from splitstack.chassis.db import open_engine as open_chassis_engine
from splitstack.chassis.outbox import Outbox
from splitstack.registry.v1 import registry_pb2 as pb
from splitstack_registry import records, tables as t

log = logging.getLogger(__name__)

T = TypeVar("T")
WRITE_ATTEMPTS = 3
BLOB_LOCK_SPACE = 0x5EB10B      # first key of the registry's blob advisory locks (PostgreSQL)


def open_engine(url: str) -> Engine:
    """The registry's engine (chassis defaults, foreign keys enforced on SQLite too)."""
    return open_chassis_engine(url, foreign_keys=True)


class Store:
    """Transactions over the registry's tables; the outbox rows go into the same transactions."""

    def __init__(self, engine: Engine, outbox: Outbox) -> None:
        self.engine = engine
        self.outbox = outbox

    def write(self, fn: Callable[[Tx], T]) -> T:
        """Run `fn(tx)` in a write transaction and commit; rerun it when it lost a uniqueness race."""
        for attempt in range(1, WRITE_ATTEMPTS + 1):
            try:
                with self.engine.begin() as conn:
                    return fn(Tx(conn, self.outbox))
            except IntegrityError as exc:
                if attempt == WRITE_ATTEMPTS:
                    raise
                log.info("write lost a race (%s); reading again", str(exc.orig).splitlines()[0])
        raise AssertionError("unreachable")

    def read(self, fn: Callable[[Tx], T]) -> T:
        """Run `fn(tx)` in a read-only transaction (one consistent view on PostgreSQL and SQLite)."""
        with self.engine.connect() as conn:
            options = {READ_ONLY_OPTION: True}
            if conn.dialect.name == "postgresql":  # one snapshot for every statement of the read
                options["isolation_level"] = "REPEATABLE READ"
            conn.execution_options(**options)
            with conn.begin():
                return fn(Tx(conn, self.outbox))


class Tx:
    """One open transaction: reads, writes and outbox events of the registry."""

    def __init__(self, conn: Connection, outbox: Outbox) -> None:
        self.conn = conn
        self._outbox = outbox
        self.events: list[str] = []

    def _one(self, query: Any, lock: bool = False) -> Row | None:
        if lock:
            query = query.with_for_update()
        return self.conn.execute(query).first()

    def _all(self, query: Any) -> Sequence[Row]:
        return self.conn.execute(query).all()

    def _insert(self, table: Any, **values: Any) -> int:
        result = self.conn.execute(insert(table).values(**values))
        return result.inserted_primary_key[0] if result.inserted_primary_key else 0

    # ---- events -------------------------------------------------------------------------------

    def add_event(self, subject: str, payload: pb_message.Message, event_id: str) -> None:
        """Add an event to this transaction's outbox (published by the relay after commit)."""
        self.events.append(self._outbox.add(self.conn, subject, payload, event_id=event_id))

    # ---- models -------------------------------------------------------------------------------

    def model_row(self, name: str, *, lock: bool = False) -> Row | None:
        return self._one(select(t.models).where(t.models.c.name == name), lock)

    def insert_model(self, **values: Any) -> None:
        self._insert(t.models, **values)

    def set_policy(self, name: str, policy: bytes, actor: str) -> None:
        self.conn.execute(update(t.models).where(t.models.c.name == name).values(
            policy=policy, policy_actor=actor, policy_updated_at=records.utcnow()))

    def take_model_version(self, name: str) -> int:
        """The model's next version number (call with the model row locked)."""
        self.conn.execute(update(t.models).where(t.models.c.name == name)
                          .values(last_version=t.models.c.last_version + 1))
        return self.conn.execute(select(t.models.c.last_version).where(t.models.c.name == name)).scalar_one()

    def model_rows(self, after: str, limit: int) -> Sequence[Row]:
        return self._all(select(t.models).where(t.models.c.name > after).order_by(t.models.c.name).limit(limit))

    # ---- versions -----------------------------------------------------------------------------

    def version_row(self, model: str, version: int, *, lock: bool = False) -> Row | None:
        v = t.versions
        return self._one(select(v).where(v.c.model == model, v.c.version == version), lock)

    def version_row_by_key(self, model: str, key: str) -> Row | None:
        v = t.versions
        return self._one(select(v).where(v.c.model == model, v.c.idempotency_key == key))

    def insert_version(self, **values: Any) -> int:
        return self._insert(t.versions, **values)

    def mark_ready(self, version_id: int) -> None:
        self.conn.execute(update(t.versions).where(t.versions.c.id == version_id)
                          .values(state=pb.READY, finalized_at=records.utcnow()))

    def set_promotion(self, version_id: int, decision: bytes) -> None:
        """Store the promotion decision of a version (made once, under the model row's lock)."""
        self.conn.execute(update(t.versions).where(t.versions.c.id == version_id).values(promotion=decision))

    def version_rows(self, model: str, after: int, limit: int) -> Sequence[Row]:
        v = t.versions
        return self._all(select(v).where(v.c.model == model, v.c.version > after).order_by(v.c.version).limit(limit))

    def version_record(self, row: Row) -> pb.ModelVersion:
        """The full ModelVersion of a `versions` row: artifacts and serving choices included."""
        by_id = self._artifacts_by_id(row)
        return records.version_record(row, by_id.values(), self._serving_choices(row, by_id))

    # ---- artifacts ----------------------------------------------------------------------------

    def artifact_rows(self, version_id: int) -> Sequence[Row]:
        a = t.artifacts
        return self._all(select(a).where(a.c.version_id == version_id).order_by(a.c.id))

    def artifact_row_by_key(self, version_id: int, kind: int, precision: int, target: str) -> Row | None:
        a = t.artifacts
        return self._one(select(a).where(a.c.version_id == version_id, a.c.kind == kind,
                                         a.c.precision == precision, a.c.target == target))

    def insert_artifact(self, **values: Any) -> int:
        return self._insert(t.artifacts, **values)

    def artifacts(self, version: Row) -> list[pb.Artifact]:
        """The artifacts of a `versions` row, in upload order."""
        return list(self._artifacts_by_id(version).values())

    def _artifacts_by_id(self, version: Row) -> dict[int, pb.Artifact]:
        return {r.id: records.artifact_record(r, version.model, version.version)
                for r in self.artifact_rows(version.id)}

    def artifact_by_sha256(self, sha256: str) -> pb.Artifact | None:
        """The first artifact stored with this digest (any model), or None."""
        a, v = t.artifacts, t.versions
        row = self._one(select(a, v.c.model, v.c.version.label("model_version")).join(v, a.c.version_id == v.c.id)
                        .where(a.c.sha256 == sha256).order_by(a.c.id).limit(1))
        return None if row is None else records.artifact_record(row, row.model, row.model_version)

    # ---- serving choices ----------------------------------------------------------------------

    def serving_choice_row(self, version_id: int, target: str) -> Row | None:
        s = t.serving_choices
        return self._one(select(s).where(s.c.version_id == version_id, s.c.target == target))

    def insert_serving_choice(self, **values: Any) -> int:
        return self._insert(t.serving_choices, **values)

    def choice_targets(self, version_id: int) -> set[str]:
        """The targets a version has serving choices for."""
        s = t.serving_choices
        return set(self.conn.execute(select(s.c.target).where(s.c.version_id == version_id)).scalars())

    def serving_choices(self, version: Row) -> list[pb.ServingChoice]:
        """The serving choices of a `versions` row, ordered by target."""
        return self._serving_choices(version, self._artifacts_by_id(version))

    def _serving_choices(self, version: Row, artifacts: dict[int, pb.Artifact]) -> list[pb.ServingChoice]:
        s = t.serving_choices
        rows = self._all(select(s).where(s.c.version_id == version.id).order_by(s.c.target))
        return [records.serving_choice_record(r, artifacts[r.artifact_id]) for r in rows]

    # ---- datasets -----------------------------------------------------------------------------

    def dataset_row(self, name: str, *, lock: bool = False) -> Row | None:
        return self._one(select(t.datasets).where(t.datasets.c.name == name), lock)

    def insert_dataset(self, **values: Any) -> None:
        self._insert(t.datasets, **values)

    def take_dataset_version(self, name: str) -> int:
        """The dataset's next version number (call with the dataset row locked)."""
        d = t.datasets
        self.conn.execute(update(d).where(d.c.name == name).values(last_version=d.c.last_version + 1))
        return self.conn.execute(select(d.c.last_version).where(d.c.name == name)).scalar_one()

    def dataset_rows(self, after: str, limit: int) -> Sequence[Row]:
        d = t.datasets
        return self._all(select(d).where(d.c.name > after).order_by(d.c.name).limit(limit))

    def dataset_version_row(self, dataset: str, version: int) -> Row | None:
        """Version `version` of `dataset`, or its latest when `version` is 0."""
        dv = t.dataset_versions
        query = select(dv).where(dv.c.dataset == dataset)
        if version:
            return self._one(query.where(dv.c.version == version))
        return self._one(query.order_by(dv.c.version.desc()).limit(1))

    def dataset_version_row_by_key(self, dataset: str, key: str) -> Row | None:
        dv = t.dataset_versions
        return self._one(select(dv).where(dv.c.dataset == dataset, dv.c.idempotency_key == key))

    def insert_dataset_version(self, **values: Any) -> None:
        self._insert(t.dataset_versions, **values)

    def dataset_version_rows(self, dataset: str, after: int, limit: int) -> Sequence[Row]:
        dv = t.dataset_versions
        return self._all(select(dv).where(dv.c.dataset == dataset, dv.c.version > after)
                         .order_by(dv.c.version).limit(limit))

    # ---- aliases ------------------------------------------------------------------------------

    def alias_row(self, model: str, alias: str) -> Row | None:
        a = t.aliases
        return self._one(select(a).where(a.c.model == model, a.c.alias == alias))

    def alias_rows(self, model: str, version: int = 0) -> Sequence[Row]:
        """The aliases of a model (only those pointing at `version`, when given), by name."""
        a = t.aliases
        query = select(a).where(a.c.model == model)
        if version:
            query = query.where(a.c.version == version)
        return self._all(query.order_by(a.c.alias))

    def put_alias(self, model: str, alias: str, version: int, actor: str, reason: str, exists: bool) -> None:
        a, now = t.aliases, records.utcnow()
        values = dict(version=version, actor=actor, reason=reason, updated_at=now)
        if exists:
            self.conn.execute(update(a).where(a.c.model == model, a.c.alias == alias).values(**values))
        else:
            self._insert(a, model=model, alias=alias, **values)

    def delete_alias(self, model: str, alias: str) -> None:
        a = t.aliases
        self.conn.execute(delete(a).where(a.c.model == model, a.c.alias == alias))

    def insert_move(self, **values: Any) -> Row:
        move_id = self._insert(t.alias_moves, at=records.utcnow(), **values)
        return self._one(select(t.alias_moves).where(t.alias_moves.c.id == move_id))

    def move_rows(self, model: str, alias: str = "") -> Sequence[Row]:
        m = t.alias_moves
        query = select(m).where(m.c.model == model)
        if alias:
            query = query.where(m.c.alias == alias)
        return self._all(query.order_by(m.c.id))

    # ---- blobs --------------------------------------------------------------------------------

    def lock_blob(self, sha256: str) -> None:
        """Hold blob `sha256` for this transaction: a row that starts referencing it and the orphan sweeper
        deciding to delete it never interleave. PostgreSQL: a transaction-scoped advisory lock; SQLite:
        every write transaction already holds the one write lock."""
        if self.conn.dialect.name == "postgresql":
            self.conn.execute(text("SELECT pg_advisory_xact_lock(:space, :key)"),
                              {"space": BLOB_LOCK_SPACE, "key": int(sha256[:7], 16)})

    def referenced_blobs(self, digests: Sequence[str]) -> set[str]:
        """Those of `digests` that an artifact or a dataset version references."""
        a, dv = t.artifacts, t.dataset_versions
        found = set(self.conn.execute(select(a.c.sha256).where(a.c.sha256.in_(digests))).scalars())
        found.update(self.conn.execute(select(dv.c.sha256).where(dv.c.sha256.in_(digests))).scalars())
        return found

    def count(self, table: Any) -> int:
        """Rows in `table` (tests and health)."""
        return self.conn.execute(select(func.count()).select_from(table)).scalar_one()
