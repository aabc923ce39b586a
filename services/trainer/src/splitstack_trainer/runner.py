"""The job runner: starts queued jobs within each executor's capacity, follows them to their end.

- **Start:** oldest QUEUED first, while the job's executor has a free slot: the row becomes
  RUNNING (attempt n+1) in one write, then the executor starts the ranks and the handle is stored.
  Crash point `trainer.job_started` sits right after that (a trainer dying before any checkpoint).
- **Follow:** a task per running job waits for the executor's outcome. Success means the ranks
  exited 0 *and* the registry holds a READY version whose idempotency key is the job id (its
  number and lineage metrics become the job's); anything else is FAILED with the reason. A job
  with a cancel request ends CANCELLED. The terminal state and `training.finished` commit
  together (jobs.finish_job).
- **Attempts:** every start is an attempt (`job_attempts`: start, end, reason, transient,
  retried). A retraining job (started by a policy: nobody is there to submit it again) whose
  attempt failed for a transient reason — a rank killed, a peer unreachable past the job's retry
  budget, the registry not answering whether it registered, its ranks gone with the trainer — is
  requeued for a new attempt while fewer than `max_attempts` ran; the job id, and so the
  registry's idempotency key, stays the same, so an attempt after one that did register finds
  that version instead of making a second. Permanent failures (bad data, bad spec: exit 1) end it.
- **Recover (at start):** every RUNNING job is either followed again (a Kubernetes Job still
  there) or, its processes gone, requeued to resume from its last checkpoint (a retraining job
  also without one: it starts again) — or FAILED with the reason when it has no checkpoint yet or
  used up its attempts. Never RUNNING forever.
- **Stop:** following tasks are cancelled without ending their jobs; the local executor stops its
  ranks; the next start recovers them as above.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass

import grpc

from splitstack.chassis.faults import crash_point
from splitstack.registry.v1 import registry_pb2 as rpb
from splitstack.trainer.v1 import trainer_pb2 as pb
from splitstack_trainer.executors import Executor, Outcome
from splitstack_trainer.feed import ProgressBook
from splitstack_trainer.jobconfig import JobConfig
from splitstack_trainer.jobs import finish_job
from splitstack_trainer.registry_client import RegistryClient, RegistryRejected
from splitstack_trainer.store import Database, Tx, utcnow

log = logging.getLogger(__name__)

JOB_STARTED = "trainer.job_started"
IDLE_SECONDS = 1.0
DATABASE_RETRY_SECONDS = (1.0, 2.0, 4.0, 8.0, 16.0)


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
            tx.begin_attempt(job_id, row.attempts + 1)
            return True

        if not await self.db.write(claim):
            return
        self._on_change(job_id)
        try:
            handle = await executor.start(config)
        except Exception as exc:  # noqa: BLE001 - any failure to start is the job's failure
            log.exception("job %s: could not start on %s", job_id, executor.name)
            await self._finish(job_id, config, Outcome(False, f"could not start on {executor.name}: {exc}",
                                                       transient=True))
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
                outcome = Outcome(False, f"the trainer lost track of the job: {exc}", transient=True)
            await self._finish_with_retries(job_id, config, outcome)
        finally:
            if self._following.get(job_id, ("", None))[1] is asyncio.current_task():
                del self._following[job_id]   # (a retry's new attempt may already follow the job)
                self._handles.pop(job_id, None)
            self.wake()

    async def _finish_with_retries(self, job_id: str, config: JobConfig, outcome: Outcome) -> None:
        """Record the outcome; while the database fails, try again (then recovery at the next start
        decides)."""
        for pause in DATABASE_RETRY_SECONDS:
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
        """End the running attempt with `outcome`: the job's terminal state, or a new attempt."""
        row = await self.db.read(lambda tx: tx.job(job_id))
        if row is None:
            return
        state, error, transient, version, metrics = pb.FAILED, outcome.reason, outcome.transient, 0, {}
        if row.cancel_reason is not None:
            state, error = pb.CANCELLED, f"cancelled: {row.cancel_reason}" if row.cancel_reason else "cancelled"
            transient = False
        elif outcome.succeeded:
            found, error = await self._registered_version(config.model, job_id)
            if found is not None and found.state == rpb.READY:
                state, error, version, metrics = pb.SUCCEEDED, "", found.version, dict(found.lineage.metrics)
            else:
                transient = True   # not READY (yet): the next attempt registers the complete outputs again
        ending = AttemptEnd(row.attempts, state, error, transient, self._retries(row, state, transient))
        last = self.progress.forget(job_id)
        await self.db.write(lambda tx: _end_attempt(tx, job_id, ending, version=version, metrics=metrics,
                                                    progress=last, max_attempts=self.max_attempts))
        self._on_change(job_id)

    def _retries(self, row: object, state: int, transient: bool) -> bool:
        """Whether a failed attempt of this job gets another: transient, a retraining job, attempts left."""
        return state == pb.FAILED and transient and bool(row.retrain_policy) and row.attempts < self.max_attempts

    async def _registered_version(self, model: str, job_id: str) -> tuple[rpb.ModelVersion | None, str]:
        """(the version the job registered, "") or (None, why not); the client rides out registry restarts."""
        try:
            found = await self.registry.version_by_key(model, job_id)
        except (grpc.aio.AioRpcError, RegistryRejected) as exc:
            log.warning("job %s: cannot ask the registry for its version: %s", job_id, exc)
            return None, f"the job's ranks succeeded but the registry could not say whether it registered: {exc}"
        if found is None or found.state != rpb.READY:
            return found, f"the job's ranks succeeded but no READY version of {model!r} carries its id"
        return found, ""

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
                await self._end(row, AttemptEnd(row.attempts, pb.FAILED,
                                                f"the {row.executor} executor is not configured on this trainer"))
        for row in await self.db.read(lambda tx: tx.jobs_in([pb.RUNNING])):
            config = JobConfig.from_json(row.config)
            executor = self.executors.get(row.executor)
            if executor is None:
                await self._end(row, AttemptEnd(row.attempts, pb.FAILED,
                                                f"the {row.executor} executor is not configured on this trainer"))
            elif await executor.recover(config, row.handle):
                log.info("job %s: following it again on %s", row.id, executor.name)
                self._follow(row.id, config, executor, row.handle)
            elif row.cancel_reason is not None:
                await self._end(row, AttemptEnd(row.attempts, pb.CANCELLED, f"cancelled: {row.cancel_reason}"))
            else:
                await self._interrupted(row, executor.resumable(config))

    async def _interrupted(self, row: object, resumable: bool) -> None:
        """A RUNNING job whose ranks are gone with the previous trainer: requeue it, or fail it."""
        stopped = "the trainer stopped while the job ran"
        if row.attempts >= self.max_attempts:
            await self._end(row, AttemptEnd(row.attempts, pb.FAILED, f"interrupted by trainer restarts in all "
                                                                     f"{row.attempts} attempts", transient=True))
        elif resumable or row.retrain_policy:
            ending = AttemptEnd(row.attempts, pb.FAILED, stopped, transient=True, retried=True)
            how = "resuming from the last checkpoint" if resumable else "starting again"
            await self.db.write(lambda tx: _end_attempt(tx, row.id, ending, how=how, max_attempts=self.max_attempts))
            self._on_change(row.id)
            log.info("job %s: requeued to %s", row.id, "resume from its checkpoint" if resumable else "start again")
        else:
            await self._end(row, AttemptEnd(row.attempts, pb.FAILED, f"{stopped}, before its first checkpoint; "
                                                                     "nothing to resume from (submit it again)",
                                            transient=True))

    async def _end(self, row: object, ending: AttemptEnd) -> None:
        await self.db.write(lambda tx: _end_attempt(tx, row.id, ending, max_attempts=self.max_attempts))
        self._on_change(row.id)

    async def close(self) -> None:
        """Stop following (jobs stay RUNNING for the next start to recover) and close the executors."""
        tasks = [task for _, task in self._following.values()]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=5.0)
        for executor in self.executors.values():
            await executor.close()


