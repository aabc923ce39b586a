"""Protocol messages built from the repository's state, and load/unload parameters parsed from them.

Shapes follow Triton's conventions: ModelMetadata shapes include the batch dim (-1) of a
batching model; ModelConfig dims leave it out and say `max_batch_size` instead.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from google.protobuf import json_format

from inference import grpc_service_pb2 as pb
from inference import model_config_pb2 as config_pb
from splitstack.chassis.errors import InvalidArgument

from splitstack_serving.backend import CPU_PROVIDER
from splitstack_serving.limits import ServingLimits, check_load_config
from splitstack_serving.repository import IndexEntry, ModelVersion
from splitstack_serving.stats import Duration
from splitstack_serving.tensors import TensorSpec, names_text

SHA256_PARAMETER = "artifact_sha256"
LOAD_PARAMETERS = ("version", "config", "keep_previous")
UNLOAD_PARAMETERS = ("version", "unload_dependents")


def tensor_metadata(specs: Iterable[TensorSpec]) -> list[pb.ModelMetadataResponse.TensorMetadata]:
    """TensorMetadata for each spec (full shapes, -1 for any size)."""
    return [pb.ModelMetadataResponse.TensorMetadata(name=s.name, datatype=s.datatype, shape=s.shape) for s in specs]


def model_metadata(model: ModelVersion, versions: list[str]) -> pb.ModelMetadataResponse:
    """ModelMetadata of one loaded version; `versions` lists every loaded version of the model."""
    return pb.ModelMetadataResponse(name=model.name, versions=versions, platform=model.model.platform,
                                    inputs=tensor_metadata(model.signature.inputs),
                                    outputs=tensor_metadata(model.signature.outputs))


def _config_dims(spec: TensorSpec, max_batch_size: int) -> tuple[int, ...]:
    return spec.shape[1:] if max_batch_size > 0 else spec.shape


def _data_type(datatype: str) -> int:
    return config_pb.DataType.Value(f"TYPE_{datatype}")


def model_config(model: ModelVersion) -> config_pb.ModelConfig:
    """The ModelConfig a version is served with: tensors, batch size, batching, instances, digest."""
    policy = model.policy
    batch = model.signature.max_batch_size
    config = config_pb.ModelConfig(
        name=model.name, platform=model.model.platform, backend=model.model.backend, max_batch_size=batch,
        input=[config_pb.ModelInput(name=s.name, data_type=_data_type(s.datatype), dims=_config_dims(s, batch))
               for s in model.signature.inputs],
        output=[config_pb.ModelOutput(name=s.name, data_type=_data_type(s.datatype), dims=_config_dims(s, batch))
                for s in model.signature.outputs],
        instance_group=[config_pb.ModelInstanceGroup(name=model.name, count=policy.instances,
                                                     kind=_instance_kind(model))],
        default_model_filename=model.path.name,
    )
    if model.version.isdigit():
        config.version_policy.specific.versions.append(int(model.version))
    if policy.batching:
        config.dynamic_batching.max_queue_delay_microseconds = policy.max_queue_delay_us
        config.dynamic_batching.default_queue_policy.max_queue_size = policy.max_queue_size
    config.parameters[SHA256_PARAMETER].string_value = model.sha256
    config.parameters["execution_providers"].string_value = ",".join(model.model.providers)
    return config


def _instance_kind(model: ModelVersion) -> int:
    on_cpu = model.model.providers[:1] == (CPU_PROVIDER,)
    return config_pb.ModelInstanceGroup.KIND_CPU if on_cpu else config_pb.ModelInstanceGroup.KIND_GPU


def _duration(duration: Duration) -> pb.StatisticDuration:
    return pb.StatisticDuration(count=duration.count, ns=duration.ns)


def model_statistics(model: ModelVersion) -> pb.ModelStatistics:
    """ModelStatistics of one loaded version."""
    stats = model.stats
    return pb.ModelStatistics(
        name=model.name, version=model.version, last_inference=stats.last_inference_ms,
        inference_count=stats.inference_count, execution_count=stats.execution_count,
        inference_stats=pb.InferStatistics(
            success=_duration(stats.success), fail=_duration(stats.fail), queue=_duration(stats.queue),
            compute_input=_duration(stats.compute_input), compute_infer=_duration(stats.compute_infer),
            compute_output=_duration(stats.compute_output)),
        batch_stats=[pb.InferBatchStatistics(
            batch_size=rows,
            compute_input=pb.StatisticDuration(count=b.count, ns=b.compute_input_ns),
            compute_infer=pb.StatisticDuration(count=b.count, ns=b.compute_infer_ns),
            compute_output=pb.StatisticDuration(count=b.count, ns=b.compute_output_ns))
            for rows, b in sorted(stats.batches.items())],
    )


def repository_index(entries: Iterable[IndexEntry]) -> pb.RepositoryIndexResponse:
    """RepositoryIndexResponse of the repository's entries."""
    return pb.RepositoryIndexResponse(models=[
        pb.RepositoryIndexResponse.ModelIndex(name=e.name, version=e.version, state=e.state, reason=e.reason)
        for e in entries])


