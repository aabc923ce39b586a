"""`splitstack jobs` says why each attempt of a job that started more than once ended."""

from __future__ import annotations

from splitstack.client.commands.training import attempt_lines
from splitstack.trainer.v1 import trainer_pb2


def test_attempt_lines_name_each_attempts_end() -> None:
    job = trainer_pb2.Job(id="job-1", attempts=3)
    assert attempt_lines(job) == []
    first = job.attempt_history.add(number=1, error="the trainer stopped while the job ran", transient=True,
                                    retried=True)
    first.ended_at.GetCurrentTime()
    assert attempt_lines(job) == []   # one attempt: the job's own state and error say it all
    second = job.attempt_history.add(number=2, error="rank 0 exited with status 75: UNAVAILABLE from a peer",
                                     transient=True, retried=True)
    second.ended_at.GetCurrentTime()
    job.attempt_history.add(number=3)
    assert attempt_lines(job) == [
        "job-1 attempt 1: the trainer stopped while the job ran (transient, retried)",
        "job-1 attempt 2: rank 0 exited with status 75: UNAVAILABLE from a peer (transient, retried)",
        "job-1 attempt 3: running",
    ]
