"""Persistence: the converter's own database of conversions, and its outbox.

One row per (model, version, target) holds the `Conversion` record (state, stage, candidates,
serving choice, error, times) plus the columns that coordinate replicas: `owner` and
`lease_until` (a claim that is renewed while the conversion runs), `attempts`, the event that
triggered the last attempt, and a `revision` that grows with every change (WatchConversion polls
it, so progress made by any replica sharing the database is seen). Claims are compare-and-set
inside one write transaction: on SQLite every write transaction begins IMMEDIATE (one writer at
a time, others wait up to the busy timeout); on PostgreSQL the row is locked FOR UPDATE. State
changes and the events announcing them (conversion.requested, conversion.failed) commit together
through the chassis outbox.

Everything here is synchronous SQLAlchemy Core; the core calls it through asyncio.to_thread.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from google.protobuf.message import Message
from sqlalchemy import (BigInteger, Column, Connection, DateTime, Engine, Index, Integer, LargeBinary, MetaData,
                        String, Table, Text, insert, select, tuple_, update)
from sqlalchemy.exc import IntegrityError

from splitstack.chassis.outbox import Outbox, outbox_table
from splitstack.converter.v1 import converter_pb2 as pb

TERMINAL = (pb.SUCCEEDED, pb.FAILED)

metadata = MetaData()
conversions = Table(
    "conversions", metadata,
    Column("id", String(200), primary_key=True),             # <model>.<version>.<target>
    Column("model", String(63), nullable=False),
    Column("version", BigInteger, nullable=False),
    Column("target", String(63), nullable=False),
    Column("state", Integer, nullable=False),
    Column("owner", String(200), nullable=False, default=""),
    Column("lease_until", DateTime(timezone=True), nullable=True),
    Column("attempts", Integer, nullable=False, default=0),
    Column("trigger_event_id", String(200), nullable=False, default=""),
    Column("revision", BigInteger, nullable=False, default=1),
    Column("record", LargeBinary, nullable=False),           # serialized converter.v1.Conversion
    Column("error", Text, nullable=False, default=""),
)
Index("ix_conversions_listing", conversions.c.target, conversions.c.model, conversions.c.version)
outbox = outbox_table(metadata)


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def conversion_id(model: str, version: int, target: str) -> str:
    return f"{model}.{version}.{target}"


def _aware(value: dt.datetime | None) -> dt.datetime | None:
    """SQLite returns naive datetimes; every stored time is UTC."""
    if value is None or value.tzinfo is not None:
        return value
    return value.replace(tzinfo=dt.timezone.utc)


@dataclass(frozen=True)
class Stored:
    """A conversion row: the record and the coordination columns."""

    record: pb.Conversion
    owner: str
    lease_until: dt.datetime | None
    attempts: int
    trigger_event_id: str
    revision: int

    def held_by_other(self, owner: str, now: dt.datetime) -> bool:
        return (self.record.state == pb.RUNNING and self.owner != owner and self.lease_until is not None
                and self.lease_until > now)


@dataclass(frozen=True)
class Claim:
    """The outcome of trying to claim a conversion: `claimed`, `done` (nothing to do) or `busy`."""

    outcome: str
    stored: Stored
    attempt: int = 0


def _stored(row: Any) -> Stored:
    record = pb.Conversion()
    record.ParseFromString(row.record)
    return Stored(record, row.owner, _aware(row.lease_until), row.attempts, row.trigger_event_id, row.revision)


class ConversionStore:
    """Conversion rows and outbox events of one converter pool's database."""

    def __init__(self, engine: Engine, outbox_writer: Outbox) -> None:
        self.engine = engine
        self.outbox = outbox_writer

    def create_schema(self) -> None:
        metadata.create_all(self.engine)

    # -- reads
    def get(self, cid: str) -> Stored | None:
        with self.engine.connect() as conn:
            row = conn.execute(select(conversions).where(conversions.c.id == cid)).first()
            conn.rollback()
        return None if row is None else _stored(row)

    def page(self, model: str, target: str, after: tuple[str, str, int] | None, limit: int) -> list[pb.Conversion]:
        """Conversions ordered by (target, model, version), after the key `after`."""
        c = conversions.c
        query = select(conversions).order_by(c.target, c.model, c.version).limit(limit)
        if model:
            query = query.where(c.model == model)
        if target:
            query = query.where(c.target == target)
        if after is not None:
            query = query.where(tuple_(c.target, c.model, c.version) > tuple_(*after))
        with self.engine.connect() as conn:
            rows = conn.execute(query).all()
            conn.rollback()
        return [_stored(r).record for r in rows]

    # -- writes
    def _write(self, fn: Callable[[Connection], Any]) -> Any:
        """Run `fn` in one write transaction; rerun it once if it lost an insert race."""
        for attempt in (1, 2):
            try:
                with self.engine.begin() as conn:
                    return fn(conn)
            except IntegrityError:
                if attempt == 2:
                    raise
        return None

    @staticmethod
    def _locked(conn: Connection, cid: str) -> Stored | None:
        row = conn.execute(select(conversions).where(conversions.c.id == cid).with_for_update()).first()
        return None if row is None else _stored(row)

    @staticmethod
    def _insert(conn: Connection, record: pb.Conversion, **columns: Any) -> None:
        conn.execute(insert(conversions).values(
            id=record.id, model=record.model, version=record.version, target=record.target, state=record.state,
            record=record.SerializeToString(), error=record.error, revision=1,
            **{"owner": "", "attempts": 0, "trigger_event_id": "", "lease_until": None, **columns}))

    @staticmethod
    def _save(conn: Connection, stored: Stored, record: pb.Conversion, **columns: Any) -> None:
        conn.execute(update(conversions).where(conversions.c.id == record.id).values(
            state=record.state, record=record.SerializeToString(), error=record.error,
            revision=stored.revision + 1, **columns))

    def request(self, record: pb.Conversion, now: dt.datetime, add_event: Callable[[Connection], None]) -> pb.Conversion:
        """Mark a conversion REQUESTED and add its request event, unless it succeeded or runs under a
        live claim (then the stored record is returned and no event is added)."""

        def write(conn: Connection) -> pb.Conversion:
            stored = self._locked(conn, record.id)
            if stored is not None and (stored.record.state == pb.SUCCEEDED or stored.held_by_other("", now)):
                return stored.record
            fresh = pb.Conversion(id=record.id, model=record.model, version=record.version, target=record.target,
                                  state=pb.REQUESTED, tolerance=record.tolerance)
            fresh.requested_at.FromDatetime(now)
            if stored is None:
                self._insert(conn, fresh)
            else:
                self._save(conn, stored, fresh, lease_until=None)
            add_event(conn)
            return fresh

        return self._write(write)

    def add_event(self, add_event: Callable[[Connection], None]) -> None:
        """Commit an event alone (a request for a target another pool serves)."""
        self._write(add_event)

    def claim(self, record: pb.Conversion, owner: str, event_id: str, explicit: bool, now: dt.datetime,
              lease: dt.timedelta) -> Claim:
        """Take the conversion for `owner` unless it is done or another owner's claim is still live.

        Done: SUCCEEDED; or FAILED when the trigger is not an explicit request (model.registered is
        converted once) or is the very event that failed. Otherwise (new, REQUESTED, FAILED and
        explicitly requested again, RUNNING under an expired or own claim) the caller gets it.
        """

        def write(conn: Connection) -> Claim:
            stored = self._locked(conn, record.id)
            if stored is not None:
                state = stored.record.state
                if state == pb.SUCCEEDED or (state == pb.FAILED and (not explicit or stored.trigger_event_id == event_id)):
                    return Claim("done", stored)
                if stored.held_by_other(owner, now):
                    return Claim("busy", stored)
            running = pb.Conversion(id=record.id, model=record.model, version=record.version, target=record.target,
                                    state=pb.RUNNING, stage="fetch", tolerance=record.tolerance)
            if stored is not None and stored.record.HasField("requested_at"):
                running.requested_at.CopyFrom(stored.record.requested_at)
            else:
                running.requested_at.FromDatetime(now)
            running.started_at.FromDatetime(now)
            attempt = (stored.attempts if stored else 0) + 1
            columns = dict(owner=owner, lease_until=now + lease, attempts=attempt, trigger_event_id=event_id)
            if stored is None:
                self._insert(conn, running, **columns)
            else:
                self._save(conn, stored, running, **columns)
            revision = stored.revision + 1 if stored else 1
            return Claim("claimed", Stored(running, owner, now + lease, attempt, event_id, revision), attempt)

        return self._write(write)

    def _owned(self, cid: str, owner: str, attempt: int,
               change: Callable[[Connection, Stored], None]) -> bool:
        """Apply `change` if `owner` still holds attempt `attempt`; False when the claim was lost."""

        def write(conn: Connection) -> bool:
            stored = self._locked(conn, cid)
            if stored is None or stored.owner != owner or stored.attempts != attempt or stored.record.state != pb.RUNNING:
                return False
            change(conn, stored)
            return True

        return self._write(write)

    def renew(self, cid: str, owner: str, attempt: int, until: dt.datetime) -> bool:
        """Extend a live claim (no revision change: watchers see progress, not heartbeats)."""
        return self._owned(cid, owner, attempt, lambda conn, _: conn.execute(
            update(conversions).where(conversions.c.id == cid).values(lease_until=until)))

    def progress(self, cid: str, owner: str, attempt: int, mutate: Callable[[pb.Conversion], None]) -> bool:
        """Change the record of a running conversion (stage, tolerance, candidates)."""

        def change(conn: Connection, stored: Stored) -> None:
            record = pb.Conversion()
            record.CopyFrom(stored.record)
            mutate(record)
            self._save(conn, stored, record)

        return self._owned(cid, owner, attempt, change)

    def release(self, cid: str, owner: str, attempt: int, now: dt.datetime) -> bool:
        """Give a claim up early (transient failure, shutdown): any replica may take it at once."""
        return self._owned(cid, owner, attempt, lambda conn, _: conn.execute(
            update(conversions).where(conversions.c.id == cid).values(lease_until=now)))

    def finish(self, record: pb.Conversion, now: dt.datetime, add_event: Callable[[Connection], None] | None = None,
               owner: str = "", attempt: int = 0) -> pb.Conversion:
        """Store a terminal record (SUCCEEDED or FAILED) with its event, whoever held the claim.

        With `owner`, only while that owner still holds `attempt` (else the stored record is returned).
        """
        if record.state not in TERMINAL:
            raise ValueError("finish() stores SUCCEEDED or FAILED records only")

        def write(conn: Connection) -> pb.Conversion:
            stored = self._locked(conn, record.id)
            if owner and (stored is None or stored.owner != owner or stored.attempts != attempt):
                return stored.record if stored else record
            final = pb.Conversion()
            final.CopyFrom(record)
            final.finished_at.FromDatetime(now)
            if stored is None:
                final.requested_at.FromDatetime(now)
                self._insert(conn, final)
            else:
                if not final.HasField("requested_at"):
                    final.requested_at.CopyFrom(stored.record.requested_at)
                self._save(conn, stored, final, lease_until=None)
            if add_event is not None:
                add_event(conn)
            return final

        return self._write(write)

    def event_adder(self, subject: str, payload: Message, event_id: str | None = None) -> Callable[[Connection], None]:
        """A callback adding one outbox event to the caller's transaction."""
        return lambda conn: self.outbox.add(conn, subject, payload, event_id=event_id)


__all__ = ["Claim", "ConversionStore", "Stored", "conversion_id", "conversions", "metadata",
           "outbox", "utcnow"]
