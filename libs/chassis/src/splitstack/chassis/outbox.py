"""Transactional outbox: commit state and the events announcing it together, publish them after.

A service adds each event to its own database in the transaction that changes its state
(`Outbox.add`); the commit makes both durable or neither. An `OutboxRelay` then publishes pending
rows to JetStream in id order and marks them published. A crash between commit and publish
leaves the row pending, so it is published later; a crash between publish and mark re-publishes
it, and JetStream drops the copy because the `Nats-Msg-Id` header (the event id) repeats within
the stream's duplicate window. Each event therefore lands in its stream exactly once.
Rows are published in id order within a batch; a failed publish ends the batch, so later rows
never overtake it. Events of transactions that commit out of id order (or of several relays)
carry no order between them; consumers are idempotent and must not assume one.

Several relays may run against one database. On PostgreSQL a relay claims its batch with
`SELECT ... FOR UPDATE SKIP LOCKED` inside a transaction that stays open across the publishes,
so replicas publish disjoint rows at the same time. SQLite has no row locks (SQLAlchemy renders
no FOR UPDATE there) and is only used embedded, with one relay per database file. There the relay
reads its batch in a short transaction, publishes outside any transaction, and marks the rows in
a second short one: a service that begins every transaction IMMEDIATE (one writer at a time)
must not be stalled by a slow or unreachable NATS. Should two relays read the same pending row,
both publish it with the same Nats-Msg-Id, the server keeps one copy and reports the other as a
duplicate, and both marks set the same column.

A row NATS refuses for a reason a retry cannot fix (a subject it rejects, a payload past its
max size, bytes that are not an envelope of the subject's contract message) is a poison row: after
`max_attempts` refusals it is moved to the `<outbox>_parked` table (the dead-letter table), counted,
announced on `deadletter.outbox-<producer>`, and the rows after it publish in order. Transient
failures (NATS down or restarting, a timeout, no JetStream answer) never park a row: the relay
backs off and retries, so nothing is lost while NATS is away. `Outbox.add` refuses such rows in
the first place (subject tokens, contract message, encoded size), so a client request that would
make one fails with INVALID_ARGUMENT and stores nothing; parking is the guard for rows written
before a rule existed or by a bug.

The database work is synchronous SQLAlchemy, run in `asyncio.to_thread`; one connection per
batch is used from those threads one call at a time.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from google.protobuf import message as pb_message
from prometheus_client import Counter, Gauge
from sqlalchemy import (
    BigInteger, Column, Connection, DateTime, Engine, Index, Integer, LargeBinary, MetaData, String,
    Table, Text, func, insert, select, update,
)
from sqlalchemy.orm import Session

from splitstack.chassis.faults import crash_point
from splitstack.chassis.outbox_parking import (PARKED, Refusal, dead_letter_envelope, is_refusal, park,
                                                parked_table)
from splitstack.contracts.envelope import unwrap, wrap
from splitstack.contracts.events import definition_for, stream_for, subject
from splitstack.contracts.limits import OutOfBounds, check_event_size

log = logging.getLogger(__name__)

LAST_ERROR_MAX_CHARS = 2000
DEFAULT_MAX_ATTEMPTS = 3          # refusals of a poison row before it is parked
SUBJECT_TOKEN = re.compile(r"[A-Za-z0-9_-]{1,128}")   # a concrete token: no space, dot or wildcard

PUBLISHED = Counter("splitstack_outbox_published",
                    "Outbox events published to JetStream (duplicates included)", ["outbox"])
DUPLICATES = Counter("splitstack_outbox_duplicates",
                     "Outbox publishes the server discarded as duplicates (re-publish after a crash)",
                     ["outbox"])
PUBLISH_FAILURES = Counter("splitstack_outbox_publish_failures",
                           "Outbox publishes that failed; the event stays pending", ["outbox"])
PENDING = Gauge("splitstack_outbox_pending", "Outbox events not yet published", ["outbox"])


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def outbox_table(metadata: MetaData, name: str = "outbox") -> Table:
    """The outbox table in a service's own metadata, so its migrations create it with the rest."""
    table = Table(
        name, metadata,
        Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True),
        Column("event_id", String(200), nullable=False, unique=True),
        Column("subject", String(255), nullable=False),
        Column("data", LargeBinary, nullable=False),           # serialized contracts Envelope
        Column("created_at", DateTime(timezone=True), nullable=False, default=_utcnow),
        Column("published_at", DateTime(timezone=True), nullable=True),
        Column("attempts", Integer, nullable=False, default=0, server_default="0"),
        Column("last_error", Text, nullable=True),
    )
    pending = table.c.published_at.is_(None)
    Index(f"ix_{name}_pending", table.c.id, postgresql_where=pending, sqlite_where=pending)
    parked_table(metadata, name)
    return table