@dataclass(frozen=True)
class LoadOptions:
    """What RepositoryModelLoad's parameters ask for."""

    version: str = ""
    config: config_pb.ModelConfig | None = None
    keep_previous: bool = False


def _check_known(parameters: Mapping[str, pb.ModelRepositoryParameter], known: tuple[str, ...], rpc: str) -> None:
    unknown = sorted(key for key in parameters if key not in known)
    if any(key.startswith("file:") for key in unknown):
        raise InvalidArgument(f"{rpc}: model files in parameters are not supported; "
                              "put the model under the model directory")
    if unknown:
        raise InvalidArgument(f"{rpc}: unknown parameter(s) {names_text(unknown)} (known: {', '.join(known)})")


def _version_parameter(parameters: Mapping[str, pb.ModelRepositoryParameter]) -> str:
    if "version" not in parameters:
        return ""
    value = parameters["version"]
    kind = value.WhichOneof("parameter_choice")
    if kind == "string_param":
        return value.string_param
    if kind == "int64_param":
        if value.int64_param <= 0:
            raise InvalidArgument(f"parameter 'version' must be a positive integer, got {value.int64_param}")
        return str(value.int64_param)
    raise InvalidArgument(f"parameter 'version' must be a string or int64, got {kind}")


def load_options(parameters: Mapping[str, pb.ModelRepositoryParameter],
                 limits: ServingLimits | None = None) -> LoadOptions:
    """Parse RepositoryModelLoad parameters: version, config (ModelConfig as JSON, within `limits`),
    keep_previous."""
    _check_known(parameters, LOAD_PARAMETERS, "RepositoryModelLoad")
    config = _config_parameter(parameters)
    if config is not None:
        check_load_config(config, limits or ServingLimits())
    if "keep_previous" in parameters and parameters["keep_previous"].WhichOneof("parameter_choice") != "bool_param":
        raise InvalidArgument("parameter 'keep_previous' must be a bool")
    keep = parameters["keep_previous"].bool_param if "keep_previous" in parameters else False
    return LoadOptions(_version_parameter(parameters), config, keep)


def _config_parameter(parameters: Mapping[str, pb.ModelRepositoryParameter]) -> config_pb.ModelConfig | None:
    if "config" not in parameters:
        return None
    value = parameters["config"]
    if value.WhichOneof("parameter_choice") != "string_param":
        raise InvalidArgument("parameter 'config' must be a string: a ModelConfig in JSON")
    try:
        return json_format.Parse(value.string_param, config_pb.ModelConfig())
    except json_format.ParseError as exc:
        raise InvalidArgument(f"parameter 'config' is not a ModelConfig in JSON: {str(exc)[:200]}") from None
    except RecursionError:
        raise InvalidArgument("parameter 'config' is nested too deeply to be a ModelConfig") from None


def unload_version(parameters: Mapping[str, pb.ModelRepositoryParameter]) -> str:
    """The version RepositoryModelUnload names ("" = every version)."""
    _check_known(parameters, UNLOAD_PARAMETERS, "RepositoryModelUnload")
    return _version_parameter(parameters)
