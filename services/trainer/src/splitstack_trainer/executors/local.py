"""The local executor: each job's ranks as child processes of the trainer, bounded in number.

A job with a profile of N nodes runs N processes of the job command, given the variables an
Indexed Job gives its pods (`MASTER_ADDR=127.0.0.1`, a free `MASTER_PORT`, `NODE_RANK`,
`WORLD_SIZE`), so multi-node DDP runs on one machine exactly as on a cluster (gloo on CPU).
Each rank leads its own process group (a cancel kills the whole group, Lightning's own children
included) and carries `SPLITSTACK_JOB_SUPERVISOR_PID`, by which it arms PR_SET_PDEATHSIG: when the
trainer dies, its jobs die with it, and the restarted trainer resumes them from their checkpoints.
Rank output is appended to `<work_dir>/rank-<n>.log`; a failed rank's `job failed:` line (or last
line) becomes the job's error, and the other ranks are stopped.

Nothing a job writes can be imported by another: every rank runs in its own job's directory with
`PYTHONSAFEPATH=1` (neither that directory nor any other current directory is on its import path),
and the inherited `PYTHONPATH` keeps only absolute entries outside the trainer's work directory.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path

from splitstack_trainer.config import TrainerSettings
from splitstack_trainer.executors import Outcome
from splitstack_trainer.jobconfig import (FAILURE_PREFIX, JOB_PYTHON_ENV, LAST_CHECKPOINT, RESULT_FILE,
                                          SUPERVISOR_ENV, TRANSIENT_EXIT_STATUS, JobConfig)
from splitstack_trainer.usercode import import_roots

log = logging.getLogger(__name__)

OWN_SETTINGS_PREFIX = "SPLITSTACK_TRAINER_"
TAIL_BYTES = 16 * 1024


@dataclass
class Rank:
    """One running rank: its process and where this attempt's output starts in its log."""

    number: int
    process: asyncio.subprocess.Process
    log_path: Path
    log_offset: int


