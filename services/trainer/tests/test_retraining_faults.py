"""No lost retraining: a `data.updated` ends in exactly one model version of that dataset version,
whenever the trainer or the registry is killed (kill -9) on the way.

- The trainer killed right after the trigger is committed (the event not yet acked), then right
  after the job's ranks started (no checkpoint), then while rank zero registers: each restart
  carries the same job on (attempt 2 starts again, attempt 3 registers the complete outputs), and
  the job lists the attempts with their reasons.
- The registry killed after it committed the job's FinalizeVersion but before answering, and
  restarted a while later: the job rides the outage out (its registry calls retry with back-off)
  and the repeated call finds the version already READY; with a retry budget shorter than the
  outage, the job's attempt gives up as transient (exit 75) and its next attempt registers —
  CreateVersion with the same key returns the READY version, no second one.
"""

from __future__ import annotations

import asyncio

import pytest
from trainer_support import RPC_TIMEOUT_SECONDS, digits_npz, name, retrain_policy, start_registry

from splitstack.trainer.v1 import trainer_pb2 as pb

TRIGGER_NOTED = "trainer.trigger_noted"
JOB_STARTED = "trainer.job_started"
JOB_REGISTERING = "trainer.job_registering"
REGISTRY_AFTER_COMMIT = "registry.after_commit"


async def until_dead(process, timeout: float = 120.0) -> None:  # noqa: ANN001
    deadline = asyncio.get_running_loop().time() + timeout
    while process.proc.poll() is None:
        assert asyncio.get_running_loop().time() < deadline, f"{process.name} still alive"
        await asyncio.sleep(0.05)


async def until_logged(path, text: str, timeout: float = 60.0) -> None:  # noqa: ANN001
    deadline = asyncio.get_running_loop().time() + timeout
    while not (path.is_file() and text in path.read_text(errors="replace")):
        assert asyncio.get_running_loop().time() < deadline, f"{path} never said {text!r}"
        await asyncio.sleep(0.1)


async def one_version_of(api, model: str, dataset_version) -> None:  # noqa: ANN001
    """The model has exactly one version, READY, trained on `dataset_version`."""
    versions = await api.registry.versions(model)
    assert [v.version for v in versions] == [1], versions
    lineage = versions[0].lineage
    assert (lineage.dataset_version, lineage.dataset_digest) == (dataset_version.version, dataset_version.sha256)


async def test_trainer_killed_at_each_moment_of_a_retraining_gives_one_version(fresh_stack) -> None:  # noqa: ANN001
    trainers = fresh_stack.trainers
    dataset, model = name("data"), name("retrained")
    first = trainers.start(crash_points=[TRIGGER_NOTED])
    async with fresh_stack.clients() as api:
        await api.registry.dataset(dataset, [])
        await api.trainer.set_policy(retrain_policy(name("policy"), model, dataset))
        version = await api.registry.upload_dataset(dataset, digits_npz())
    await until_dead(first)
    assert first.crashed_at(TRIGGER_NOTED)

    second = trainers.start(crash_points=[JOB_STARTED])   # the trigger fires; its job's ranks start
    await until_dead(second)
    assert second.crashed_at(JOB_STARTED)

    third = trainers.start(crash_points=[JOB_REGISTERING])   # attempt 2 trains, then starts registering
    await until_dead(third)
    assert third.crashed_at(JOB_REGISTERING)

    trainers.start()
    async with fresh_stack.clients() as api:
        job = await api.trainer.only_job(model)
        done = await api.trainer.wait(job.id)
        assert done.state == pb.SUCCEEDED and done.model_version == 1, done
        assert done.attempts == 3 and done.spec.dataset_version == version.version, done
        history = done.attempt_history
        assert [a.number for a in history] == [1, 2, 3]
        assert all(a.transient and a.retried and "trainer stopped" in a.error for a in history[:2]), history
        assert not history[2].error and history[2].ended_at.seconds, history
        await one_version_of(api, model, version)
        assert [j.id for j in await api.trainer.jobs(model=model)] == [job.id]


@pytest.mark.parametrize("budget, attempts", [
    ("120", 1),   # the job's registry calls ride the outage out within its attempt
    ("5", 2),     # the job gives up (exit 75: transient); its second attempt registers
])
async def test_registry_killed_while_the_job_registers_gives_one_version(fresh_stack, budget: str,  # noqa: ANN001
                                                                         attempts: int) -> None:
    dataset, model = name("data"), name("retrained")
    trainers = fresh_stack.trainers
    trainers.start(SPLITSTACK_TRAINER_PEER_RETRY_SECONDS=budget)
    async with fresh_stack.clients() as api:
        await api.registry.dataset(dataset, [])
        await api.trainer.set_policy(retrain_policy(name("policy"), model, dataset))
    # Hits of the armed registry: 1 = the dataset version's commit (data.updated), 2 = the job's
    # FinalizeVersion (model.registered): committed, then killed before it answers.
    registry_root, port = fresh_stack.root / "registry", fresh_stack.registry.port
    fresh_stack.registry.stop()
    try:
        armed = fresh_stack.registry = start_registry(registry_root, fresh_stack.nats.url, port=port,
                                                      crash_points=[f"{REGISTRY_AFTER_COMMIT}@2"],
                                                      process_name="registry-armed")
        async with fresh_stack.clients() as api:
            version = await api.registry.upload_dataset(dataset, digits_npz())
            job = await api.trainer.only_job(model)
            await until_dead(armed)
            assert armed.crashed_at(REGISTRY_AFTER_COMMIT)
            await until_logged(trainers.root / "work" / "jobs" / job.id / "rank-0.log",
                               "registry FinalizeVersion failed")   # the job retries meanwhile
            if attempts > 1:   # restart the registry only once the first attempt gave up
                await api.trainer.wait(job.id, states=[pb.QUEUED, pb.RUNNING],
                                       check=lambda j: len(j.attempt_history) > 1)
            fresh_stack.registry = start_registry(registry_root, fresh_stack.nats.url, port=port,
                                                  process_name="registry-again")
            done = await api.trainer.wait(job.id)
            assert done.state == pb.SUCCEEDED and done.model_version == 1, done
            assert done.attempts == attempts and not done.attempt_history[-1].error, done
            for earlier in done.attempt_history[:-1]:
                assert earlier.transient and earlier.retried and "status 75" in earlier.error, earlier
                assert "UNAVAILABLE" in earlier.error, earlier
            await one_version_of(api, model, version)
            reply = await api.trainer.stub.ListJobs(pb.ListJobsRequest(model=model), timeout=RPC_TIMEOUT_SECONDS)
            assert [(j.id, len(j.attempt_history)) for j in reply.jobs] == [(job.id, attempts)]
    finally:
        fresh_stack.registry.stop()   # the stack stops only the registry it started
