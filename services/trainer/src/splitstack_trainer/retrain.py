"""Event-driven retraining: policies (model <- dataset), and the triggers `data.updated` leaves.

A policy says: when `dataset` gets a new version, train `model` with `template` (its
dataset_version is filled in from the event). On `data.updated.<dataset>` each enabled policy of
the dataset gets a **trigger** (one pending per policy, persisted), due `debounce_seconds` after
the first event of a burst; later events of the burst only move the trigger to their newer
version, so a burst becomes one job on the latest version. When a trigger is due, the job starts
unless the policy started one less than `min_interval_seconds` ago or already runs
`max_concurrent_jobs` (then the trigger waits).

A trigger survives every crash until its job exists: it is deleted in the transaction that stores
the job, so a trainer killed before that (right after `data.updated`, while the job is prepared)
finds it again at its next start. Preparing the job needs the registry; while the registry is
unreachable (or the database is), the trigger stays and is tried again — only a spec or data the
checks refuse (INVALID_ARGUMENT, FAILED_PRECONDITION, ...) gives a FAILED job with the reason.
Once stored, the job's attempts are the runner's (runner.py): transient failures start a new one.

Never a second job for the same event: a job started by a policy carries the key
sha256(model, dataset digest, config), unique in the database, and the policy remembers the newest
dataset version it started a job for. A redelivered (or late, older) event finds one or the other
and leaves nothing behind.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import logging
import math
from collections.abc import Callable
from typing import Any

from sqlalchemy.exc import IntegrityError

from splitstack.chassis.errors import DomainError, InvalidArgument, NotFound
from splitstack.chassis.retry import TRANSIENT_CODES, is_transient
from splitstack.contracts.names import InvalidName, check_name
from splitstack.registry.v1 import registry_pb2 as rpb
from splitstack.trainer.v1 import trainer_pb2 as pb
from splitstack_trainer.jobs import JobFactory, PreparedJob, finish_job, spec_bytes
from splitstack_trainer.records import new_job_id, policy_record
from splitstack_trainer.store import Database, Tx, aware, utcnow

log = logging.getLogger(__name__)

BUSY_RETRY_SECONDS = 1.0


def trigger_key(policy: pb.RetrainPolicy, dataset_sha256: str) -> str:
    """model + dataset digest + config: the identity of a retraining job."""
    template = pb.JobSpec()
    template.CopyFrom(policy.template)
    template.dataset_version = 0
    config = hashlib.sha256(spec_bytes(template)).hexdigest()
    return hashlib.sha256(f"{policy.model}\n{dataset_sha256}\n{config}".encode()).hexdigest()[:40]


def _seconds(field: str, value: float) -> float:
    if not math.isfinite(value) or value < 0:
        raise InvalidArgument(f"{field} must be a finite number of seconds >= 0, got {value}")
    return value


class Retraining:
    """Retraining policies, and the jobs they start."""

    def __init__(self, db: Database, factory: JobFactory, tick_seconds: float,
                 on_job: Callable[[str], None]) -> None:
        self.db = db
        self.factory = factory
        self.tick_seconds = tick_seconds
        self._on_job = on_job
        self._wake = asyncio.Event()

    # ---- policies -------------------------------------------------------------------------------

    async def set_policy(self, policy: pb.RetrainPolicy) -> pb.RetrainPolicy:
        """Create or replace a policy after checking it and its template like a submitted job."""
        checked = await self._checked(policy)

        def put(tx: Tx) -> pb.RetrainPolicy:
            existing = tx.policy(checked.name, lock=True)
            if existing is not None:
                checked.created_at.CopyFrom(policy_record(existing).created_at)
            else:
                checked.created_at.GetCurrentTime()
            tx.put_policy(checked.name, checked.model, checked.dataset, checked.SerializeToString())
            return checked

        stored = await self.db.write(put)
        log.info("retraining policy %s: %s <- %s (%s)", stored.name, stored.model, stored.dataset,
                 "enabled" if stored.enabled else "disabled")
        return stored

    async def _checked(self, policy: pb.RetrainPolicy) -> pb.RetrainPolicy:
        checked = pb.RetrainPolicy()
        checked.CopyFrom(policy)
        try:
            check_name("policy.name", checked.name)
            check_name("policy.dataset", checked.dataset)
        except InvalidName as exc:
            raise InvalidArgument(str(exc)) from None
        template = checked.template
        checked.model = checked.model or template.model
        if template.model and template.model != checked.model:
            raise InvalidArgument(f"policy.model {checked.model!r} and template.model {template.model!r} differ")
        if template.dataset and template.dataset != checked.dataset:
            raise InvalidArgument(f"policy.dataset {checked.dataset!r} and template.dataset {template.dataset!r} differ")
        if template.dataset_version:
            raise InvalidArgument("template.dataset_version must be 0: each event fills it in")
        if template.idempotency_key:
            raise InvalidArgument("template.idempotency_key must be empty: retraining jobs are keyed by "
                                  "model + dataset digest + config")
        template.model, template.dataset = checked.model, checked.dataset
        _seconds("debounce_seconds", checked.debounce_seconds)
        _seconds("min_interval_seconds", checked.min_interval_seconds)
        if checked.max_concurrent_jobs < 0:
            raise InvalidArgument(f"max_concurrent_jobs must be >= 0 (0 = 1), got {checked.max_concurrent_jobs}")
        checked.max_concurrent_jobs = checked.max_concurrent_jobs or 1
        await self.factory.plan(template)
        return checked

    async def get_policy(self, name: str) -> pb.RetrainPolicy:
        row = await self.db.read(lambda tx: tx.policy(name))
        if row is None:
            raise NotFound(f"retraining policy {name!r} not found")
        return policy_record(row)

    async def list_policies(self) -> list[pb.RetrainPolicy]:
        return [policy_record(r) for r in await self.db.read(lambda tx: tx.all_policies())]

    async def delete_policy(self, name: str) -> None:
        if not await self.db.write(lambda tx: tx.delete_policy(name)):
            raise NotFound(f"retraining policy {name!r} not found")

    # ---- events ---------------------------------------------------------------------------------

    async def on_data_updated(self, version: rpb.DatasetVersion, event_id: str) -> int:
        """Note a new dataset version for every enabled policy of its dataset; how many took it."""
        rows = await self.db.read(lambda tx: tx.policies_of_dataset(version.dataset))
        noted = 0
        for row in rows:
            if policy_record(row).enabled:
                noted += await self.db.write(lambda tx, r=row: _note(tx, r, version, event_id))
        if noted:
            self._wake.set()
        return noted

    # ---- due triggers ---------------------------------------------------------------------------

    async def run(self) -> None:
        """Start the jobs of due triggers until cancelled."""
        while True:
            self._wake.clear()
            try:
                next_due = await self.fire_due()
            except Exception:  # noqa: BLE001 - e.g. the database briefly unavailable: next tick
                log.exception("retraining: checking due triggers failed; trying again")
                next_due = None
            delay = self.tick_seconds if next_due is None else min(
                self.tick_seconds, max(0.0, (next_due - utcnow()).total_seconds()))
            try:
                await asyncio.wait_for(self._wake.wait(), max(delay, 0.01))
            except TimeoutError:
                pass

    async def fire_due(self) -> dt.datetime | None:
        """Handle every due trigger; return when the next one is due."""
        for trigger in await self.db.read(lambda tx: tx.due_triggers(utcnow())):
            try:
                await self._fire(trigger)
            except Exception as exc:  # noqa: BLE001 - one policy's trouble must not stop the others
                if _transient(exc):
                    log.warning("retraining policy %s: its job cannot be prepared yet (%s); retrying",
                                trigger.policy, exc)
                else:
                    log.exception("retraining policy %s: starting its job failed; retrying", trigger.policy)
                await self.db.write(lambda tx, t=trigger: tx.update_trigger(
                    t.policy, due_at=utcnow() + dt.timedelta(seconds=BUSY_RETRY_SECONDS)))
        return await self.db.read(lambda tx: tx.next_due())

    async def _fire(self, trigger: Any) -> None:
        row = await self.db.read(lambda tx: tx.policy(trigger.policy))
        if row is None or not policy_record(row).enabled:
            await self.db.write(lambda tx: tx.delete_trigger(trigger.policy))
            return
        policy = policy_record(row)
        wait_until = await self.db.read(lambda tx: _blocked_until(tx, row, policy))
        if wait_until is not None:
            await self.db.write(lambda tx: tx.update_trigger(policy.name, due_at=wait_until))
            return
        spec = pb.JobSpec()
        spec.CopyFrom(policy.template)
        spec.dataset_version = trigger.dataset_version
        try:
            prepared: PreparedJob | None = await self.factory.prepare(spec)
            failure = ""
        except DomainError as exc:
            if _transient(exc):
                raise   # the trigger stays; tried again
            prepared, failure = None, str(exc)
        job_id = await self.db.write(lambda tx: _start(tx, policy, trigger, spec, prepared, failure))
        if job_id:
            log.info("retraining policy %s: job %s on %s version %d", policy.name, job_id, policy.dataset,
                     trigger.dataset_version)
            self._on_job(job_id)


def _transient(exc: BaseException) -> bool:
    """A peer or the database unreachable: the trigger is tried again, no job is failed for it."""
    return is_transient(exc) or (isinstance(exc, DomainError) and exc.code in TRANSIENT_CODES)


def _note(tx: Tx, row: Any, version: rpb.DatasetVersion, event_id: str) -> int:
    """Record the new version in the policy's pending trigger; 0 when it changes nothing."""
    policy = policy_record(row)
    if version.version <= row.last_dataset_version:
        return 0  # a job already covered this version or a newer one
    key = trigger_key(policy, version.sha256)
    if tx.job_by_trigger_key(key) is not None:
        return 0
    pending = tx.trigger(policy.name)
    now = utcnow()
    if pending is None:
        tx.insert_trigger(policy=policy.name, dataset=version.dataset, dataset_version=version.version,
                          dataset_sha256=version.sha256, trigger_key=key, event_id=event_id, first_seen_at=now,
                          due_at=now + dt.timedelta(seconds=policy.debounce_seconds))
        return 1
    if version.version <= pending.dataset_version:
        return 0
    tx.update_trigger(policy.name, dataset_version=version.version, dataset_sha256=version.sha256,
                      trigger_key=key, event_id=event_id)
    return 1


