"""The serving service's settings: SPLITSTACK_SERVING_<FIELD>, read once at start.

Two ways to get models. With `SPLITSTACK_REGISTRY_ADDR` set, models come from the registry: each
entry of `models` ("name" or "name@alias", alias default `production`) is served at the version
its alias points at, and promotions are followed. Without it, models come from `model_dir`, a
Triton-style directory ("name" = highest version, or "name:version").

Batching defaults apply to every model unless its own config (config.pbtxt beside its versions,
or the `config` parameter of RepositoryModelLoad) says otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass

from splitstack.chassis.config import ChassisSettings, peer_addr

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

    @property
    def producer(self) -> str:
        """The producer stamped on event envelopes (service/instance)."""
        return f"{SERVICE}/{self.instance}"
