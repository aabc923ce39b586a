"""Registration of a job's outputs, through the registry API only.

Ensure the model (idempotent create with the job's required targets, promotion policy and primary
metric; an existing model keeps its own), create the version with the job id as idempotency key
and the lineage, upload checkpoint, exported program and sample, finalize. Every step is
idempotent for the same outputs, so an attempt that died half-way is completed by the next one;
the registry announces `model.registered` when the version is finalized.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning
import torch

from splitstack.common.v1 import common_pb2
from splitstack.registry.v1 import registry_pb2 as rpb
from splitstack_trainer.job.outputs import JobOutputs
from splitstack_trainer.jobconfig import JobConfig
from splitstack_trainer.registry_client import RegistryClient, sha256_of

CHECKPOINT_PRECISION = {"bf16-true": common_pb2.PRECISION_BF16, "16-true": common_pb2.PRECISION_FP16}


def lineage_of(config: JobConfig, outputs: JobOutputs) -> rpb.Lineage:
    """Where the version comes from: job, dataset version and digest, hyperparameters, profile, metrics."""
    result = outputs.result()
    metrics = {name: float(value) for name, value in result["metrics"].items()}
    primary = config.primary
    return rpb.Lineage(
        training_job=config.job_id, dataset=config.dataset, dataset_version=config.dataset_version,
        dataset_digest=config.dataset_sha256, hyperparameters=hyperparameter_strings(config, result),
        metrics=metrics, primary_metric=primary, primary_metric_value=metrics.get(primary.name, 0.0),
        parent_version=config.parent_version, training_profile=config.training_profile,
        code_version=config.code_version)


def hyperparameter_strings(config: JobConfig, result: dict[str, Any]) -> dict[str, str]:
    """The hyperparameters as given to the classes, plus what the trainer chose (epochs, batch, seed)."""
    values: dict[str, Any] = {**config.hyperparameters, "max_epochs": config.max_epochs, "seed": config.seed,
                              "batch_size": config.training_profile.batch_size,
                              "world_size": result.get("world_size", config.world_size)}
    return {name: value if isinstance(value, str) else json.dumps(value) for name, value in sorted(values.items())}


def _header(config: JobConfig, version: int, kind: int, precision: int, path: Path,
            metadata: dict[str, str]) -> rpb.ArtifactHeader:
    return rpb.ArtifactHeader(model=config.model, version=version, kind=kind, precision=precision,
                              sha256=sha256_of(path), size_bytes=path.stat().st_size, filename=path.name,
                              metadata=metadata)


def artifact_headers(config: JobConfig, outputs: JobOutputs, version: int) -> list[tuple[rpb.ArtifactHeader, Path]]:
    """Checkpoint, exported program and sample with their keys and metadata."""
    code = {"module": config.module, "datamodule": config.datamodule, "recipe": config.recipe}
    precision = config.training_profile.precision
    return [
        (_header(config, version, common_pb2.CHECKPOINT, CHECKPOINT_PRECISION.get(precision, common_pb2.PRECISION_FP32),
                 outputs.checkpoint, {**code, "lightning": lightning.__version__, "training_precision": precision}),
         outputs.checkpoint),
        (_header(config, version, common_pb2.EXPORTED_PROGRAM, common_pb2.PRECISION_FP32, outputs.program,
                 {"torch": torch.__version__, "input": "x", "output": "logits"}), outputs.program),
        (_header(config, version, common_pb2.SAMPLE, common_pb2.PRECISION_FP32, outputs.sample,
                 {"rows": str(outputs.result()["sample_rows"])}), outputs.sample),
    ]


async def register(registry: RegistryClient, config: JobConfig, outputs: JobOutputs) -> rpb.ModelVersion:
    """Register `outputs` as a READY version of `config.model` (idempotent for the same outputs)."""
    model = rpb.Model(name=config.model, required_targets=config.required_targets, primary_metric=config.primary)
    if config.policy is not None:
        model.promotion_policy.CopyFrom(config.policy)
    await registry.ensure_model(model)
    version = await registry.create_version(rpb.CreateVersionRequest(
        model=config.model, idempotency_key=config.job_id, lineage=lineage_of(config, outputs),
        signature=outputs.signature()))
    if version.state == rpb.READY:
        return version
    for header, path in artifact_headers(config, outputs, version.version):
        await registry.upload(header, path)
    return await registry.finalize(config.model, version.version)

