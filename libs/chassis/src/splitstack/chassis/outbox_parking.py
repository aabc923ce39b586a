"""The outbox's dead-letter side: which refusals are final, and where a poison row goes.

The relay (`splitstack.chassis.outbox.OutboxRelay`) counts how often NATS refuses a row for a
reason a retry cannot fix; past its bound the row moves here, whole, in the relay's transaction
(so it is in exactly one of the two tables), and a `DeadLetter` event announces it. NATS being
unreachable is never a refusal.
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass

import nats.errors
import nats.js.errors
from prometheus_client import Counter
from sqlalchemy import BigInteger, Column, Connection, DateTime, Integer, LargeBinary, MetaData, String, Table, Text
from sqlalchemy import delete, insert

from splitstack.contracts.envelope import wrap
from splitstack.events.v1 import events_pb2

log = logging.getLogger(__name__)

REASON_MAX_CHARS = 2000

PARKED = Counter("splitstack_outbox_parked",
                 "Poison outbox events moved to the dead-letter table after bounded refusals", ["outbox"])

PERMANENT_PUBLISH_ERRORS: tuple[type[BaseException], ...] = (
    nats.errors.BadSubjectError, nats.errors.MaxPayloadError, ValueError, TypeError, UnicodeError)


def parked_table(metadata: MetaData, outbox_name: str = "outbox") -> Table:
    """The dead-letter table of an outbox: poison rows, kept with why they were refused.

    `outbox_table` declares it in the same metadata, so services that create their schema from
    the metadata get it with the outbox; Alembic-managed services add it in a migration.
    """
    name = f"{outbox_name}_parked"
    if name in metadata.tables:
        return metadata.tables[name]
    return Table(
        name, metadata,
        Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True),  # the outbox row's id
        Column("event_id", String(200), nullable=False, unique=True),
        Column("subject", String(255), nullable=False),
        Column("data", LargeBinary, nullable=False),
        Column("created_at", DateTime(timezone=True), nullable=False),
        Column("parked_at", DateTime(timezone=True), nullable=False),
        Column("attempts", Integer, nullable=False),
        Column("reason", Text, nullable=False),
    )


def is_refusal(exc: BaseException) -> bool:
    """True when NATS refused the row itself (retrying cannot help), not when NATS was unreachable."""
    if isinstance(exc, nats.js.errors.ServiceUnavailableError):
        return False
    if isinstance(exc, nats.js.errors.BadRequestError):       # JetStream 400: e.g. a message too large
        return True
    return isinstance(exc, PERMANENT_PUBLISH_ERRORS)


@dataclass(frozen=True)
class Refusal:
    """An outbox row and the latest final refusal of it; `attempts` counts this one."""

    row_id: int
    event_id: str
    subject: str
    data: bytes
    created_at: dt.datetime | None
    attempts: int
    reason: str


def park(conn: Connection, outbox: Table, parked: Table, refusal: Refusal) -> None:
    """Move the refused row from `outbox` to `parked` in the caller's transaction."""
    conn.execute(insert(parked).values(
        id=refusal.row_id, event_id=refusal.event_id, subject=refusal.subject[:255], data=refusal.data,
        created_at=refusal.created_at or _utcnow(), parked_at=_utcnow(), attempts=refusal.attempts,
        reason=refusal.reason[:REASON_MAX_CHARS]))
    conn.execute(delete(outbox).where(outbox.c.id == refusal.row_id))
    PARKED.labels(outbox=outbox.name).inc()
    log.error("outbox %s: parked event %s (%r) after %d refusals: %s", outbox.name, refusal.event_id,
              refusal.subject[:120], refusal.attempts, refusal.reason)


def dead_letter_envelope(refusal: Refusal, dead_letter_subject: str, outbox_name: str,
                         producer: str) -> tuple[str, bytes]:
    """(event id, envelope bytes) of the DeadLetter event announcing a parked row."""
    letter = events_pb2.DeadLetter(
        consumer=dead_letter_subject.split(".", 1)[1], stream=outbox_name, subject=refusal.subject[:255],
        event_id=refusal.event_id, stream_sequence=refusal.row_id, deliveries=refusal.attempts,
        error=refusal.reason[:REASON_MAX_CHARS])
    letter.at.GetCurrentTime()
    envelope = wrap(letter, producer=producer, event_id=f"deadletter-{outbox_name}-{refusal.event_id}")
    return envelope.event_id, envelope.SerializeToString()


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


__all__ = ["PARKED", "Refusal", "dead_letter_envelope", "is_refusal", "park", "parked_table"]
