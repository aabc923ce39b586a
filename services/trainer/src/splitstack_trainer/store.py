"""Persistence: jobs, retraining policies, pending retraining triggers, and the outbox.

A job row holds the spec as submitted, the resolved JobConfig (JSON), state, attempts, the
executor's handle (local pids, or the Kubernetes Job's name), the latest progress, the
registered version, metrics and error; `revision` grows with every change (WatchJob compares
it). Unique columns back the idempotency rules: `idempotency_key` (a retried submit) and
`trigger_key` (model + dataset digest + config: one retraining job per key, however often the
event arrives). A terminal state and the `training.finished` event announcing it commit
together through the chassis outbox. `job_attempts` keeps one row per start of a job's ranks: when
it started and ended, why it ended, whether that was transient and whether it was retried.

On SQLite every write transaction begins IMMEDIATE (one writer at a time, others wait up to the
busy timeout). Everything here is synchronous SQLAlchemy Core; `Database` runs it in threads of its
own (a writer waiting for SQLite's lock never takes the default pool's last thread from the outbox
relay), and wakes the relay after a commit that added events.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any, TypeVar

from google.protobuf.message import Message
from sqlalchemy import (BigInteger, Boolean, Column, Connection, DateTime, Engine, Index, Integer, LargeBinary,
                        MetaData, String, Table, Text, and_, delete, func, insert, or_, select, update)
from sqlalchemy.engine import Row
from sqlalchemy.exc import OperationalError

from splitstack.chassis.db import READ_ONLY_OPTION
from splitstack.chassis.errors import Unavailable
from splitstack.chassis.outbox import Outbox, outbox_table
from splitstack.trainer.v1 import trainer_pb2 as pb

T = TypeVar("T")
ACTIVE = (pb.QUEUED, pb.RUNNING)
TERMINAL = (pb.SUCCEEDED, pb.FAILED, pb.CANCELLED)

metadata = MetaData()
jobs = Table(
    "jobs", metadata,
    Column("id", String(64), primary_key=True),
    Column("model", String(63), nullable=False),
    Column("state", Integer, nullable=False),
    Column("executor", String(32), nullable=False),
    Column("idempotency_key", String(255), nullable=True, unique=True),
    Column("trigger_key", String(64), nullable=True, unique=True),
    Column("retrain_policy", String(63), nullable=False, default=""),
    Column("spec", LargeBinary, nullable=False),              # trainer.v1.JobSpec as submitted
    Column("config", Text, nullable=False),                   # JobConfig JSON
    Column("progress", LargeBinary, nullable=True),           # trainer.v1.Progress, the latest
    Column("model_version", BigInteger, nullable=False, default=0),
    Column("error", Text, nullable=False, default=""),
    Column("attempts", Integer, nullable=False, default=0),
    Column("handle", Text, nullable=False, default=""),       # the executor's handle (JSON)
    Column("metrics", Text, nullable=False, default="{}"),
    Column("cancel_reason", Text, nullable=True),
    Column("revision", BigInteger, nullable=False, default=1),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("started_at", DateTime(timezone=True), nullable=True),
    Column("finished_at", DateTime(timezone=True), nullable=True),
)
Index("ix_jobs_state", jobs.c.state, jobs.c.created_at)
Index("ix_jobs_listing", jobs.c.created_at, jobs.c.id)
policies = Table(
    "retrain_policies", metadata,
    Column("name", String(63), primary_key=True),
    Column("model", String(63), nullable=False),
    Column("dataset", String(63), nullable=False, index=True),
    Column("record", LargeBinary, nullable=False),            # trainer.v1.RetrainPolicy
    Column("last_started_at", DateTime(timezone=True), nullable=True),
    Column("last_dataset_version", BigInteger, nullable=False, default=0),
)
triggers = Table(
    "retrain_triggers", metadata,
    Column("policy", String(63), primary_key=True),           # at most one pending trigger per policy
    Column("dataset", String(63), nullable=False),
    Column("dataset_version", BigInteger, nullable=False),
    Column("dataset_sha256", String(64), nullable=False),
    Column("trigger_key", String(64), nullable=False),
    Column("event_id", String(200), nullable=False),
    Column("first_seen_at", DateTime(timezone=True), nullable=False),
    Column("due_at", DateTime(timezone=True), nullable=False, index=True),
)
attempts = Table(
    "job_attempts", metadata,
    Column("job_id", String(64), primary_key=True),
    Column("number", Integer, primary_key=True),              # 1, 2, ... (jobs.attempts is the latest)
    Column("started_at", DateTime(timezone=True), nullable=False),
    Column("ended_at", DateTime(timezone=True), nullable=True),
    Column("error", Text, nullable=False, default=""),
    Column("transient", Boolean, nullable=False, default=False),
    Column("retried", Boolean, nullable=False, default=False),
)
outbox = outbox_table(metadata)


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def aware(value: dt.datetime | None) -> dt.datetime | None:
    """SQLite returns naive datetimes; every stored time is UTC."""
    if value is None or value.tzinfo is not None:
        return value
    return value.replace(tzinfo=dt.timezone.utc)


class Store:
    """Transactions over the trainer's tables; outbox rows go into the same transactions."""

    def __init__(self, engine: Engine, outbox_writer: Outbox) -> None:
        self.engine = engine
        self.outbox = outbox_writer

    def create_schema(self) -> None:
        metadata.create_all(self.engine)

    def write(self, fn: Callable[[Tx], T]) -> T:
        with self.engine.begin() as conn:
            return fn(Tx(conn, self.outbox))

    def read(self, fn: Callable[[Tx], T]) -> T:
        with self.engine.connect() as conn:
            options: dict[str, Any] = {READ_ONLY_OPTION: True}
            if conn.dialect.name == "postgresql":
                options["isolation_level"] = "REPEATABLE READ"
            conn.execution_options(**options)
            with conn.begin():
                return fn(Tx(conn, self.outbox))


