"""The end-to-end stack: a real nats-server with JetStream and the four services as `splitstack-*`
processes (registry, trainer, cpu converter pool, cpu serving), each on SQLite / local files under one
root directory, reached only through their contracts.

Every port is picked once and kept, so a service (or nats-server, on the same store directory) that a
test kills can be restarted where its peers expect it. Serving follows every model of the stack's
`models` at its `production` alias; it is ready only once all of them are served, so the stack waits
for its gRPC port instead of its ready file. The settings mirror `deploy/local/stack.toml`, with the
polls, measurement floors, leases and ack waits shortened for tests.
"""

from __future__ import annotations

import logging
import subprocess
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from splitstack.chassis.testing.processes import ServiceProcess, launch_service
from splitstack.chassis.testing.servers import NatsServer, free_port, start_nats, wait_for_port

log = logging.getLogger(__name__)
T = TypeVar("T")

SERVICES = ("registry", "trainer", "converter", "serving")
START_TIMEOUT_SECONDS = 120.0
EXIT_TIMEOUT_SECONDS = 240.0

FAST_ENV = {
    "registry": {"SPLITSTACK_REGISTRY_RELAY_POLL_SECONDS": "0.2", "SPLITSTACK_REGISTRY_SHUTDOWN_GRACE_SECONDS": "5"},
    "trainer": {"SPLITSTACK_TRAINER_PROGRESS_INTERVAL_SECONDS": "0.5", "SPLITSTACK_TRAINER_WATCH_POLL_SECONDS": "0.3",
                "SPLITSTACK_TRAINER_RETRAIN_TICK_SECONDS": "0.2", "SPLITSTACK_TRAINER_RELAY_POLL_SECONDS": "0.2",
                "SPLITSTACK_TRAINER_SHUTDOWN_GRACE_SECONDS": "5", "SPLITSTACK_TRAINER_DEFAULT_MAX_EPOCHS": "3"},
    "converter": {"SPLITSTACK_CONVERTER_TARGET": "cpu", "SPLITSTACK_CONVERTER_PROFILE_MIN_RUNS": "30",
                  "SPLITSTACK_CONVERTER_PROFILE_MIN_SECONDS": "0.1", "SPLITSTACK_CONVERTER_PROFILE_WARMUP_RUNS": "3",
                  "SPLITSTACK_CONVERTER_ACK_WAIT_SECONDS": "5", "SPLITSTACK_CONVERTER_LEASE_SECONDS": "5",
                  "SPLITSTACK_CONVERTER_RELAY_POLL_SECONDS": "0.2", "SPLITSTACK_CONVERTER_WATCH_POLL_SECONDS": "0.2",
                  "SPLITSTACK_CONVERTER_SHUTDOWN_GRACE_SECONDS": "5"},
    "serving": {"SPLITSTACK_SERVING_TARGET": "cpu", "SPLITSTACK_SERVING_SHUTDOWN_GRACE_SECONDS": "5",
                "SPLITSTACK_SERVING_REGISTRY_TIMEOUT_SECONDS": "10"},
}