class Outbox:
    """Adds events to the caller's transaction; the caller commits state and events together."""

    def __init__(self, table: Table, producer: str) -> None:
        self.table = table
        self.producer = producer

    def add(self, session: Session | Connection, subject: str, payload: pb_message.Message, *,
            event_id: str | None = None) -> str:
        """Add `payload` for `subject` in the open transaction of `session`; return its event id."""
        check_subject(subject, payload)
        envelope = wrap(payload, producer=self.producer, event_id=event_id)
        data = envelope.SerializeToString()
        check_event_size(subject, data)
        session.execute(insert(self.table).values(
            event_id=envelope.event_id, subject=subject, data=data, created_at=_utcnow(), attempts=0))
        return envelope.event_id


def check_subject(subject: str, payload: pb_message.Message) -> None:
    """ValueError unless `subject` is a contract subject stored in a stream and `payload` its type.

    Every token must be a plain token NATS accepts (no whitespace, wildcard or empty token): a
    name with a trailing newline would otherwise match the contract's `*` and be refused by NATS.
    """
    check_subject_tokens(subject)
    if stream_for(subject) is None:
        raise ValueError(f"subject {subject!r} is not stored by any contract stream; the outbox "
                         "only publishes JetStream subjects defined in splitstack.contracts")
    try:
        definition = definition_for(subject)
    except KeyError:
        raise ValueError(f"subject {subject!r} matches no contract subject pattern") from None
    if payload.DESCRIPTOR.full_name != definition.message:
        raise ValueError(f"subject {subject!r} carries {definition.message}, "
                         f"not {payload.DESCRIPTOR.full_name}")


def check_subject_tokens(subject: str) -> None:
    """OutOfBounds unless every dot-separated token of `subject` is a plain NATS token."""
    if len(subject) > 255 or not all(SUBJECT_TOKEN.fullmatch(token) for token in subject.split(".")):
        shown = subject if len(subject) <= 80 else subject[:77] + "..."
        raise OutOfBounds(f"subject {shown!r} is not a valid event subject: tokens of 1-128 characters "
                          "of A-Z, a-z, 0-9, '_' or '-', separated by dots")


def check_row(subject: str, data: bytes) -> None:
    """ValueError unless a stored row could ever be published: valid subject, size, envelope, type."""
    check_event_size(subject, data)
    check_subject(subject, unwrap(data).payload)


def pending_count(engine: Engine, table: Table) -> int:
    """How many events wait to be published (health checks, metrics)."""
    with engine.connect() as conn:
        return conn.execute(select(func.count()).where(table.c.published_at.is_(None))).scalar_one()


class Publisher(Protocol):
    """What the relay needs of `splitstack.chassis.bus.Bus`."""

    async def publish_raw(self, subject: str, data: bytes, *, event_id: str) -> Any: ...


class OutboxPublishError(RuntimeError):
    """A publish failed; earlier rows of the batch were marked published, this one stays pending."""

    def __init__(self, event_id: str, subject: str, published: int, cause: BaseException) -> None:
        super().__init__(f"publishing event {event_id} on {subject} failed after {published} "
                         f"published in this batch: {cause!r}")
        self.event_id = event_id
        self.published = published


@dataclass(frozen=True)
class _PendingEvent:
    id: int
    event_id: str
    subject: str
    data: bytes
    attempts: int
    created_at: dt.datetime


