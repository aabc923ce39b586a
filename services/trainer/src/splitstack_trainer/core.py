"""The trainer's domain logic behind the gRPC API: jobs, watching, progress, profiles, policies.

`Trainer` is transport-free and async. Submitting checks everything (jobs.JobFactory) before a
job is stored as QUEUED; the runner (runner.py) starts and follows it; retraining policies live in
retrain.py. Progress arrives from the job processes on core NATS (`on_progress`): the latest is
kept in memory, written to the database now and then, and handed to watchers. Crash point
`trainer.mid_job` is passed when progress of a second epoch arrives (a checkpoint exists by then).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import datetime as dt
import json
import logging
from collections.abc import AsyncIterator, Mapping

from splitstack.chassis.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from splitstack.chassis.faults import crash_point
from splitstack.common.v1 import common_pb2
from splitstack.trainer.v1 import trainer_pb2 as pb
from splitstack_trainer.feed import JobFeed, ProgressBook
from splitstack_trainer.jobs import JobFactory, finish_job, spec_bytes
from splitstack_trainer.records import is_terminal, job_record
from splitstack_trainer.retrain import Retraining
from splitstack_trainer.runner import JobRunner
from splitstack_trainer.store import Database, Tx, aware

log = logging.getLogger(__name__)

MID_JOB = "trainer.mid_job"
DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000
CANCEL_WAIT_SECONDS = 30.0


class Trainer:
    """Every operation of the Trainer API, independent of gRPC."""

    def __init__(self, db: Database, factory: JobFactory, runner: JobRunner, retraining: Retraining,
                 feed: JobFeed, progress: ProgressBook, profiles: Mapping[str, common_pb2.TrainingProfile],
                 watch_poll_seconds: float) -> None:
        self.db = db
        self.factory = factory
        self.runner = runner
        self.retraining = retraining
        self.feed = feed
        self.progress = progress
        self.profiles = profiles
        self.watch_poll_seconds = watch_poll_seconds
        self._publishing: set[asyncio.Task] = set()

    # ---- jobs -----------------------------------------------------------------------------------

    async def submit_job(self, spec: pb.JobSpec) -> pb.Job:
        """Check `spec` completely, then store the job QUEUED; a repeated idempotency key returns its job."""
        if spec.idempotency_key:
            existing = await self.db.read(lambda tx: tx.job_by_idempotency_key(spec.idempotency_key))
            if existing is not None:
                return self._same_spec(existing, spec)
        prepared = await self.factory.prepare(spec)

        def store(tx: Tx) -> object:
            if spec.idempotency_key and (row := tx.job_by_idempotency_key(spec.idempotency_key)) is not None:
                return row
            tx.insert_job(**prepared.row(spec))
            return tx.job(prepared.job_id)

        row = await self.db.write(store)
        if row.id == prepared.job_id:
            log.info("job %s submitted: %s on %s (%s, %s executor)", row.id, spec.model, prepared.config.dataset,
                     prepared.plan.profile.name, prepared.plan.executor)
            self.runner.wake()
            return job_record(row)
        return self._same_spec(row, spec)

    @staticmethod
    def _same_spec(row: object, spec: pb.JobSpec) -> pb.Job:
        if row.spec != spec_bytes(spec):
            raise AlreadyExists(f"idempotency_key {spec.idempotency_key!r} already submitted job {row.id} "
                                "with a different spec")
        return job_record(row)

    async def get_job(self, job_id: str) -> pb.Job:
        if not job_id:
            raise InvalidArgument("id must name a job")
        row, attempts = await self.db.read(lambda tx: (tx.job(job_id), tx.attempts_of([job_id])[job_id]))
        if row is None:
            raise NotFound(f"job {job_id!r} not found")
        return job_record(row, None if is_terminal(row.state) else self.progress.latest(job_id), attempts)

    async def list_jobs(self, model: str, state: int, size: int, token: str) -> tuple[list[pb.Job], str]:
        if state not in pb.JobState.values():
            raise InvalidArgument(f"state {state} is not a JobState")
        if size < 0:
            raise InvalidArgument(f"page_size must be >= 0, got {size}")
        limit = min(size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        after = _decode_token(token)
        rows = await self.db.read(lambda tx: tx.job_page(model, state, after, limit + 1))
        attempts = await self.db.read(lambda tx: tx.attempts_of([r.id for r in rows[:limit]]))
        jobs = [job_record(r, self.progress.latest(r.id), attempts[r.id]) for r in rows[:limit]]
        more = len(rows) > limit
        return jobs, _encode_token(aware(rows[limit - 1].created_at), rows[limit - 1].id) if more else ""

    async def cancel_job(self, job_id: str, reason: str) -> pb.Job:
        """QUEUED: cancelled at once. RUNNING: its ranks are stopped, then it is CANCELLED."""
        job = await self.get_job(job_id)
        if job.state == pb.QUEUED:
            ended = await self.db.write(lambda tx: _cancel_queued(tx, job_id, reason))
            if ended:
                self.changed(job_id)
                return await self.get_job(job_id)
            job = await self.get_job(job_id)
        if job.state == pb.RUNNING:
            queue = self.feed.subscribe(job_id)
            try:
                await self.runner.cancel(job_id, reason)
                job = await self._until_terminal(job_id, queue, CANCEL_WAIT_SECONDS)
            finally:
                self.feed.unsubscribe(job_id, queue)
        if job.state in (pb.SUCCEEDED, pb.FAILED):
            raise FailedPrecondition(f"job {job_id} already ended {pb.JobState.Name(job.state)}")
        return job

    async def _until_terminal(self, job_id: str, queue: asyncio.Queue, timeout: float) -> pb.Job:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        job = await self.get_job(job_id)
        while not is_terminal(job.state) and loop.time() < deadline:
            try:
                job = await asyncio.wait_for(queue.get(), min(self.watch_poll_seconds, deadline - loop.time()))
            except TimeoutError:
                job = await self.get_job(job_id)
        return job

    async def watch_job(self, job_id: str) -> AsyncIterator[pb.Job]:
        """The job now, then every change, until it ends."""
        queue = self.feed.subscribe(job_id)
        try:
            job = await self.get_job(job_id)
            yield job
            last = job.SerializeToString(deterministic=True)
            while not is_terminal(job.state):
                try:
                    job = await asyncio.wait_for(queue.get(), self.watch_poll_seconds)
                except TimeoutError:
                    job = await self.get_job(job_id)   # changes made by another replica
                current = job.SerializeToString(deterministic=True)
                if current != last:
                    last = current
                    yield job
        finally:
            self.feed.unsubscribe(job_id, queue)

    def changed(self, job_id: str) -> None:
        """Hand the job's new state to its watchers (called after every state change)."""
        if self.feed.watched(job_id):
            task = asyncio.get_running_loop().create_task(self._publish(job_id))
            self._publishing.add(task)
            task.add_done_callback(self._publishing.discard)

    async def _publish(self, job_id: str) -> None:
        try:
            self.feed.publish(await self.get_job(job_id))
        except NotFound:
            pass

    # ---- progress -------------------------------------------------------------------------------

    async def on_progress(self, progress: pb.Progress) -> None:
        """Progress from a job's rank zero (training.progress.<job>)."""
        if not self.runner.follows(progress.job_id):
            return
        if progress.stage == "fit" and progress.epoch >= 1:
            crash_point(MID_JOB)
        if self.progress.note(progress):
            data = progress.SerializeToString()
            await self.db.write(lambda tx: _store_progress(tx, progress.job_id, data))
        self.changed(progress.job_id)

    # ---- profiles -------------------------------------------------------------------------------

    def list_profiles(self) -> list[common_pb2.TrainingProfile]:
        return [self.profiles[name] for name in sorted(self.profiles)]


def _store_progress(tx: Tx, job_id: str, data: bytes) -> None:
    row = tx.job(job_id)
    if row is not None and row.state == pb.RUNNING:
        tx.update_job(job_id, progress=data)


def _cancel_queued(tx: Tx, job_id: str, reason: str) -> bool:
    row = tx.job(job_id, lock=True)
    if row is None or row.state != pb.QUEUED:
        return False
    tx.update_job(job_id, cancel_reason=reason)
    return finish_job(tx, job_id, pb.CANCELLED, error=f"cancelled: {reason}" if reason else "cancelled")


def _encode_token(created_at: dt.datetime, job_id: str) -> str:
    return base64.urlsafe_b64encode(json.dumps([created_at.isoformat(), job_id]).encode()).decode()


def _decode_token(token: str) -> tuple[dt.datetime, str] | None:
    if not token:
        return None
    try:
        at, job_id = json.loads(base64.urlsafe_b64decode(token.encode()))
        return dt.datetime.fromisoformat(at), str(job_id)
    except (ValueError, TypeError, binascii.Error):
        raise InvalidArgument(f"page_token {token!r} is not a token this list returned") from None