def _blocked_until(tx: Tx, row: Any, policy: pb.RetrainPolicy) -> dt.datetime | None:
    """When the policy may start its next job, or None when it may now."""
    now = utcnow()
    last = aware(row.last_started_at)
    if last is not None and (now - last).total_seconds() < policy.min_interval_seconds:
        return last + dt.timedelta(seconds=policy.min_interval_seconds)
    if tx.active_jobs_of_policy(policy.name) >= policy.max_concurrent_jobs:
        return now + dt.timedelta(seconds=BUSY_RETRY_SECONDS)
    return None


def _start(tx: Tx, policy: pb.RetrainPolicy, trigger: Any, spec: pb.JobSpec, prepared: PreparedJob | None,
           failure: str) -> str:
    """Store the trigger's job (or, when its spec failed the checks, a FAILED one) and drop the trigger."""
    current = tx.trigger(policy.name)
    if current is None or current.trigger_key != trigger.trigger_key:
        return ""  # a newer version moved the trigger meanwhile; it fires on its own
    tx.delete_trigger(policy.name)
    tx.mark_policy_started(policy.name, trigger.dataset_version)
    if tx.job_by_trigger_key(trigger.trigger_key) is not None:
        return ""
    if prepared is not None:
        values = prepared.row(spec, retrain_policy=policy.name, trigger_key=trigger.trigger_key)
    else:
        values = dict(id=new_job_id(), model=policy.model, state=pb.QUEUED, executor=spec.executor or "local",
                      trigger_key=trigger.trigger_key, retrain_policy=policy.name, spec=spec_bytes(spec),
                      config="{}", model_version=0, error="", attempts=0, handle="", metrics="{}",
                      created_at=utcnow())
    try:
        with tx.conn.begin_nested():
            tx.insert_job(**values)
    except IntegrityError:
        return ""
    if prepared is None:
        finish_job(tx, values["id"], pb.FAILED, error=f"retraining job rejected: {failure}")
    return values["id"]
