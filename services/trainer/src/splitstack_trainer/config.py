"""TrainerSettings: the trainer's one frozen settings object, read once from SPLITSTACK_TRAINER_*.

The job process reads a smaller object, `JobEnvironment`, from the platform-wide variables only
(`SPLITSTACK_NATS_URL`, `SPLITSTACK_REGISTRY_ADDR`, TLS and NATS credentials): a pod gets exactly
those from its manifest, a local job from its executor.
"""

from __future__ import annotations

import dataclasses
import sys

from splitstack.chassis.config import ChassisSettings, ConfigError, load_settings, peer_addr
from splitstack.contracts.names import InvalidName, check_name
from splitstack_trainer.overrides import parse_quantity
from splitstack_trainer.usercode import check_prefix

SERVICE_NAME = "trainer"
EXECUTORS = ("local", "kubernetes")


@dataclasses.dataclass(frozen=True)
class TrainerSettings(ChassisSettings):
    """Where jobs and policies live, how jobs run, and how the kubernetes executor reaches its cluster."""

    database_url: str = "sqlite:///trainer.db"   # or postgresql+psycopg://user:pw@host/db
    work_dir: str = "jobs"                       # local jobs: <work_dir>/jobs/<id>/, dataset cache <work_dir>/datasets/
    registry_addr: str = peer_addr("registry")   # SPLITSTACK_REGISTRY_ADDR, host:port
    registry_timeout_seconds: float = 120.0
    peer_retry_seconds: float = 120.0            # registry outages ridden out (service and job processes)
    profiles_dir: str = ""                       # extra training profiles (*.toml) beside the shipped ones
    default_executor: str = "local"
    default_profile: str = "cpu-local"
    default_max_epochs: int = 10
    default_required_targets: tuple[str, ...] = ("cpu",)
    code_version: str = ""                       # recorded in lineage; default: package versions
    max_local_jobs: int = 1                      # local jobs running at once (each may use every core)
    max_attempts: int = 3                        # starts of one job (a restart resumes from its checkpoint)
    job_python: str = ""                         # interpreter of local job processes (default: this one)
    progress_interval_seconds: float = 1.0       # how often rank zero reports between epoch ends
    cancel_grace_seconds: float = 10.0           # SIGTERM -> SIGKILL for a cancelled local job
    watch_poll_seconds: float = 1.0              # WatchJob re-reads the database this often
    retrain_tick_seconds: float = 0.25           # how often due retraining triggers are checked
    max_deliver: int = 5                         # data.updated work consumer
    ack_wait_seconds: float = 30.0
    relay_poll_seconds: float = 0.5
    # What a JobSpec may ask for: the operator's decision (usercode.py, overrides.py).
    allowed_module_prefixes: tuple[str, ...] = ()  # model code besides the built-in recipes (dotted prefixes)
    code_check_timeout_seconds: float = 120.0    # the child process that imports allowed code to check a spec
    max_code_checks: int = 2                     # such child processes at once
    override_max_nodes: int = 2                  # profile_override bounds: nodes,
    override_max_devices: int = 8                # devices per node,
    override_max_cpu: str = "16"                 # and per pod: CPU, memory (Kubernetes quantities), GPUs
    override_max_memory: str = "64Gi"
    override_max_gpus: int = 8
    # The kubernetes executor: enabled when a namespace and an image are set.
    kubernetes_namespace: str = ""
    kubernetes_image: str = ""
    kubernetes_api_url: str = ""                 # empty: in-cluster config, else ~/.kube/config
    kubernetes_pvc: str = "splitstack-training"  # shared storage for datasets and checkpoints
    kubernetes_mount_path: str = "/var/lib/splitstack"
    kubernetes_python: str = "python"            # the interpreter in the pod image
    kubernetes_service_account: str = ""
    kubernetes_master_port: int = 29500
    kubernetes_nats_url: str = ""                # NATS as pods reach it (default: nats_url)
    kubernetes_registry_addr: str = ""           # the registry as pods reach it (default: registry_addr)
    kubernetes_poll_seconds: float = 5.0
    max_kubernetes_jobs: int = 16

    def __post_init__(self) -> None:
        if not self.database_url:
            raise ConfigError("SPLITSTACK_TRAINER_DATABASE_URL must not be empty")
        if not self.registry_addr:
            raise ConfigError("SPLITSTACK_REGISTRY_ADDR must name the registry (host:port)")
        if self.default_executor not in EXECUTORS:
            raise ConfigError(f"SPLITSTACK_TRAINER_DEFAULT_EXECUTOR must be one of {EXECUTORS}, "
                              f"got {self.default_executor!r}")
        positive = {"max_local_jobs": self.max_local_jobs, "max_attempts": self.max_attempts,
                    "default_max_epochs": self.default_max_epochs, "max_deliver": self.max_deliver,
                    "max_kubernetes_jobs": self.max_kubernetes_jobs,
                    "progress_interval_seconds": self.progress_interval_seconds,
                    "watch_poll_seconds": self.watch_poll_seconds, "retrain_tick_seconds": self.retrain_tick_seconds,
                    "ack_wait_seconds": self.ack_wait_seconds, "kubernetes_poll_seconds": self.kubernetes_poll_seconds,
                    "registry_timeout_seconds": self.registry_timeout_seconds}
        for name, value in positive.items():
            if value <= 0:
                raise ConfigError(f"SPLITSTACK_TRAINER_{name.upper()} must be > 0, got {value}")
        if not 0 <= self.peer_retry_seconds < float("inf"):
            raise ConfigError(f"SPLITSTACK_TRAINER_PEER_RETRY_SECONDS must be >= 0, got {self.peer_retry_seconds}")
        try:
            for target in self.default_required_targets:
                check_name("default_required_targets", target)
        except InvalidName as exc:
            raise ConfigError(f"SPLITSTACK_TRAINER_DEFAULT_REQUIRED_TARGETS: {exc}") from None
        self._check_job_bounds()

    def _check_job_bounds(self) -> None:
        for name in ("code_check_timeout_seconds", "max_code_checks", "override_max_nodes", "override_max_devices"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"SPLITSTACK_TRAINER_{name.upper()} must be > 0, got {getattr(self, name)}")
        if self.override_max_gpus < 0:
            raise ConfigError(f"SPLITSTACK_TRAINER_OVERRIDE_MAX_GPUS must be >= 0, got {self.override_max_gpus}")
        try:
            for prefix in self.allowed_module_prefixes:
                check_prefix(prefix)
        except ValueError as exc:
            raise ConfigError(f"SPLITSTACK_TRAINER_ALLOWED_MODULE_PREFIXES: {exc}") from None
        for name in ("override_max_cpu", "override_max_memory"):
            try:
                parse_quantity(getattr(self, name))
            except ValueError as exc:
                raise ConfigError(f"SPLITSTACK_TRAINER_{name.upper()}: {exc}") from None

    @property
    def producer(self) -> str:
        """The producer name stamped on every event envelope (service/instance)."""
        return f"{SERVICE_NAME}/{self.instance}"

    @property
    def kubernetes_enabled(self) -> bool:
        return bool(self.kubernetes_namespace and self.kubernetes_image)

    @property
    def local_python(self) -> str:
        return self.job_python or sys.executable


@dataclasses.dataclass(frozen=True)
class JobEnvironment(ChassisSettings):
    """What a job process reads from its environment: NATS, the registry, TLS (shared variables only)."""

    registry_addr: str = peer_addr("registry")
    registry_timeout_seconds: float = 120.0


def load_trainer_settings(env: dict[str, str] | None = None) -> TrainerSettings:
    """Read TrainerSettings from `env` (default: the process environment)."""
    return load_settings(TrainerSettings, SERVICE_NAME, env)


def load_job_environment(env: dict[str, str] | None = None) -> JobEnvironment:
    """Read a job process's JobEnvironment (only platform-wide variables; its own prefix is unused)."""
    return load_settings(JobEnvironment, "trainerjob", env)
