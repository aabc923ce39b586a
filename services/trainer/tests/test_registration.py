"""Registration repeated at any point is safe: every write a job makes to the registry (CreateModel,
CreateVersion keyed by the job id, UploadArtifact, FinalizeVersion) returns the same record when it
is made again, so an attempt that died half-way — or after it finished — leaves exactly one version
once the next attempt registers. Real registry process; outputs written as a job would leave them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from google.protobuf import json_format
from trainer_support import RegistryApi, name, open_channel

from splitstack.chassis.retry import RetryBudget
from splitstack.common.v1 import common_pb2
from splitstack.contracts import handoff
from splitstack.registry.v1 import registry_pb2 as rpb
from splitstack_trainer.job.outputs import JobOutputs
from splitstack_trainer.job.register import artifact_headers, lineage_of, register
from splitstack_trainer.jobconfig import JobConfig, message_json
from splitstack_trainer.registry_client import RegistryClient


def job_outputs(root: Path) -> JobOutputs:
    """A complete `outputs/` directory (contents that only the converter would look into)."""
    outputs = JobOutputs(root)
    root.mkdir(parents=True)
    outputs.checkpoint.write_bytes(b"checkpoint")
    outputs.program.write_bytes(b"exported program")
    rows = np.zeros((300, 64), np.float32)
    np.savez(outputs.sample, inputs=rows, labels=np.zeros(300, np.int64), reference_outputs=np.zeros((300, 10)))
    signature = json_format.MessageToDict(handoff.signature([64], 10))
    outputs.result_file.write_text(json.dumps({"metrics": {"accuracy": 0.9, "loss": 0.3}, "world_size": 1,
                                               "signature": signature, "sample_rows": 300}))
    return outputs


def job_config(model: str, version: rpb.DatasetVersion) -> JobConfig:
    profile = common_pb2.TrainingProfile(name="cpu-local", nodes=1, devices=1, batch_size=64, precision="32-true")
    return JobConfig(
        job_id=name("job"), model=model, module="m:M", datamodule="m:D", module_hparams={}, datamodule_hparams={},
        profile=message_json(profile), max_epochs=1, seed=0, dataset=version.dataset,
        dataset_version=version.version, dataset_sha256=version.sha256, dataset_size=version.size_bytes,
        dataset_path="/nowhere", work_dir="/nowhere", required_targets=["cpu"],
        primary_metric=message_json(common_pb2.PrimaryMetric(name="accuracy")), promotion_policy=None,
        parent_version=0, code_version="test")


async def test_every_registration_write_repeats_to_the_same_record(fresh_stack, tmp_path: Path) -> None:  # noqa: ANN001
    model = name("model")
    _, [version] = await fresh_stack.upload_digits()
    config, outputs = job_config(model, version), job_outputs(tmp_path / "outputs")
    async with open_channel(fresh_stack.registry.address) as channel:
        registry = RegistryClient(channel, 30.0, RetryBudget(total_seconds=10.0))
        # An attempt that died after CreateVersion and one upload...
        model_record = rpb.Model(name=model, required_targets=config.required_targets, primary_metric=config.primary)
        assert (await registry.ensure_model(model_record)).name == model
        assert (await registry.ensure_model(model_record)).name == model
        request = rpb.CreateVersionRequest(model=model, idempotency_key=config.job_id,
                                           lineage=lineage_of(config, outputs), signature=outputs.signature())
        pending = await registry.create_version(request)
        assert (await registry.create_version(request)).version == pending.version == 1
        header, path = artifact_headers(config, outputs, pending.version)[0]
        first = await registry.upload(header, path)
        assert (await registry.upload(header, path)).sha256 == first.sha256
        # ... is completed by the next one, and registering again changes nothing.
        ready = await register(registry, config, outputs)
        assert (ready.version, ready.state) == (1, rpb.READY)
        assert (await registry.finalize(model, 1)).state == rpb.READY
        again = await register(registry, config, outputs)
        assert (again.version, again.state, len(again.artifacts)) == (1, rpb.READY, 3), again
        assert [a.sha256 for a in again.artifacts] == [a.sha256 for a in ready.artifacts]
        assert [(v.version, v.idempotency_key) for v in await RegistryApi(channel).versions(model)] == [
            (1, config.job_id)]
