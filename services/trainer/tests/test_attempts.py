"""Attempts of a job (runner + store on SQLite, an executor whose outcome the test chooses): a
retraining job is retried after a transient failure until `max_attempts`, never after a permanent
one; a submitted job is not retried; every attempt is recorded with its reason."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from splitstack.chassis.db import open_engine
from splitstack.chassis.outbox import Outbox
from splitstack.trainer.v1 import trainer_pb2 as pb
from splitstack_trainer import store as tables
from splitstack_trainer.executors import Outcome
from splitstack_trainer.feed import ProgressBook
from splitstack_trainer.jobconfig import JobConfig
from splitstack_trainer.records import job_record
from splitstack_trainer.runner import JobRunner
from splitstack_trainer.store import Database, Store, utcnow

MAX_ATTEMPTS = 3
KILLED = Outcome(False, "rank 0 was killed by SIGKILL", transient=True)
BAD_DATA = Outcome(False, "rank 0 exited with status 1: ValueError: labels out of range")


class ChosenOutcome:
    """An executor whose jobs start and end with the outcome it was given; gone after a restart."""

    name = "local"
    capacity = 1

    def __init__(self, outcome: Outcome, resumable: bool = False) -> None:
        self.outcome = outcome
        self._resumable = resumable

    async def start(self, config: JobConfig) -> str:
        return "{}"

    async def wait(self, config: JobConfig, handle: str) -> Outcome:
        return self.outcome

    async def recover(self, config: JobConfig, handle: str) -> bool:
        return False

    def resumable(self, config: JobConfig) -> bool:
        return self._resumable

    async def close(self) -> None:
        pass


@pytest.fixture
def store(tmp_path: Path) -> Store:
    engine = open_engine(f"sqlite:///{tmp_path / 'trainer.db'}")
    store = Store(engine, Outbox(tables.outbox, "trainer/test"))
    store.create_schema()
    yield store
    engine.dispose()


def insert_job(store: Store, *, policy: str, state: int = pb.QUEUED, attempts: int = 0) -> None:
    config = JobConfig(
        job_id="job-1", model="digits", module="m:M", datamodule="m:D", module_hparams={}, datamodule_hparams={},
        profile={"name": "cpu-local", "nodes": 1, "devices": 1}, max_epochs=1, seed=0, dataset="d", dataset_version=1,
        dataset_sha256="0" * 64, dataset_size=1, dataset_path="/nowhere", work_dir="/nowhere", required_targets=[],
        primary_metric={}, promotion_policy=None, parent_version=0, code_version="test").to_json()
    store.write(lambda tx: tx.insert_job(
        id="job-1", model="digits", state=state, executor="local", retrain_policy=policy, config=config,
        spec=pb.JobSpec(model="digits").SerializeToString(), model_version=0, error="", attempts=attempts, handle="",
        metrics="{}", created_at=utcnow()))
    for number in range(1, attempts + 1):
        store.write(lambda tx, n=number: tx.begin_attempt("job-1", n))
        if number < attempts or state != pb.RUNNING:
            store.write(lambda tx, n=number: tx.end_attempt("job-1", n, error="earlier", transient=True, retried=True))


def job(store: Store) -> pb.Job:
    return store.read(lambda tx: job_record(tx.job("job-1"), attempts=tx.attempts_of(["job-1"])["job-1"]))


async def one_attempt(store: Store, executor: ChosenOutcome) -> pb.Job:
    """Start the queued job once and wait until its outcome is recorded."""
    db = Database(store)
    runner = JobRunner(db, {"local": executor}, registry=None, progress=ProgressBook(1.0),
                       max_attempts=MAX_ATTEMPTS, on_change=lambda job_id: None)
    try:
        await runner.start_queued()
        for _ in range(500):
            if not runner.follows("job-1") and job(store).state != pb.RUNNING:
                break
            await asyncio.sleep(0.01)
        return job(store)
    finally:
        db.close()


@pytest.mark.parametrize("policy, outcome, attempts, state, retried", [
    ("policy", KILLED, 0, pb.QUEUED, True),                  # transient: attempt 2 follows
    ("policy", BAD_DATA, 0, pb.FAILED, False),               # permanent: retrying cannot help
    ("", KILLED, 0, pb.FAILED, False),                       # a submitted job is not retried
    ("policy", KILLED, MAX_ATTEMPTS - 1, pb.FAILED, False),  # the last allowed attempt
])
async def test_an_attempt_ends_in_a_retry_or_the_jobs_end(store: Store, policy: str, outcome: Outcome, attempts: int,
                                                          state: int, retried: bool) -> None:
    insert_job(store, policy=policy, attempts=attempts)
    ended = await one_attempt(store, ChosenOutcome(outcome))
    assert ended.state == state and ended.attempts == attempts + 1, ended
    last = ended.attempt_history[-1]
    assert [a.number for a in ended.attempt_history] == list(range(1, attempts + 2))
    assert (last.error, last.transient, last.retried) == (outcome.reason, outcome.transient, retried)
    assert last.ended_at.seconds and last.started_at.seconds
    if state == pb.FAILED:
        assert outcome.reason in ended.error and ("(attempt" in ended.error) == (attempts > 0), ended.error
    else:
        assert f"attempt {attempts + 1} failed" in ended.progress.message, ended.progress


@pytest.mark.parametrize("policy, state, words", [
    ("policy", pb.QUEUED, "starting again"),              # a retraining job starts again without a checkpoint
    ("", pb.FAILED, "before its first checkpoint"),       # a submitted one is failed with the reason
])
async def test_ranks_gone_with_the_trainer(store: Store, policy: str, state: int, words: str) -> None:
    insert_job(store, policy=policy, state=pb.RUNNING, attempts=1)
    db = Database(store)
    runner = JobRunner(db, {"local": ChosenOutcome(KILLED)}, registry=None, progress=ProgressBook(1.0),
                       max_attempts=MAX_ATTEMPTS, on_change=lambda job_id: None)
    try:
        await runner.recover()
    finally:
        db.close()
    ended = job(store)
    assert ended.state == state
    assert words in (ended.error if state == pb.FAILED else ended.progress.message)
    assert ended.attempt_history[0].transient and ended.attempt_history[0].retried == (state == pb.QUEUED)