@dataclass(frozen=True)
class AttemptEnd:
    """How attempt `number` of a job ended, and whether another one follows."""

    number: int
    state: int                       # the job's state if no attempt follows
    error: str = ""
    transient: bool = False
    retried: bool = False


def _end_attempt(tx: Tx, job_id: str, ending: AttemptEnd, *, version: int = 0,
                 metrics: dict[str, float] | None = None, progress: pb.Progress | None = None,
                 how: str = "trying again", max_attempts: int = 0) -> None:
    """Close the attempt's record; requeue the job for the next attempt, or write its terminal state."""
    succeeded = ending.state == pb.SUCCEEDED
    tx.end_attempt(job_id, ending.number, error="" if succeeded else ending.error,
                   transient=ending.transient and not succeeded, retried=ending.retried)
    if ending.retried:
        _requeue(tx, job_id, f"attempt {ending.number} failed ({ending.error}); {how} "
                             f"(attempt {ending.number + 1} of at most {max_attempts})")
        return
    error = ending.error
    if error and ending.number > 1:
        error = f"{error} (attempt {ending.number})"
    finish_job(tx, job_id, ending.state, error=error, version=version, metrics=metrics, progress=progress)


def _store_handle(tx: Tx, job_id: str, handle: str) -> bool:
    """Store the executor's handle; True when a cancel arrived meanwhile."""
    tx.update_job(job_id, handle=handle)
    row = tx.job(job_id)
    return row is not None and row.cancel_reason is not None


def _requeue(tx: Tx, job_id: str, message: str) -> None:
    progress = pb.Progress(job_id=job_id, stage="fit", message=message)
    progress.at.GetCurrentTime()
    tx.update_job(job_id, state=pb.QUEUED, handle="", progress=progress.SerializeToString())
    log.info("job %s: %s", job_id, message)
