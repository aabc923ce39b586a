"""A job from submit to a READY registry version: progress, watching, outputs, lineage, events; cancel."""

from __future__ import annotations

import asyncio
import io
import os
import signal
import tempfile
from pathlib import Path

import numpy as np
import torch
from trainer_support import RPC_TIMEOUT_SECONDS, job_processes, name, spec

from splitstack.common.v1 import common_pb2
from splitstack.contracts import handoff
from splitstack.registry.v1 import registry_pb2 as rpb
from splitstack.trainer.v1 import trainer_pb2 as pb


async def watch_all(stub, job_id: str) -> list[pb.Job]:  # noqa: ANN001
    return [update.job async for update in stub.WatchJob(pb.WatchJobRequest(id=job_id), timeout=120)]


async def test_a_job_trains_streams_progress_and_registers_a_version(stack, digits) -> None:  # noqa: ANN001
    dataset, dataset_version = digits
    model = name("digits")
    async with stack.clients() as api:
        async with api.events.progress() as progress:
            job = await api.trainer.submit(spec(model, dataset, max_epochs=4, seed=7,
                                                hyperparameters={"hidden": 64, "layers": 2, "lr": 0.003}))
            assert job.state == pb.QUEUED and job.spec.model == model
            updates = await watch_all(api.trainer.stub, job.id)
        done = updates[-1]
        assert done.state == pb.SUCCEEDED, done
        assert done.model_version == 1 and done.attempts == 1 and not done.error
        assert done.metrics["accuracy"] > 0.5 and "loss" in done.metrics

        # The stream: the current state first, RUNNING with rank-zero progress, then the end.
        states = [u.state for u in updates]
        assert states[0] in (pb.QUEUED, pb.RUNNING) and pb.RUNNING in states
        fit = [u.progress for u in updates if u.state == pb.RUNNING and u.progress.stage == "fit" and u.progress.step]
        assert fit, "no fit progress streamed"
        last_fit = fit[-1]
        assert last_fit.max_epochs == 4 and last_fit.total_steps >= last_fit.step > 0
        assert last_fit.samples_per_second > 0 and last_fit.loss > 0
        mine = [p for p in progress if p.job_id == job.id]
        assert {"fit", "validate", "export", "register"} <= {p.stage for p in mine}
        assert any(p.val_metrics.get("val_accuracy", 0) > 0 for p in mine)
        assert any(p.eta_seconds > 0 for p in mine)

        # A client that connects late gets the current (final) state first, and the stream ends.
        late = await watch_all(api.trainer.stub, job.id)
        assert len(late) == 1 and late[0].state == pb.SUCCEEDED and late[0].model_version == 1

        version = await api.registry.version(model, done.model_version)
        assert version.state == rpb.READY and version.idempotency_key == job.id
        kinds = {common_pb2.ArtifactKind.Name(a.kind): a for a in version.artifacts}
        assert set(kinds) == {"CHECKPOINT", "EXPORTED_PROGRAM", "SAMPLE"}
        lineage = version.lineage
        assert lineage.training_job == job.id and lineage.dataset == dataset
        assert lineage.dataset_version == dataset_version.version and lineage.dataset_digest == dataset_version.sha256
        assert lineage.hyperparameters["hidden"] == "64" and lineage.hyperparameters["max_epochs"] == "4"
        assert lineage.hyperparameters["seed"] == "7" and lineage.hyperparameters["batch_size"] == "1024"
        assert lineage.training_profile.name == "cpu-local" and lineage.training_profile.precision == "32-true"
        assert lineage.metrics["accuracy"] == done.metrics["accuracy"]
        assert lineage.primary_metric.name == "accuracy" and lineage.primary_metric_value == lineage.metrics["accuracy"]
        assert lineage.code_version.startswith("splitstack-trainer")
        assert list(version.signature.inputs[0].shape) == [-1, 64] and version.signature.outputs[0].name == "logits"

        # The hand-off runs without the model's code and reproduces the sample's reference outputs.
        program = await api.registry.download(kinds["EXPORTED_PROGRAM"].sha256)
        sample = np.load(io.BytesIO(await api.registry.download(kinds["SAMPLE"].sha256)))
        handoff.check_sample(dict(sample))
        with tempfile.TemporaryDirectory() as scratch:
            path = Path(scratch) / "model.pt2"
            path.write_bytes(program)
            exported = torch.export.load(path).module()
            for rows in (1, 7, len(sample["inputs"])):
                out = exported(torch.from_numpy(sample["inputs"][:rows])).detach().numpy()
                np.testing.assert_allclose(out, sample["reference_outputs"][:rows], rtol=1e-4, atol=1e-5)

        finished = await api.events.wait_for("SPLITSTACK_TRAINING", f"training.finished.{model}")
        assert len(finished) == 1 and finished[0].msg_id == finished[0].event.event_id
        event = finished[0].payload
        assert (event.job_id, event.state, event.version) == (job.id, pb.SUCCEEDED, 1)
        registered = await api.events.wait_for("SPLITSTACK_MODELS", f"model.registered.{model}")
        assert registered[0].payload.version == 1 and list(registered[0].payload.required_targets) == ["cpu"]

        # The same idempotency key twice is one job.
        keyed = spec(model, dataset, idempotency_key="once", max_epochs=1)
        first = await api.trainer.submit(keyed)
        assert (await api.trainer.submit(keyed)).id == first.id
        await api.trainer.wait(first.id)