class OutboxRelay:
    """Publishes pending outbox rows in id order; many replicas may relay one database at once."""

    def __init__(self, engine: Engine, table: Table, bus: Publisher, *, batch_size: int = 100,
                 poll_interval: float = 0.5, max_backoff: float = 30.0,
                 max_attempts: int = DEFAULT_MAX_ATTEMPTS) -> None:
        if batch_size < 1 or poll_interval <= 0 or max_attempts < 1:
            raise ValueError("batch_size and max_attempts must be >= 1 and poll_interval > 0")
        self._engine, self._table, self._bus = engine, table, bus
        self._parked = parked_table(table.metadata, table.name)
        self._max_attempts = max_attempts
        producer = re.sub(r"[^A-Za-z0-9_-]", "-", str(getattr(bus, "producer", "service")))[:100]
        self._dead_letter_subject = subject("dead_letter", consumer=f"outbox-{producer}")
        self._batch_size, self._poll_interval, self._max_backoff = batch_size, poll_interval, max_backoff
        self._labels = {"outbox": table.name}
        self._holds_row_locks = engine.dialect.name == "postgresql"  # FOR UPDATE SKIP LOCKED
        self._wake = asyncio.Event()
        self._stopping = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task | None = None

    async def run(self) -> None:
        """Relay until `stop()`: a batch, then wait for `wake()` or the poll interval; back off on errors."""
        self._loop, self._task = asyncio.get_running_loop(), asyncio.current_task()
        failures = 0
        while not self._stopping.is_set():
            self._wake.clear()
            try:
                published = await self.relay_once()
                failures = 0
            except Exception as exc:  # a publish or database failure: rows stay pending, retry later
                failures += 1
                delay = min(self._max_backoff, self._poll_interval * 2 ** (failures - 1))
                log.warning("outbox %s: relay failed (%d in a row), retrying in %.1fs: %s",
                            self._table.name, failures, delay, exc)
                await self._sleep(delay, wakeable=False)
                continue
            if published < self._batch_size:
                await self._sleep(self._poll_interval, wakeable=True)

    async def run_until_cancelled(self, stop_timeout: float = 5.0) -> None:
        """`run()` as a service's background task: when cancelled, finish the batch in flight first."""
        running = asyncio.create_task(self.run(), name=f"outbox-relay-{self._table.name}")
        try:
            await asyncio.shield(running)
        except asyncio.CancelledError:
            await self.stop(stop_timeout)
            raise

    def wake(self) -> None:
        """Relay now instead of at the next poll; call after committing events (any thread)."""
        loop = self._loop
        if loop is None or _running_loop() is loop:
            self._wake.set()
        elif not loop.is_closed():
            loop.call_soon_threadsafe(self._wake.set)

    async def stop(self, timeout: float = 5.0) -> None:
        """Finish the batch in flight and end `run()`; cancel it if it outlasts `timeout`."""
        self._stopping.set()
        self._wake.set()
        task = self._task
        if task is None or task.done() or task is asyncio.current_task():
            return
        try:
            await asyncio.wait_for(asyncio.shield(task), timeout)
        except TimeoutError:
            log.warning("outbox %s: relay did not stop within %.1fs; cancelling", self._table.name, timeout)
            task.cancel()
            await asyncio.wait([task], timeout=timeout)

    async def relay_once(self) -> int:
        """Publish one batch of pending rows in id order and mark them; return how many.

        A row NATS refuses ends the batch (later rows never overtake it) until it has been refused
        `max_attempts` times; then it is parked and the batch goes on past it.
        """
        conn = await asyncio.to_thread(self._engine.connect)
        try:
            batch = await asyncio.to_thread(self._claim, conn)
            published: list[int] = []
            parked: list[Refusal] = []
            failure: tuple[_PendingEvent, BaseException] | None = None
            refused: Refusal | None = None
            for event in batch:
                try:
                    reason = await self._try_publish(event)
                except Exception as exc:  # transient: NATS away; the row stays pending, untouched
                    failure = (event, exc)
                    break
                if reason is None:
                    crash_point("outbox.after_publish")
                    published.append(event.id)
                    continue
                refusal = Refusal(event.id, event.event_id, event.subject, event.data, event.created_at,
                                  event.attempts + 1, reason)
                if refusal.attempts < self._max_attempts:
                    refused = refusal
                    break
                parked.append(refusal)
            await asyncio.to_thread(self._finish, conn, published, parked, failure, refused)
        finally:
            await asyncio.to_thread(conn.close)
        for refusal in parked:
            await self._announce_parked(refusal)
        if failure is not None:
            raise OutboxPublishError(failure[0].event_id, failure[0].subject, len(published), failure[1])
        return len(published)

    async def _try_publish(self, event: _PendingEvent) -> str | None:
        """Publish `event`; None when stored, else why NATS (or the contract) refuses it for good."""
        try:
            check_row(event.subject, event.data)
        except ValueError as exc:
            return f"refused before publishing: {exc}"
        try:
            await self._publish(event)
        except Exception as exc:
            if is_refusal(exc):
                return f"refused by NATS: {exc!r}"
            raise
        return None

    async def _publish(self, event: _PendingEvent) -> None:
        try:
            result = await self._bus.publish_raw(event.subject, event.data, event_id=event.event_id)
        except Exception:
            PUBLISH_FAILURES.labels(**self._labels).inc()
            raise
        PUBLISHED.labels(**self._labels).inc()
        if getattr(result, "duplicate", False):
            DUPLICATES.labels(**self._labels).inc()
            log.info("outbox %s: event %s was already in the stream", self._table.name, event.event_id)

    def _claim(self, conn: Connection) -> Sequence[_PendingEvent]:
        """Begin the batch transaction and lock up to batch_size pending rows no other relay holds."""
        t = self._table
        conn.begin()
        rows = conn.execute(
            select(t.c.id, t.c.event_id, t.c.subject, t.c.data, t.c.attempts, t.c.created_at)
            .where(t.c.published_at.is_(None)).order_by(t.c.id).limit(self._batch_size)
            .with_for_update(skip_locked=True)).all()
        if not self._holds_row_locks:
            conn.commit()  # no row locks to keep: never hold a database lock across the publishes
        return [_PendingEvent(r.id, r.event_id, r.subject, bytes(r.data), r.attempts or 0, r.created_at)
                for r in rows]

    def _finish(self, conn: Connection, published: list[int], parked: list[Refusal],
                failure: tuple[_PendingEvent, BaseException] | None, refused: Refusal | None) -> None:
        """Mark published rows, park poison rows, count a refusal or failure, commit, update the gauge."""
        t = self._table
        if published:
            conn.execute(update(t).where(t.c.id.in_(published)).values(published_at=_utcnow()))
        for refusal in parked:
            park(conn, t, self._parked, refusal)
        if refused is not None:
            self._record_attempt(conn, refused.row_id, refused.reason)
        if failure is not None:
            self._record_attempt(conn, failure[0].id, repr(failure[1]))
        conn.commit()
        pending = conn.execute(select(func.count()).where(t.c.published_at.is_(None))).scalar_one()
        conn.rollback()
        PENDING.labels(**self._labels).set(pending)

    def _record_attempt(self, conn: Connection, row_id: int, error: str) -> None:
        t = self._table
        conn.execute(update(t).where(t.c.id == row_id).values(
            attempts=t.c.attempts + 1, last_error=error[:LAST_ERROR_MAX_CHARS]))

    async def _announce_parked(self, refusal: Refusal) -> None:
        """Best effort: a DeadLetter event on deadletter.outbox-<producer> (the table keeps the row)."""
        producer = getattr(self._bus, "producer", "chassis")
        event_id, data = dead_letter_envelope(refusal, self._dead_letter_subject, self._table.name, producer)
        try:
            await self._bus.publish_raw(self._dead_letter_subject, data, event_id=event_id)
        except Exception as exc:  # noqa: BLE001  the parked row is the record; the event is a courtesy
            log.warning("outbox %s: announcing parked event %s failed: %r", self._table.name, refusal.event_id, exc)

    async def _sleep(self, delay: float, *, wakeable: bool) -> None:
        """Wait `delay` seconds, or less when stopping (or woken, if `wakeable`)."""
        waits = [asyncio.ensure_future(self._stopping.wait())]
        if wakeable:
            waits.append(asyncio.ensure_future(self._wake.wait()))
        try:
            await asyncio.wait(waits, timeout=delay, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waits:
                waiter.cancel()


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


__all__ = ["Outbox", "OutboxRelay", "OutboxPublishError", "check_row", "check_subject", "check_subject_tokens",
           "is_refusal", "outbox_table", "parked_table", "pending_count", "PARKED", "PUBLISHED", "DUPLICATES",
           "PUBLISH_FAILURES", "PENDING"]
