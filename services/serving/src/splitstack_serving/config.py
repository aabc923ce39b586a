"""The serving service's settings: SPLITSTACK_SERVING_<FIELD>, read once at start.

Batching defaults apply to every model unless its own config (config.pbtxt beside its versions,
or the `config` parameter of RepositoryModelLoad) says otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass

from splitstack.chassis.config import ChassisSettings

SERVICE = "serving"


@dataclass(frozen=True)
class ServingSettings(ChassisSettings):
    """Settings of one serving process."""

    model_dir: str = "models"              # <model_dir>/<name>/<version>/model.onnx (Triton-style)
    models: tuple[str, ...] = ()           # loaded at start: "name" (highest version) or "name:version";
                                           # a model listed twice keeps both, the last listed is current
    target: str = "cpu"                    # the hardware target served; "cpu" uses ONNX Runtime's CPU provider
    ort_intra_op_threads: int = 1          # threads inside one model run
    ort_inter_op_threads: int = 1          # threads across independent graph nodes
    model_instances: int = 1               # model runs of one version computing at once
    batching: bool = True                  # False: every request runs alone
    max_batch_size: int = 64               # rows per model run and per request
    max_queue_delay_us: int = 500          # how long the oldest queued request waits for a fuller batch
    max_queue_size: int = 1024             # queued requests per version before RESOURCE_EXHAUSTED
    release_timeout_seconds: float = 30.0  # how long a replaced version waits for its requests