class Tx:
    """One open transaction."""

    def __init__(self, conn: Connection, outbox_writer: Outbox) -> None:
        self.conn = conn
        self._outbox = outbox_writer
        self.events = 0

    def add_event(self, subject: str, payload: Message, event_id: str) -> None:
        self._outbox.add(self.conn, subject, payload, event_id=event_id)
        self.events += 1

    def _one(self, query: Any, lock: bool = False) -> Row | None:
        return self.conn.execute(query.with_for_update() if lock else query).first()

    # ---- jobs -----------------------------------------------------------------------------------

    def insert_job(self, **values: Any) -> None:
        self.conn.execute(insert(jobs).values(revision=1, **values))

    def job(self, job_id: str, *, lock: bool = False) -> Row | None:
        return self._one(select(jobs).where(jobs.c.id == job_id), lock)

    def job_by_idempotency_key(self, key: str) -> Row | None:
        return self._one(select(jobs).where(jobs.c.idempotency_key == key))

    def job_by_trigger_key(self, key: str) -> Row | None:
        return self._one(select(jobs).where(jobs.c.trigger_key == key))

    def update_job(self, job_id: str, **values: Any) -> None:
        self.conn.execute(update(jobs).where(jobs.c.id == job_id).values(revision=jobs.c.revision + 1, **values))

    def jobs_in(self, states: Sequence[int], executor: str = "", limit: int = 1000) -> Sequence[Row]:
        query = select(jobs).where(jobs.c.state.in_(states))
        if executor:
            query = query.where(jobs.c.executor == executor)
        return self.conn.execute(query.order_by(jobs.c.created_at, jobs.c.id).limit(limit)).all()

    def job_page(self, model: str, state: int, after: tuple[dt.datetime, str] | None, limit: int) -> Sequence[Row]:
        query = select(jobs)
        if model:
            query = query.where(jobs.c.model == model)
        if state:
            query = query.where(jobs.c.state == state)
        if after is not None:
            at, job_id = after
            query = query.where(or_(jobs.c.created_at > at, and_(jobs.c.created_at == at, jobs.c.id > job_id)))
        return self.conn.execute(query.order_by(jobs.c.created_at, jobs.c.id).limit(limit)).all()

    def active_jobs_of_policy(self, policy: str) -> int:
        query = select(func.count()).select_from(jobs).where(jobs.c.retrain_policy == policy,
                                                             jobs.c.state.in_(ACTIVE))
        return self.conn.execute(query).scalar_one()

    # ---- attempts -------------------------------------------------------------------------------

    def begin_attempt(self, job_id: str, number: int) -> None:
        self.conn.execute(insert(attempts).values(job_id=job_id, number=number, started_at=utcnow(), error="",
                                                  transient=False, retried=False))

    def end_attempt(self, job_id: str, number: int, *, error: str = "", transient: bool = False,
                    retried: bool = False) -> None:
        """Close attempt `number` (a no-op for one already closed, or never recorded)."""
        self.conn.execute(update(attempts).where(attempts.c.job_id == job_id, attempts.c.number == number,
                                                 attempts.c.ended_at.is_(None))
                          .values(ended_at=utcnow(), error=error, transient=transient, retried=retried))

    def attempts_of(self, job_ids: Sequence[str]) -> dict[str, list[Row]]:
        """Every recorded attempt of each job, oldest first."""
        found: dict[str, list[Row]] = {job_id: [] for job_id in job_ids}
        if job_ids:
            query = select(attempts).where(attempts.c.job_id.in_(list(job_ids))).order_by(attempts.c.number)
            for row in self.conn.execute(query):
                found[row.job_id].append(row)
        return found

    # ---- retraining policies ------------------------------------------------------------------

    def policy(self, name: str, *, lock: bool = False) -> Row | None:
        return self._one(select(policies).where(policies.c.name == name), lock)

    def put_policy(self, name: str, model: str, dataset: str, record: bytes) -> None:
        if self.policy(name) is None:
            self.conn.execute(insert(policies).values(name=name, model=model, dataset=dataset, record=record,
                                                      last_dataset_version=0))
        else:
            self.conn.execute(update(policies).where(policies.c.name == name)
                              .values(model=model, dataset=dataset, record=record))

    def delete_policy(self, name: str) -> bool:
        self.conn.execute(delete(triggers).where(triggers.c.policy == name))
        return self.conn.execute(delete(policies).where(policies.c.name == name)).rowcount > 0

    def all_policies(self) -> Sequence[Row]:
        return self.conn.execute(select(policies).order_by(policies.c.name)).all()

    def policies_of_dataset(self, dataset: str) -> Sequence[Row]:
        return self.conn.execute(select(policies).where(policies.c.dataset == dataset).order_by(policies.c.name)).all()

    def mark_policy_started(self, name: str, dataset_version: int) -> None:
        self.conn.execute(update(policies).where(policies.c.name == name).values(
            last_started_at=utcnow(),
            last_dataset_version=func.max(policies.c.last_dataset_version, dataset_version)
            if self.conn.dialect.name == "sqlite" else func.greatest(policies.c.last_dataset_version, dataset_version)))

    # ---- retraining triggers ------------------------------------------------------------------

    def trigger(self, policy: str) -> Row | None:
        return self._one(select(triggers).where(triggers.c.policy == policy))

    def insert_trigger(self, **values: Any) -> None:
        self.conn.execute(insert(triggers).values(**values))

    def update_trigger(self, policy: str, **values: Any) -> None:
        self.conn.execute(update(triggers).where(triggers.c.policy == policy).values(**values))

    def delete_trigger(self, policy: str) -> None:
        self.conn.execute(delete(triggers).where(triggers.c.policy == policy))

    def due_triggers(self, now: dt.datetime) -> Sequence[Row]:
        return self.conn.execute(select(triggers).where(triggers.c.due_at <= now).order_by(triggers.c.due_at)).all()

    def next_due(self) -> dt.datetime | None:
        return aware(self.conn.execute(select(func.min(triggers.c.due_at))).scalar())


class Database:
    """Async access to a Store: one transaction per call, in a bounded pool of database threads."""

    def __init__(self, store: Store, on_events: Callable[[], None] = lambda: None, threads: int = 4) -> None:
        self.store = store
        self._on_events = on_events
        self._threads = ThreadPoolExecutor(threads, thread_name_prefix="trainer-db")

    async def _run(self, call: Callable[[], T]) -> T:
        try:
            return await asyncio.get_running_loop().run_in_executor(self._threads, call)
        except OperationalError as exc:
            raise Unavailable(f"trainer database unavailable: {exc.orig}") from exc

    async def read(self, fn: Callable[[Tx], T]) -> T:
        return await self._run(partial(self.store.read, fn))

    async def write(self, fn: Callable[[Tx], T]) -> T:
        """Run `fn` in a write transaction; wake the outbox relay when it added events."""
        def body(tx: Tx) -> tuple[T, int]:
            return fn(tx), tx.events

        result, events = await self._run(partial(self.store.write, body))
        if events:
            self._on_events()
        return result

    def close(self) -> None:
        self._threads.shutdown(wait=False, cancel_futures=True)
