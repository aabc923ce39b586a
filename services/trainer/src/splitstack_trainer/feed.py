"""Who learns about job changes, and how progress is kept.

`JobFeed` hands every new `Job` snapshot to the WatchJob streams of that job in this process (a
watcher that falls behind keeps only the newest snapshots). `ProgressBook` keeps the latest
`Progress` of each running job in memory (what GetJob and WatchJob show) and decides when it is
also written to the database: at most once per `persist_seconds` per job during an epoch, at
once when the stage changes, and with the job's terminal state.
"""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict

from splitstack.trainer.v1 import trainer_pb2 as pb

WATCH_QUEUE = 16


class JobFeed:
    """Fan-out of job snapshots to the watchers of each job."""

    def __init__(self) -> None:
        self._watchers: dict[str, set[asyncio.Queue[pb.Job]]] = defaultdict(set)

    def subscribe(self, job_id: str) -> asyncio.Queue[pb.Job]:
        queue: asyncio.Queue[pb.Job] = asyncio.Queue(WATCH_QUEUE)
        self._watchers[job_id].add(queue)
        return queue

    def unsubscribe(self, job_id: str, queue: asyncio.Queue[pb.Job]) -> None:
        watchers = self._watchers.get(job_id)
        if watchers is not None:
            watchers.discard(queue)
            if not watchers:
                del self._watchers[job_id]

    def publish(self, job: pb.Job) -> None:
        for queue in self._watchers.get(job.id, ()):
            if queue.full():
                queue.get_nowait()  # a slow watcher keeps the newest snapshots
            queue.put_nowait(job)

    def watched(self, job_id: str) -> bool:
        return bool(self._watchers.get(job_id))


class ProgressBook:
    """The latest progress of each running job, and when to persist it."""

    def __init__(self, persist_seconds: float) -> None:
        self._persist_seconds = persist_seconds
        self._latest: dict[str, pb.Progress] = {}
        self._persisted: dict[str, tuple[float, str]] = {}

    def note(self, progress: pb.Progress) -> bool:
        """Record `progress`; True when it should be written to the database now."""
        self._latest[progress.job_id] = progress
        last_at, last_stage = self._persisted.get(progress.job_id, (0.0, ""))
        now = time.monotonic()
        if progress.stage != last_stage or now - last_at >= self._persist_seconds:
            self._persisted[progress.job_id] = (now, progress.stage)
            return True
        return False

    def latest(self, job_id: str) -> pb.Progress | None:
        return self._latest.get(job_id)

    def forget(self, job_id: str) -> pb.Progress | None:
        """Drop a finished job's entry; return its last progress."""
        self._persisted.pop(job_id, None)
        return self._latest.pop(job_id, None)
