"""Where job processes run: `local` (child processes of the trainer) or `kubernetes` (Indexed Jobs).

Both run the same command per rank (`JobConfig.argv`) and report the same way (progress on core
NATS, the result through the registry); they differ in how ranks are started, watched and stopped.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from splitstack_trainer.jobconfig import JobConfig


@dataclass(frozen=True)
class Outcome:
    """How a job's ranks ended: all succeeded, or the first failure's reason (and whether a new
    attempt may succeed: a rank killed by a signal, a peer unreachable, the job's processes gone)."""

    succeeded: bool
    reason: str = ""
    transient: bool = False


class Executor(Protocol):
    """What the job runner needs of an executor."""

    name: str
    capacity: int                    # jobs running at once

    def job_paths(self, job_id: str, dataset_sha256: str) -> tuple[Path, Path]:
        """(work dir, dataset path) as the job's ranks see them."""

    async def start(self, config: JobConfig) -> str:
        """Start every rank; return the handle to persist (JSON)."""

    async def wait(self, config: JobConfig, handle: str) -> Outcome:
        """Wait until the job's ranks ended (or the job ended on the cluster)."""

    async def cancel(self, config: JobConfig, handle: str) -> None:
        """Stop every rank; `wait` then returns."""

    async def recover(self, config: JobConfig, handle: str) -> bool:
        """After a trainer restart: True when the job still runs and `wait` can follow it; False when
        it is gone (leftovers are stopped) and the runner decides between resuming and failing."""

    def resumable(self, config: JobConfig) -> bool:
        """Whether a restarted attempt would resume (a checkpoint or complete outputs exist)."""

    async def close(self) -> None:
        """Release what the executor holds (the local one stops its processes)."""
