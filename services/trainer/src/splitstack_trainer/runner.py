"""The job runner: starts queued jobs within each executor's capacity, follows them to their end.

- **Start:** oldest QUEUED first, while the job's executor has a free slot: the row becomes
  RUNNING (attempt n+1) in one write, then the executor starts the ranks and the handle is stored.
  Crash point `trainer.job_started` sits right after that (a trainer dying before any checkpoint).
- **Follow:** a task per running job waits for the executor's outcome. Success means the ranks
  exited 0 *and* the registry holds a READY version whose idempotency key is the job id (its
  number and lineage metrics become the job's); anything else is FAILED with the reason. A job
  with a cancel request ends CANCELLED. The terminal state and `training.finished` commit
  together (jobs.finish_job).
- **Recover (at start):** every RUNNING job is either followed again (a Kubernetes Job still
  there) or, its processes gone, requeued to resume from its last checkpoint — or FAILED with the
  reason when it has no checkpoint yet or used up its attempts. Never RUNNING forever.
- **Stop:** following tasks are cancelled without ending their jobs; the local executor stops its
  ranks; the next start recovers them as above.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import grpc

from splitstack.chassis.faults import crash_point
from splitstack.registry.v1 import registry_pb2 as rpb
from splitstack.trainer.v1 import trainer_pb2 as pb
from splitstack_trainer.executors import Executor, Outcome
from splitstack_trainer.feed import ProgressBook
from splitstack_trainer.jobconfig import JobConfig
from splitstack_trainer.jobs import finish_job
from splitstack_trainer.registry_client import RegistryClient
from splitstack_trainer.store import Database, Tx, utcnow

log = logging.getLogger(__name__)

JOB_STARTED = "trainer.job_started"
IDLE_SECONDS = 1.0
REGISTRY_RETRY_SECONDS = (1.0, 2.0, 4.0, 8.0, 16.0)


class JobRunner:
    """Runs jobs on their executors, one following task per running job."""

    def __init__(self, db: Database, executors: dict[str, Executor], registry: RegistryClient,
                 progress: ProgressBook, max_attempts: int, on_change: Callable[[str], None]) -> None:
        self.db = db
        self.executors = executors
        self.registry = registry
        self.progress = progress
        self.max_attempts = max_attempts
        self._on_change = on_change
        self._following: dict[str, tuple[str, asyncio.Task]] = {}   # job id -> (executor, task)
        self._handles: dict[str, tuple[JobConfig, str]] = {}
        self._wake = asyncio.Event()

    # ---- the loop -------------------------------------------------------------------------------

    async def run(self) -> None:
        """Recover, then start queued jobs whenever woken (or every IDLE_SECONDS); a failing round
        (e.g. the database briefly unavailable) is logged and tried again."""
        recovered = False
        while True:
            self._wake.clear()
            try:
                if not recovered:
                    await self.recover()
                    recovered = True
                await self.start_queued()
            except Exception:  # noqa: BLE001 - the runner must outlive a bad round
                log.exception("job runner: %s failed; trying again", "starting jobs" if recovered else "recovery")
            try:
                await asyncio.wait_for(self._wake.wait(), IDLE_SECONDS)
            except TimeoutError:
                pass

    def wake(self) -> None:
        self._wake.set()

    def follows(self, job_id: str) -> bool:
        return job_id in self._following

    async def start_queued(self) -> None:
        for executor in self.executors.values():
            free = executor.capacity - sum(1 for name, _ in self._following.values() if name == executor.name)
            if free <= 0:
                continue
            rows = await self.db.read(lambda tx, e=executor.name, n=free: tx.jobs_in([pb.QUEUED], e, limit=n))
            for row in rows:
                await self._launch(row.id, JobConfig.from_json(row.config), executor)

    # ---- one job --------------------------------------------------------------------------------

    async def _launch(self, job_id: str, config: JobConfig, executor: Executor) -> None:
        def claim(tx: Tx) -> bool:
            row = tx.job(job_id, lock=True)
            if row is None or row.state != pb.QUEUED:
                return False
            tx.update_job(job_id, state=pb.RUNNING, attempts=row.attempts + 1, started_at=row.started_at or utcnow())
            return True

        if not await self.db.write(claim):
            return
        self._on_change(job_id)
        try:
            handle = await executor.start(config)
        except Exception as exc:  # noqa: BLE001 - any failure to start is the job's failure
            log.exception("job %s: could not start on %s", job_id, executor.name)
            await self._finish(job_id, config, Outcome(False, f"could not start on {executor.name}: {exc}"))
            return
        cancelled = await self.db.write(lambda tx: _store_handle(tx, job_id, handle))
        crash_point(JOB_STARTED)
        self._follow(job_id, config, executor, handle)
        if cancelled:
            await executor.cancel(config, handle)

    def _follow(self, job_id: str, config: JobConfig, executor: Executor, handle: str) -> None:
        task = asyncio.create_task(self._wait_and_finish(job_id, config, executor, handle), name=f"job-{job_id}")
        self._following[job_id] = (executor.name, task)
        self._handles[job_id] = (config, handle)

    async def _wait_and_finish(self, job_id: str, config: JobConfig, executor: Executor, handle: str) -> None:
        try:
            try:
                outcome = await executor.wait(config, handle)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - the job must not stay RUNNING because following it broke
                log.exception("job %s: following it failed", job_id)
                outcome = Outcome(False, f"the trainer lost track of the job: {exc}")
            await self._finish_with_retries(job_id, config, outcome)
        finally:
            self._following.pop(job_id, None)
            self._handles.pop(job_id, None)
            self.wake()

    async def _finish_with_retries(self, job_id: str, config: JobConfig, outcome: Outcome) -> None:
        """Record the outcome; while the database or registry fails, try again (then recovery at the
        next start decides)."""
        for pause in REGISTRY_RETRY_SECONDS:
            try:
                await self._finish(job_id, config, outcome)
                return
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001
                log.exception("job %s: recording its end failed; again in %.0fs", job_id, pause)
                await asyncio.sleep(pause)
        log.error("job %s: its end could not be recorded; the next start recovers it", job_id)

    async def _finish(self, job_id: str, config: JobConfig, outcome: Outcome) -> None:
        row = await self.db.read(lambda tx: tx.job(job_id))
        state, error, version, metrics = pb.FAILED, outcome.reason, 0, {}
        if row is not None and row.cancel_reason is not None:
            state, error = pb.CANCELLED, f"cancelled: {row.cancel_reason}" if row.cancel_reason else "cancelled"
        elif outcome.succeeded:
            found = await self._registered_version(config.model, job_id)
            if found is not None and found.state == rpb.READY:
                state, error, version, metrics = pb.SUCCEEDED, "", found.version, dict(found.lineage.metrics)
            else:
                error = f"the job's ranks succeeded but no READY version of {config.model!r} carries its id"
        last = self.progress.forget(job_id)
        await self.db.write(lambda tx: finish_job(tx, job_id, state, error=error, version=version, metrics=metrics,
                                                  progress=last))
        self._on_change(job_id)

    async def _registered_version(self, model: str, job_id: str) -> rpb.ModelVersion | None:
        """The version the job registered, asking again while the registry is unreachable."""
        for pause in REGISTRY_RETRY_SECONDS:
            try:
                return await self.registry.version_by_key(model, job_id)
            except grpc.aio.AioRpcError as exc:
                log.warning("job %s: cannot ask the registry for its version (%s); again in %.0fs",
                            job_id, exc.code().name, pause)
                await asyncio.sleep(pause)
        return await self.registry.version_by_key(model, job_id)

    async def cancel(self, job_id: str, reason: str) -> bool:
        """Ask a RUNNING job to stop; False when it is not running (any more)."""
        def request(tx: Tx) -> bool:
            row = tx.job(job_id, lock=True)
            if row is None or row.state != pb.RUNNING:
                return False
            tx.update_job(job_id, cancel_reason=reason)
            return True

        if not await self.db.write(request):
            return False
        following = self._handles.get(job_id)
        if following is not None:
            config, handle = following
            await self.executors[self._following[job_id][0]].cancel(config, handle)
        return True

    # ---- after a restart ------------------------------------------------------------------------

    async def recover(self) -> None:
        """Follow again, requeue or fail every job this database shows RUNNING; fail queued jobs whose
        executor is no longer configured (they could never start)."""
        for row in await self.db.read(lambda tx: tx.jobs_in([pb.QUEUED])):
            if row.executor not in self.executors:
                await self._end(row.id, pb.FAILED, f"the {row.executor} executor is not configured on this trainer")
        for row in await self.db.read(lambda tx: tx.jobs_in([pb.RUNNING])):
            config = JobConfig.from_json(row.config)
            executor = self.executors.get(row.executor)
            if executor is None:
                await self._end(row.id, pb.FAILED, f"the {row.executor} executor is not configured on this trainer")
            elif await executor.recover(config, row.handle):
                log.info("job %s: following it again on %s", row.id, executor.name)
                self._follow(row.id, config, executor, row.handle)
            elif row.cancel_reason is not None:
                await self._end(row.id, pb.CANCELLED, f"cancelled: {row.cancel_reason}")
            elif row.attempts >= self.max_attempts:
                await self._end(row.id, pb.FAILED, f"interrupted by trainer restarts in all {row.attempts} attempts")
            elif executor.resumable(config):
                await self.db.write(lambda tx, r=row: _requeue(tx, r.id, r.attempts))
                log.info("job %s: requeued to resume from its checkpoint", row.id)
            else:
                await self._end(row.id, pb.FAILED, "the trainer stopped while the job ran, before its first "
                                                   "checkpoint; nothing to resume from (submit it again)")

    async def _end(self, job_id: str, state: int, error: str) -> None:
        await self.db.write(lambda tx: finish_job(tx, job_id, state, error=error))
        self._on_change(job_id)

    async def close(self) -> None:
        """Stop following (jobs stay RUNNING for the next start to recover) and close the executors."""
        tasks = [task for _, task in self._following.values()]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=5.0)
        for executor in self.executors.values():
            await executor.close()


def _store_handle(tx: Tx, job_id: str, handle: str) -> bool:
    """Store the executor's handle; True when a cancel arrived meanwhile."""
    tx.update_job(job_id, handle=handle)
    row = tx.job(job_id)
    return row is not None and row.cancel_reason is not None


def _requeue(tx: Tx, job_id: str, attempts: int) -> None:
    progress = pb.Progress(job_id=job_id, stage="fit",
                           message=f"the trainer restarted; resuming from the last checkpoint (attempt {attempts + 1})")
    progress.at.GetCurrentTime()
    tx.update_job(job_id, state=pb.QUEUED, handle="", progress=progress.SerializeToString())
