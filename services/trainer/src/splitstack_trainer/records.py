"""Rows to contract messages: `Job` and `RetrainPolicy` records, job ids, timestamps."""

from __future__ import annotations

import datetime as dt
import json
import uuid
from collections.abc import Sequence
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp

from splitstack.trainer.v1 import trainer_pb2 as pb
from splitstack_trainer.store import aware


def new_job_id() -> str:
    """A job id: obeys the naming rule and fits Kubernetes names (`train-<id>-<index>`)."""
    return f"job-{uuid.uuid4().hex[:16]}"


def timestamp(value: dt.datetime | None) -> Timestamp | None:
    if value is None:
        return None
    stamp = Timestamp()
    stamp.FromDatetime(aware(value))
    return stamp


def job_record(row: Any, progress: pb.Progress | None = None, attempts: Sequence[Any] = ()) -> pb.Job:
    """The Job of a `jobs` row with its `job_attempts` rows; `progress` (newer, held in memory)
    replaces the stored one."""
    spec = pb.JobSpec()
    spec.ParseFromString(row.spec)
    job = pb.Job(id=row.id, spec=spec, state=row.state, model_version=row.model_version, error=row.error,
                 attempts=row.attempts, retrain_policy=row.retrain_policy,
                 metrics={k: float(v) for k, v in json.loads(row.metrics or "{}").items()})
    if progress is not None:
        job.progress.CopyFrom(progress)
    elif row.progress:
        job.progress.ParseFromString(row.progress)
    for field in ("created_at", "started_at", "finished_at"):
        stamp = timestamp(getattr(row, field))
        if stamp is not None:
            getattr(job, field).CopyFrom(stamp)
    job.attempt_history.extend(attempt_record(a) for a in attempts)
    return job


def attempt_record(row: Any) -> pb.JobAttempt:
    attempt = pb.JobAttempt(number=row.number, error=row.error, transient=bool(row.transient),
                            retried=bool(row.retried))
    for field in ("started_at", "ended_at"):
        stamp = timestamp(getattr(row, field))
        if stamp is not None:
            getattr(attempt, field).CopyFrom(stamp)
    return attempt


def policy_record(row: Any) -> pb.RetrainPolicy:
    policy = pb.RetrainPolicy()
    policy.ParseFromString(row.record)
    return policy


def is_terminal(state: int) -> bool:
    return state in (pb.SUCCEEDED, pb.FAILED, pb.CANCELLED)
