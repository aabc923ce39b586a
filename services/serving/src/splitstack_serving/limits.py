"""What a client may ask of this server: the operator's caps, and the check of load-time overrides.

RepositoryModelLoad's `config` parameter (Triton's ModelConfig as JSON) may override the batch
size, the batching delay, the queue size and the instance count of the version it loads. Each is
capped by the operator (`SPLITSTACK_SERVING_LOAD_MAX_*`): a value past its cap, or a negative one,
is refused with INVALID_ARGUMENT naming the field, before anything is fetched, so warm-up (which
runs a batch of `max_batch_size` rows) never allocates past the cap. The same object carries the
caps on loaded models and versions and on what one ModelStreamInfer stream may hold.
"""

from __future__ import annotations

from dataclasses import dataclass

from inference import model_config_pb2 as config_pb
from splitstack.chassis.errors import InvalidArgument


@dataclass(frozen=True)
class ServingLimits:
    """The operator's bounds on what clients can make this server hold (see config.py for each)."""

    load_max_batch_size: int = 1024
    load_max_queue_size: int = 8192
    load_max_queue_delay_us: int = 1_000_000
    load_max_instances: int = 8
    max_versions_per_model: int = 4
    max_loaded_models: int = 64
    stream_max_pending: int = 64
    stream_max_pending_bytes: int = 64 * 1024 * 1024


def check_load_config(config: config_pb.ModelConfig, limits: ServingLimits) -> None:
    """Refuse a load-time override past the operator's caps (InvalidArgument naming the field)."""
    _check_field("max_batch_size", config.max_batch_size, limits.load_max_batch_size, "LOAD_MAX_BATCH_SIZE")
    if config.HasField("dynamic_batching"):
        batching = config.dynamic_batching
        _check_field("dynamic_batching.max_queue_delay_microseconds", batching.max_queue_delay_microseconds,
                     limits.load_max_queue_delay_us, "LOAD_MAX_QUEUE_DELAY_US")
        _check_field("dynamic_batching.default_queue_policy.max_queue_size",
                     batching.default_queue_policy.max_queue_size, limits.load_max_queue_size,
                     "LOAD_MAX_QUEUE_SIZE")
    for index, group in enumerate(config.instance_group):
        _check_field(f"instance_group[{index}].count", group.count, limits.load_max_instances, "LOAD_MAX_INSTANCES")


def _check_field(field: str, value: int, cap: int, knob: str) -> None:
    if value < 0:
        raise InvalidArgument(f"parameter 'config': {field} is {value}; it must not be negative")
    if value > cap:
        raise InvalidArgument(f"parameter 'config': {field} is {value}; this server allows at most {cap} "
                              f"(SPLITSTACK_SERVING_{knob})")
