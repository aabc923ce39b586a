"""Service processes for black-box tests: start a `splitstack-*` console script as a subprocess on a free
gRPC port, wait for its ready file, stop or kill it, read its log and the crash markers it left.

Only the SPLITSTACK_* variables a test passes reach the process (the caller's own are dropped), so a test
sees exactly the configuration it wrote. Output goes to `<run_dir>/<name>.log`, appended across restarts.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from splitstack.chassis.faults import crash_env, crash_point_hit
from splitstack.chassis.testing.servers import find_binary

READY_TIMEOUT_SECONDS = 60.0
STOP_TIMEOUT_SECONDS = 20.0
LOG_TAIL_CHARS = 8000
READY_POLL_SECONDS = 0.05


@dataclass
class ServiceProcess:
    """One running (or dead) service process started by a test; `port` is 0 until it is ready."""

    name: str
    proc: subprocess.Popen
    port: int
    log_path: Path
    marker_dir: Path | None = None
    ready_file: Path | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def crashed_at(self, point: str) -> bool:
        """Whether the process reached crash point `point` (and died there)."""
        return self.marker_dir is not None and crash_point_hit(self.marker_dir, point)

    def stop(self, timeout: float = STOP_TIMEOUT_SECONDS) -> int:
        """SIGTERM and wait (SIGKILL after `timeout`); the exit status."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout)
        return self.proc.returncode

    def kill(self, timeout: float = STOP_TIMEOUT_SECONDS) -> int:
        """SIGKILL and wait; the exit status."""
        if self.proc.poll() is None:
            self.proc.kill()
        return self.proc.wait(timeout)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def wait_ready(self, timeout: float = READY_TIMEOUT_SECONDS) -> ServiceProcess:
        """Wait for the ready file and take the gRPC port from it; fail with the log tail if the process
        exits first or `timeout` passes (then it is killed)."""
        if self.ready_file is None:
            raise ValueError(f"{self.name} was not started with a ready file")
        deadline = time.monotonic() + timeout
        while not self.ready_file.exists():
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode} before it was ready; log:\n"
                                   f"{self.log()[-LOG_TAIL_CHARS:]}")
            if time.monotonic() > deadline:
                self.kill()
                raise TimeoutError(f"{self.name} not ready within {timeout}s; log:\n{self.log()[-LOG_TAIL_CHARS:]}")
            time.sleep(READY_POLL_SECONDS)
        self.port = json.loads(self.ready_file.read_text())["grpc_port"]
        return self


def env_prefix(command: str) -> str:
    """`splitstack-converter` -> `SPLITSTACK_CONVERTER`: the prefix of the service's own settings."""
    return Path(command).name.replace("-", "_").upper()


def launch_service(command: str, name: str, run_dir: Path, env: Mapping[str, str], *, cwd: Path | None = None,
                   crash_points: Iterable[str] = ()) -> ServiceProcess:
    """Start console script `command` without waiting for it (see `ServiceProcess.wait_ready`).

    The service listens on a free gRPC port unless `env` names one, and arms `crash_points`."""
    run_dir.mkdir(parents=True, exist_ok=True)
    workdir = cwd if cwd is not None else run_dir
    workdir.mkdir(parents=True, exist_ok=True)
    ready, log_path = run_dir / f"{name}.ready.json", run_dir / f"{name}.log"
    ready.unlink(missing_ok=True)
    prefix = env_prefix(command)
    full = {k: v for k, v in os.environ.items() if not k.startswith("SPLITSTACK_")}
    full[f"{prefix}_GRPC_PORT"] = "0"
    full.update(env)
    full["PYTHONUNBUFFERED"] = "1"
    full[f"{prefix}_READY_FILE"] = str(ready)
    marker_dir = None
    points = list(crash_points)
    if points:
        marker_dir = run_dir / f"markers-{name}"
        marker_dir.mkdir(exist_ok=True)
        full.update(crash_env(points, marker_dir))
    with open(log_path, "ab") as log:
        log.write(f"---- start {name} ----\n".encode())
        log.flush()
        proc = subprocess.Popen([find_binary(command)], env=full, cwd=workdir, stdin=subprocess.DEVNULL,
                                stdout=log, stderr=subprocess.STDOUT)
    return ServiceProcess(name, proc, 0, log_path, marker_dir, ready)


def spawn_service(command: str, name: str, run_dir: Path, env: Mapping[str, str], *, cwd: Path | None = None,
                  crash_points: Iterable[str] = (), ready_timeout: float = READY_TIMEOUT_SECONDS) -> ServiceProcess:
    """Start console script `command` (see `launch_service`) and wait until it is ready."""
    process = launch_service(command, name, run_dir, env, cwd=cwd, crash_points=crash_points)
    return process.wait_ready(ready_timeout)
