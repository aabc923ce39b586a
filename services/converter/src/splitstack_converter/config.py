"""ConverterSettings: the converter's one frozen settings object, read once from SPLITSTACK_CONVERTER_*."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from splitstack.chassis.config import ChassisSettings, ConfigError, load_settings, peer_addr
from splitstack.contracts.names import InvalidName, check_name
from splitstack_converter.pipeline.isolation import MIB, ChildLimits
from splitstack_converter.pipeline.optimize import LEVELS

SERVICE_NAME = "converter"


@dataclasses.dataclass(frozen=True)
class ConverterSettings(ChassisSettings):
    """Which target this pool converts for, where its state lives, and how candidates are judged."""

    target: str = "cpu"                        # the inference target this pool serves (its hardware)
    targets_dir: str = ""                      # extra target files (*.toml) beside the shipped ones
    registry_addr: str = peer_addr("registry")  # SPLITSTACK_REGISTRY_ADDR, host:port
    database_url: str = "sqlite:///converter.db"
    work_dir: str = "work"                     # scratch space per conversion; engine cache below it
    engine_cache_dir: str = ""                 # default <work_dir>/engines
    # The accuracy gate's defaults (a model's labels and a request override them).
    max_metric_drop: float = 0.01              # metric units: 0.01 = 1 point of accuracy
    min_top1_agreement: float = 0.97
    calibration_rows: int = 512                # INT8 calibration uses at most this many sample rows
    optimization_level: str = "basic"          # ONNX Runtime offline optimization: basic | extended
    # Measurement: after warm-up, each point runs until min_runs runs or min_seconds, whichever first.
    profile_min_runs: int = 1000
    profile_min_seconds: float = 2.0
    profile_warmup_runs: int = 20
    ort_intra_op_threads: int = 1              # as the target's serving pool runs its sessions
    ort_inter_op_threads: int = 1
    switch_margin: float = 0.10                # leave FP32 only for at least this much improvement
    # Work intake and claims.
    concurrency: int = 1                       # conversions at once per replica (profiles need the machine)
    max_deliver: int = 5
    ack_wait_seconds: float = 60.0
    lease_seconds: float = 60.0                # a claim not renewed for this long may be taken over
    registry_timeout_seconds: float = 120.0
    registry_retry_seconds: float = 120.0      # how long a call keeps retrying UNAVAILABLE / DEADLINE_EXCEEDED
    watch_poll_seconds: float = 0.5
    # Children that load untrusted bytes (see pipeline.isolation): time and memory limits.
    load_timeout_seconds: float = 300.0        # loading the exported program and exporting it to ONNX
    child_timeout_seconds: float = 300.0       # each ONNX Runtime child: optimize, quantize, gate (+ profile floors)
    child_memory_mib: int = 8192               # address-space limit of every child; 0: none
    allow_pickled_programs: bool = False       # let torch unpickle arbitrary objects while loading a program
    relay_poll_seconds: float = 0.5

    def __post_init__(self) -> None:
        try:
            check_name("SPLITSTACK_CONVERTER_TARGET", self.target)
        except InvalidName as exc:
            raise ConfigError(str(exc)) from None
        if self.optimization_level not in LEVELS:
            raise ConfigError(f"SPLITSTACK_CONVERTER_OPTIMIZATION_LEVEL must be one of {sorted(LEVELS)}")
        positive = {"profile_min_runs": self.profile_min_runs, "profile_min_seconds": self.profile_min_seconds,
                    "calibration_rows": self.calibration_rows, "concurrency": self.concurrency,
                    "max_deliver": self.max_deliver, "ack_wait_seconds": self.ack_wait_seconds,
                    "lease_seconds": self.lease_seconds, "watch_poll_seconds": self.watch_poll_seconds,
                    "relay_poll_seconds": self.relay_poll_seconds, "ort_intra_op_threads": self.ort_intra_op_threads,
                    "ort_inter_op_threads": self.ort_inter_op_threads,
                    "registry_timeout_seconds": self.registry_timeout_seconds,
                    "load_timeout_seconds": self.load_timeout_seconds,
                    "child_timeout_seconds": self.child_timeout_seconds}
        for name, value in positive.items():
            if value <= 0:
                raise ConfigError(f"SPLITSTACK_CONVERTER_{name.upper()} must be > 0, got {value}")
        if self.profile_warmup_runs < 0 or not 0 <= self.switch_margin < 1:
            raise ConfigError("SPLITSTACK_CONVERTER_PROFILE_WARMUP_RUNS must be >= 0 and "
                              "SPLITSTACK_CONVERTER_SWITCH_MARGIN in [0, 1)")
        if not 0 <= self.min_top1_agreement <= 1 or self.max_metric_drop < 0:
            raise ConfigError("SPLITSTACK_CONVERTER_MIN_TOP1_AGREEMENT must be in [0, 1] and "
                              "SPLITSTACK_CONVERTER_MAX_METRIC_DROP >= 0")
        if self.child_memory_mib < 0 or self.registry_retry_seconds < 0:
            raise ConfigError("SPLITSTACK_CONVERTER_CHILD_MEMORY_MIB and SPLITSTACK_CONVERTER_REGISTRY_RETRY_SECONDS "
                              "must be >= 0")
        if not self.registry_addr:
            raise ConfigError("SPLITSTACK_REGISTRY_ADDR (the registry's host:port) is not set")

    @property
    def producer(self) -> str:
        """The producer stamped on event envelopes (service/instance)."""
        return f"{SERVICE_NAME}/{self.instance}"

    def child_limits(self, timeout_seconds: float, gpu: bool = False) -> ChildLimits:
        """The limits of one child process that runs for at most `timeout_seconds`. On GPU pools the
        address-space limit is not applied: CUDA reserves more virtual memory than any sensible limit
        (the container's memory limit still holds)."""
        return ChildLimits(timeout_seconds, 0 if gpu else self.child_memory_mib * MIB)

    @property
    def engine_cache(self) -> Path:
        return Path(self.engine_cache_dir) if self.engine_cache_dir else Path(self.work_dir) / "engines"


def load_converter_settings(env: dict[str, str] | None = None) -> ConverterSettings:
    """Read ConverterSettings from `env` (default: the process environment)."""
    return load_settings(ConverterSettings, SERVICE_NAME, env)