async def test_cancel_stops_a_running_job_and_a_queued_one(stack, digits) -> None:  # noqa: ANN001
    dataset, _ = digits
    model = name("cancel")
    async with stack.clients() as api:
        running = await api.trainer.submit(spec(model, dataset, max_epochs=100000))
        queued = await api.trainer.submit(spec(model, dataset, max_epochs=1))   # one local slot: waits
        await api.trainer.wait(running.id, [pb.RUNNING], check=lambda j: j.progress.step > 0)
        assert job_processes(running.id), "the running job has no process"
        assert (await api.trainer.get(queued.id)).state == pb.QUEUED

        cancelled = await api.trainer.cancel(queued.id, "not needed")
        assert cancelled.state == pb.CANCELLED and "not needed" in cancelled.error
        stopped = await api.trainer.cancel(running.id, "enough")
        assert stopped.state == pb.CANCELLED and "enough" in stopped.error
        assert job_processes(running.id) == []
        assert await api.trainer.jobs(model=model, state=pb.RUNNING) == []
        assert await api.registry.versions(model) == []
        again = await api.trainer.cancel(running.id)
        assert again.state == pb.CANCELLED
        finished = await api.events.wait_for("SPLITSTACK_TRAINING", f"training.finished.{model}", count=2)
        assert {e.payload.state for e in finished} == {pb.CANCELLED}


async def test_a_job_whose_process_dies_fails_with_the_reason(stack, digits) -> None:  # noqa: ANN001
    dataset, _ = digits
    model = name("dies")
    async with stack.clients() as api:
        job = await api.trainer.submit(spec(model, dataset, max_epochs=100000))
        await api.trainer.wait(job.id, [pb.RUNNING], check=lambda j: j.progress.step > 0)
        for pid in job_processes(job.id):
            os.kill(pid, signal.SIGKILL)
        failed = await api.trainer.wait(job.id, timeout=RPC_TIMEOUT_SECONDS)
        assert failed.state == pb.FAILED and "rank 0 was killed by SIGKILL" in failed.error, failed.error
        finished = await api.events.wait_for("SPLITSTACK_TRAINING", f"training.finished.{model}")
        assert finished[0].payload.state == pb.FAILED and "SIGKILL" in finished[0].payload.error
        await asyncio.sleep(0)


async def test_a_two_node_profile_runs_two_local_ranks_that_register_one_version(stack, digits) -> None:  # noqa: ANN001
    dataset, _ = digits
    model = name("ddp-local")
    async with stack.clients() as api:
        job = await api.trainer.submit(spec(model, dataset, profile="cpu-ddp2", max_epochs=2))
        running = await api.trainer.wait(job.id, [pb.RUNNING, pb.SUCCEEDED])
        done = await api.trainer.wait(job.id)
        assert done.state == pb.SUCCEEDED, done.error
        versions = await api.registry.versions(model)
        assert [v.version for v in versions] == [done.model_version] == [1]
        lineage = versions[0].lineage
        assert lineage.hyperparameters["world_size"] == "2" and lineage.training_profile.name == "cpu-ddp2"
        logs = sorted(p.name for p in (stack.trainers.root / "work" / "jobs" / job.id).glob("rank-*.log"))
        assert logs == ["rank-0.log", "rank-1.log"] and running.id == job.id
