"""The trainer's persistence on both backends (SQLite, PostgreSQL): jobs, unique keys, paging,
retraining triggers and policies, terminal states with their outbox event — and recovery decisions."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from splitstack.chassis.db import open_engine
from splitstack.chassis.outbox import Outbox
from splitstack.trainer.v1 import trainer_pb2 as pb
from splitstack_trainer import store as tables
from splitstack_trainer.executors import Outcome
from splitstack_trainer.feed import ProgressBook
from splitstack_trainer.jobconfig import JobConfig
from splitstack_trainer.jobs import finish_job
from splitstack_trainer.runner import JobRunner
from splitstack_trainer.store import Database, Store, utcnow


@pytest.fixture(params=["sqlite", "postgres"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    url = f"sqlite:///{tmp_path / 'trainer.db'}" if request.param == "sqlite" else request.getfixturevalue("postgres_url")
    engine = open_engine(url)
    store = Store(engine, Outbox(tables.outbox, "trainer/test"))
    store.create_schema()
    yield store
    engine.dispose()


def job_values(job_id: str, **values: object) -> dict:
    base = dict(id=job_id, model="digits", state=pb.QUEUED, executor="local", idempotency_key=None, trigger_key=None,
                retrain_policy="", spec=pb.JobSpec(model="digits").SerializeToString(), config="{}",
                model_version=0, error="", attempts=0, handle="", metrics="{}", created_at=utcnow())
    return {**base, **values}


def test_jobs_page_in_creation_order_and_keys_are_unique(store: Store) -> None:
    start = utcnow()
    store.write(lambda tx: [tx.insert_job(**job_values(f"job-{i}", created_at=start + dt.timedelta(seconds=i),
                                                       idempotency_key=f"key-{i}")) for i in range(5)])
    first = store.read(lambda tx: tx.job_page("", 0, None, 2))
    after = (tables.aware(first[-1].created_at), first[-1].id)
    second = store.read(lambda tx: tx.job_page("digits", pb.QUEUED, after, 10))
    assert [r.id for r in first] + [r.id for r in second] == [f"job-{i}" for i in range(5)]
    with pytest.raises(IntegrityError):
        store.write(lambda tx: tx.insert_job(**job_values("job-x", idempotency_key="key-1")))
    store.write(lambda tx: tx.insert_job(**job_values("job-t", trigger_key="t" * 40)))
    with pytest.raises(IntegrityError):
        store.write(lambda tx: tx.insert_job(**job_values("job-u", trigger_key="t" * 40)))


def test_a_terminal_state_commits_with_its_event_once(store: Store) -> None:
    store.write(lambda tx: tx.insert_job(**job_values("job-1", state=pb.RUNNING)))
    assert store.write(lambda tx: finish_job(tx, "job-1", pb.SUCCEEDED, version=3, metrics={"accuracy": 0.9}))
    assert not store.write(lambda tx: finish_job(tx, "job-1", pb.FAILED, error="late"))
    row = store.read(lambda tx: tx.job("job-1"))
    assert (row.state, row.model_version, json.loads(row.metrics)) == (pb.SUCCEEDED, 3, {"accuracy": 0.9})
    with store.engine.connect() as conn:
        events = conn.execute(select(tables.outbox.c.subject, tables.outbox.c.event_id)).all()
    assert events == [("training.finished.digits", "training.finished:job-1")]


def test_triggers_and_policy_bookkeeping(store: Store) -> None:
    now = utcnow()
    store.write(lambda tx: tx.put_policy("p", "digits", "d", b"x"))
    store.write(lambda tx: tx.insert_trigger(policy="p", dataset="d", dataset_version=2, dataset_sha256="a" * 64,
                                             trigger_key="k", event_id="e", first_seen_at=now,
                                             due_at=now + dt.timedelta(seconds=5)))
    assert store.read(lambda tx: tx.due_triggers(now)) == []
    assert [t.policy for t in store.read(lambda tx: tx.due_triggers(now + dt.timedelta(seconds=6)))] == ["p"]
    assert abs((store.read(lambda tx: tx.next_due()) - (now + dt.timedelta(seconds=5))).total_seconds()) < 0.01
    store.write(lambda tx: tx.mark_policy_started("p", 4))
    store.write(lambda tx: tx.mark_policy_started("p", 3))   # never goes back
    row = store.read(lambda tx: tx.policy("p"))
    assert row.last_dataset_version == 4 and row.last_started_at is not None
    assert store.write(lambda tx: tx.delete_policy("p")) and store.read(lambda tx: tx.trigger("p")) is None


class GoneExecutor:
    """An executor whose jobs are gone after a restart; `resumable` as configured."""

    name = "local"
    capacity = 1

    def __init__(self, resumable: bool) -> None:
        self._resumable = resumable

    async def recover(self, config: object, handle: str) -> bool:
        return False

    def resumable(self, config: object) -> bool:
        return self._resumable

    async def wait(self, config: object, handle: str) -> Outcome:
        return Outcome(False, "never called")


@pytest.mark.parametrize("resumable, attempts, state, words", [
    (True, 1, pb.QUEUED, "resuming from the last checkpoint"),
    (False, 1, pb.FAILED, "before its first checkpoint"),
    (True, 3, pb.FAILED, "all 3 attempts"),
])
async def test_recovery_requeues_or_fails_every_running_job(store: Store, resumable: bool, attempts: int,
                                                            state: int, words: str) -> None:
    config = JobConfig(
        job_id="job-1", model="digits", module="m:M", datamodule="m:D", module_hparams={}, datamodule_hparams={},
        profile={"name": "cpu-local", "nodes": 1, "devices": 1}, max_epochs=1, seed=0, dataset="d", dataset_version=1,
        dataset_sha256="0" * 64, dataset_size=1, dataset_path="/nowhere", work_dir="/nowhere", required_targets=[],
        primary_metric={}, promotion_policy=None, parent_version=0, code_version="test").to_json()
    store.write(lambda tx: tx.insert_job(**job_values("job-1", state=pb.RUNNING, attempts=attempts, config=config)))
    db = Database(store)
    runner = JobRunner(db, {"local": GoneExecutor(resumable)}, registry=None, progress=ProgressBook(1.0),
                       max_attempts=3, on_change=lambda job_id: None)
    try:
        await runner.recover()
    finally:
        db.close()
    row = store.read(lambda tx: tx.job("job-1"))
    assert row.state == state
    text = row.error if state == pb.FAILED else pb.Progress.FromString(row.progress).message
    assert words in text, text
