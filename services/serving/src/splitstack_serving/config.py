"""The serving service's settings: SPLITSTACK_SERVING_<FIELD>, read once at start.

Two ways to get models. With `SPLITSTACK_REGISTRY_ADDR` set, models come from the registry: each
entry of `models` ("name" or "name@alias", alias default `production`) is served at the version
its alias points at, and promotions are followed. Without it, models come from `model_dir`, a
Triton-style directory ("name" = highest version, or "name:version").

Batching defaults apply to every model unless its own config (config.pbtxt beside its versions,
or the `config` parameter of RepositoryModelLoad) says otherwise. What a client may ask for is
capped (`load_max_*`, `max_versions_per_model`, `max_loaded_models`, `stream_max_*`), and so is the
artifact cache (`cache_max_bytes`).
"""

from __future__ import annotations

from dataclasses import dataclass

from splitstack.chassis.config import ChassisSettings, ConfigError, peer_addr

SERVICE = "serving"


@dataclass(frozen=True)
class ServingSettings(ChassisSettings):
    """Settings of one serving process."""

    registry_addr: str = peer_addr("registry")  # SPLITSTACK_REGISTRY_ADDR; set: models come from the registry
    models: tuple[str, ...] = ()           # registry: "name" or "name@alias" (followed); directory: "name" (highest
                                           # version) or "name:version", a model listed twice keeps both
    model_dir: str = "models"              # directory mode: <model_dir>/<name>/<version>/model.onnx (Triton-style)
    cache_dir: str = "model-cache"         # registry mode: downloaded artifacts, <cache_dir>/sha256/<digest>/model.onnx
    target: str = "cpu"                    # the hardware target served (its serving choice is loaded); "cpu" uses
                                           # ONNX Runtime's CPU provider
    registry_timeout_seconds: float = 30.0   # deadline of each registry lookup (alias, version)
    download_timeout_seconds: float = 600.0  # deadline of one artifact download
    ort_intra_op_threads: int = 1          # threads inside one model run
    ort_inter_op_threads: int = 1          # threads across independent graph nodes
    model_instances: int = 1               # model runs of one version computing at once
    batching: bool = True                  # False: every request runs alone
    max_batch_size: int = 64               # rows per model run and per request
    max_queue_delay_us: int = 500          # how long the oldest queued request waits for a fuller batch
    max_queue_size: int = 1024             # queued requests per version before RESOURCE_EXHAUSTED
    release_timeout_seconds: float = 30.0  # how long a replaced version waits for its requests
    # Bounds on what clients can make this process hold (see limits.py, streams.py, cache.py).
    load_max_batch_size: int = 1024        # RepositoryModelLoad `config`: max_batch_size at most this
    load_max_queue_size: int = 8192        # ... dynamic_batching.default_queue_policy.max_queue_size at most this
    load_max_queue_delay_us: int = 1_000_000  # ... dynamic_batching.max_queue_delay_microseconds at most this
    load_max_instances: int = 8            # ... instance_group[*].count at most this
    max_versions_per_model: int = 4        # loaded versions of one model; the oldest spare ones are unloaded
    max_loaded_models: int = 64            # models loaded at once (followed models always have a slot)
    stream_max_pending: int = 64           # ModelStreamInfer: requests of one stream computing or unsent
    stream_max_pending_bytes: int = 64 * 1024 * 1024  # ... bytes of one stream's computed, unsent answers
    cache_max_bytes: int = 16 * 1024 ** 3  # registry mode: artifact cache size (LRU; loaded ones stay); 0 = no bound
    registry_retry_seconds: float = 20.0   # how long one registry call is retried while it fails transiently

    def __post_init__(self) -> None:
        positive = ("load_max_batch_size", "load_max_instances", "max_versions_per_model", "max_loaded_models",
                    "stream_max_pending", "stream_max_pending_bytes")
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"SPLITSTACK_SERVING_{name.upper()} must be at least 1, got {getattr(self, name)}")
        for name in ("load_max_queue_size", "load_max_queue_delay_us", "cache_max_bytes", "registry_retry_seconds"):
            if getattr(self, name) < 0:
                raise ConfigError(f"SPLITSTACK_SERVING_{name.upper()} must not be negative, got {getattr(self, name)}")

    @property
    def producer(self) -> str:
        """The producer stamped on event envelopes (service/instance)."""
        return f"{SERVICE}/{self.instance}"