@dataclass
class Stack:
    """NATS and the services of one end-to-end run, started, killed and restarted by the tests."""

    root: Path
    models: list[str]
    ports: dict[str, int] = field(default_factory=dict)
    nats: NatsServer | None = None
    current: dict[str, ServiceProcess] = field(default_factory=dict)
    started: list[ServiceProcess] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.ports = {name: free_port() for name in ("nats", *SERVICES)}

    @property
    def nats_url(self) -> str:
        return f"nats://127.0.0.1:{self.ports['nats']}"

    def address(self, service: str) -> str:
        return f"127.0.0.1:{self.ports[service]}"

    def start_nats(self) -> NatsServer:
        """nats-server -js on the stack's port and store directory (a restart finds its streams)."""
        self.nats = start_nats(self.root / "nats", port=self.ports["nats"], log_path=self.root / "nats" / "nats.log")
        return self.nats

    def kill_nats(self) -> int:
        """SIGKILL nats-server; its exit status."""
        assert self.nats is not None
        self.nats.kill()
        return self.nats.proc.returncode

    def environment(self, service: str) -> dict[str, str]:
        """What `splitstack up` would give `service`, on this stack's ports and state directory."""
        data = self.root / service
        prefix = f"SPLITSTACK_{service.upper()}"
        env = {"SPLITSTACK_NATS_URL": self.nats_url, f"{prefix}_GRPC_PORT": str(self.ports[service]),
               f"{prefix}_INSTANCE": f"{service}-e2e", **FAST_ENV[service]}
        if service != "registry":
            env["SPLITSTACK_REGISTRY_ADDR"] = self.address("registry")
        env.update({
            "registry": {"SPLITSTACK_REGISTRY_DATABASE_URL": f"sqlite:///{data / 'registry.db'}",
                         "SPLITSTACK_REGISTRY_ARTIFACT_DIR": str(data / "artifacts")},
            "trainer": {"SPLITSTACK_TRAINER_DATABASE_URL": f"sqlite:///{data / 'trainer.db'}",
                        "SPLITSTACK_TRAINER_WORK_DIR": str(data / "jobs")},
            "converter": {"SPLITSTACK_CONVERTER_DATABASE_URL": f"sqlite:///{data / 'converter.db'}",
                          "SPLITSTACK_CONVERTER_WORK_DIR": str(data / "work")},
            "serving": {"SPLITSTACK_SERVING_CACHE_DIR": str(data / "models"),
                        "SPLITSTACK_SERVING_MODELS": ",".join(self.models)},
        }[service])
        return env

    def launch(self, service: str, crash_points: Iterable[str] = (), **extra: str) -> ServiceProcess:
        """Start `service` (a new process on its fixed port) without waiting for it."""
        count = sum(1 for p in self.started if p.name.startswith(f"{service}-")) + 1
        process = launch_service(f"splitstack-{service}", f"{service}-{count}", self.root / "run",
                                 {**self.environment(service), **extra}, cwd=self.root / service,
                                 crash_points=crash_points)
        self.started.append(process)
        self.current[service] = process
        return process

    def wait_up(self, service: str, timeout: float = START_TIMEOUT_SECONDS) -> ServiceProcess:
        """Wait until the current `service` process listens (serving: its port; others: the ready file)."""
        process = self.current[service]
        if service != "serving":
            return process.wait_ready(timeout)
        wait_for_port("127.0.0.1", self.ports["serving"], timeout, process.proc)
        process.port = self.ports["serving"]
        return process

    def start(self, service: str, crash_points: Iterable[str] = (), **extra: str) -> ServiceProcess:
        """Launch `service` and wait until it is up."""
        self.launch(service, crash_points, **extra)
        return self.wait_up(service)

    def start_all(self, services: Iterable[str] = SERVICES, crash_points: Mapping[str, Iterable[str]] | None = None,
                  before: Callable[[], object] | None = None) -> None:
        """NATS, then the registry, then the other `services` at once (they need the registry's port only).
        `before()`, when given, runs once the registry is up and before the converter is launched."""
        points = dict(crash_points or {})
        self.start_nats()
        wanted = list(services)
        if "registry" in wanted:
            self.start("registry", points.get("registry", ()))
        others = sorted((s for s in wanted if s != "registry"), key=lambda s: s == "converter")
        for service in others:
            if service == "converter" and before is not None:
                before()
            self.launch(service, points.get(service, ()))
        for service in others:
            self.wait_up(service)

    def wait_killed(self, service: str, point: str, timeout: float = EXIT_TIMEOUT_SECONDS) -> ServiceProcess:
        """Wait for the current `service` process to die at crash point `point` (asserted)."""
        process = self.current[service]
        try:
            process.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{process.name} did not reach crash point {point} within {timeout}s") from None
        assert process.crashed_at(point), f"{process.name} exited ({process.proc.returncode}) without reaching {point}"
        assert process.proc.returncode == -9, f"{process.name} exit status {process.proc.returncode}, not SIGKILL"
        return process

    def alive(self) -> None:
        """Assert every current process is still running."""
        for process in self.current.values():
            assert process.proc.poll() is None, f"{process.name} died (rc {process.proc.returncode})"

    def log_files(self) -> list[tuple[str, Path]]:
        """Every log of this stack (SERVICE_LOGS hook): processes, nats-server, training ranks."""
        files = [(p.name, p.log_path) for p in self.started]
        files.append(("nats-server", self.root / "nats" / "nats.log"))
        ranks = sorted((self.root / "trainer").glob("jobs/jobs/*/rank-*.log"))
        files += [(f"rank {p.parent.name}/{p.name}", p) for p in ranks]
        return files

    def stop(self) -> None:
        """SIGTERM every live process at once, wait for each (SIGKILL after a grace), then stop nats-server."""
        live = [p for p in self.started if p.proc.poll() is None]
        for process in live:
            process.proc.terminate()
        for process in live:
            try:
                process.stop(timeout=15)
            except Exception:  # noqa: BLE001 - teardown goes on for the others
                log.exception("stopping %s failed", process.name)
        if self.nats is not None:
            self.nats.stop()


def wait_until(check: Callable[[], T], timeout: float, what: str, pause: float = 0.2) -> T:
    """Poll `check()` until it returns something truthy (returned); AssertionError naming `what` after
    `timeout` (with the last AssertionError `check` raised, if any)."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            result = check()
        except AssertionError as exc:
            result, last_error = None, exc
        if result:
            return result
        time.sleep(pause)
    detail = f": {last_error}" if last_error else ""
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}{detail}")