class LocalExecutor:
    """Runs job ranks as local processes."""

    name = "local"

    def __init__(self, settings: TrainerSettings) -> None:
        self.capacity = settings.max_local_jobs
        self._root = Path(settings.work_dir).resolve()
        self._python = settings.local_python
        self._grace = settings.cancel_grace_seconds
        self._platform_env = {"SPLITSTACK_NATS_URL": settings.nats_url,
                              "SPLITSTACK_REGISTRY_ADDR": settings.registry_addr}
        self._running: dict[str, list[Rank]] = {}

    def job_paths(self, job_id: str, dataset_sha256: str) -> tuple[Path, Path]:
        return self._root / "jobs" / job_id, self._root / "datasets" / f"{dataset_sha256}.npz"

    def _environment(self, config: JobConfig, rank: int, master_port: int) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(OWN_SETTINGS_PREFIX)}
        env.update(self._platform_env)
        env[SUPERVISOR_ENV] = str(os.getpid())
        env.update(JOB_PYTHON_ENV)
        roots = import_roots(env.pop("PYTHONPATH", ""), self._root)
        if roots:
            env["PYTHONPATH"] = os.pathsep.join(roots)
        if config.world_size > 1:
            env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(master_port), NODE_RANK=str(rank),
                       WORLD_SIZE=str(config.world_size))
        return env

    async def start(self, config: JobConfig) -> str:
        work_dir = Path(config.work_dir)
        work_dir.mkdir(parents=True, exist_ok=True)
        nodes = config.training_profile.nodes
        master_port = free_port() if config.world_size > 1 else 0
        ranks: list[Rank] = []
        try:
            for number in range(nodes):
                ranks.append(await self._spawn(config, number, master_port, work_dir))
        except BaseException:
            await self._stop(ranks, grace=0.0)
            raise
        self._running[config.job_id] = ranks
        log.info("job %s: started %d rank(s), pids %s", config.job_id, nodes, [r.process.pid for r in ranks])
        return json.dumps({"pids": [r.process.pid for r in ranks]})

    async def _spawn(self, config: JobConfig, number: int, master_port: int, work_dir: Path) -> Rank:
        log_path = work_dir / f"rank-{number}.log"
        with open(log_path, "ab") as out:
            offset = out.tell()
            process = await asyncio.create_subprocess_exec(
                *config.argv(self._python), env=self._environment(config, number, master_port), cwd=work_dir,
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        return Rank(number, process, log_path, offset)

    async def wait(self, config: JobConfig, handle: str) -> Outcome:
        ranks = self._running.get(config.job_id)
        if ranks is None:
            return Outcome(False, "the job's processes are not running in this trainer", transient=True)
        try:
            return await self._first_failure(ranks)
        finally:
            await self._stop(ranks, grace=0.0)
            self._running.pop(config.job_id, None)

    async def _first_failure(self, ranks: list[Rank]) -> Outcome:
        waits = {asyncio.ensure_future(r.process.wait()): r for r in ranks}
        pending = set(waits)
        while pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                rank = waits[task]
                if task.result() != 0:
                    for other in pending:
                        other.cancel()
                    return Outcome(False, _failure_reason(rank), transient=_transient_end(rank))
        return Outcome(True)

    async def cancel(self, config: JobConfig, handle: str) -> None:
        ranks = self._running.get(config.job_id, [])
        await self._stop(ranks, grace=self._grace)

    async def _stop(self, ranks: list[Rank], grace: float) -> None:
        """SIGTERM each rank's process group; SIGKILL whatever is left after `grace` seconds."""
        live = [r for r in ranks if r.process.returncode is None]
        for rank in live:
            _signal_group(rank.process.pid, signal.SIGTERM if grace > 0 else signal.SIGKILL)
        if live and grace > 0:
            await asyncio.wait([asyncio.ensure_future(r.process.wait()) for r in live], timeout=grace)
        for rank in ranks:
            _signal_group(rank.process.pid, signal.SIGKILL)  # also Lightning's children of a finished rank
        for rank in live:
            try:
                await asyncio.wait_for(rank.process.wait(), 5.0)
            except TimeoutError:
                log.error("rank %d (pid %d) survived SIGKILL for 5 s", rank.number, rank.process.pid)

    async def recover(self, config: JobConfig, handle: str) -> bool:
        """Local processes never outlive their trainer on purpose: stop any leftover, never adopt."""
        pids = json.loads(handle).get("pids", []) if handle else []
        for pid in pids:
            if _runs_job(pid, config.job_id):
                log.warning("job %s: stopping leftover rank process group %d", config.job_id, pid)
                _signal_group(pid, signal.SIGKILL)
        return False

    def resumable(self, config: JobConfig) -> bool:
        return (config.checkpoint_dir / LAST_CHECKPOINT).is_file() or (config.outputs_dir / RESULT_FILE).is_file()

    async def close(self) -> None:
        for job_id, ranks in list(self._running.items()):
            log.info("job %s: stopping its ranks (the trainer stops)", job_id)
            await self._stop(ranks, grace=0.0)


def free_port() -> int:
    """A TCP port free right now on the loopback interface (the ranks' rendezvous)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _signal_group(pid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _runs_job(pid: int, job_id: str) -> bool:
    try:
        return job_id.encode() in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def _transient_end(rank: Rank) -> bool:
    """Killed by a signal, or gave up on an unreachable peer: a new attempt may succeed."""
    code = rank.process.returncode
    return code is not None and (code < 0 or code == TRANSIENT_EXIT_STATUS)


def _failure_reason(rank: Rank) -> str:
    code = rank.process.returncode
    how = (f"was killed by {signal.Signals(-code).name}" if code is not None and code < 0
           else f"exited with status {code}")
    line = _last_words(rank.log_path, rank.log_offset, failure_only=code is not None and code < 0)
    return f"rank {rank.number} {how}" + (f": {line}" if line else "")


def _last_words(path: Path, offset: int, failure_only: bool) -> str:
    """The rank's `job failed:` line of this attempt, else (unless `failure_only`) its last line."""
    try:
        with open(path, "rb") as source:
            source.seek(max(offset, path.stat().st_size - TAIL_BYTES))
            lines = [ln.strip() for ln in source.read().decode(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    for line in reversed(lines):
        if line.startswith(FAILURE_PREFIX):
            return line[len(FAILURE_PREFIX):]
    return lines[-1][-500:] if lines and not failure_only else ""
