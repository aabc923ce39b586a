"""A trainer killed while a job runs: the job resumes from its last checkpoint after the restart, or —
with no checkpoint yet — is FAILED with the reason. Never RUNNING forever, never an orphaned rank."""

from __future__ import annotations

import asyncio

from trainer_support import job_processes, name, spec

from splitstack.trainer.v1 import trainer_pb2 as pb

MID_JOB = "trainer.mid_job"
JOB_STARTED = "trainer.job_started"


async def until_dead(process, timeout: float = 60.0) -> None:  # noqa: ANN001
    deadline = asyncio.get_running_loop().time() + timeout
    while process.proc.poll() is None:
        assert asyncio.get_running_loop().time() < deadline, f"{process.name} still alive"
        await asyncio.sleep(0.05)


async def until_no_ranks(job_id: str, timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while job_processes(job_id):
        assert asyncio.get_running_loop().time() < deadline, f"ranks of {job_id} outlived their trainer"
        await asyncio.sleep(0.05)


async def test_killed_trainer_fails_an_unstarted_job_and_resumes_a_checkpointed_one(fresh_stack) -> None:  # noqa: ANN001
    dataset, _ = await fresh_stack.upload_digits()
    trainers = fresh_stack.trainers
    early, late = name("early"), name("late")

    # 1. Killed right after the ranks started: no checkpoint exists, so the job fails with the reason.
    first = trainers.start(crash_points=[JOB_STARTED])
    async with fresh_stack.clients() as api:
        unstarted = await api.trainer.submit(spec(early, dataset, max_epochs=5))
    await until_dead(first)
    assert first.crashed_at(JOB_STARTED)
    await until_no_ranks(unstarted.id)

    # 2. The next trainer fails it, then is itself killed mid-job (a checkpoint exists by then).
    second = trainers.start(crash_points=[MID_JOB])
    async with fresh_stack.clients() as api:
        failed = await api.trainer.wait(unstarted.id)
        assert failed.state == pb.FAILED and "before its first checkpoint" in failed.error, failed
        async with api.events.progress() as seen:
            job = await api.trainer.submit(spec(late, dataset, max_epochs=8))
            await until_dead(second)
            assert second.crashed_at(MID_JOB)
            await until_no_ranks(job.id)
            assert (trainers.root / "work" / "jobs" / job.id / "checkpoints" / "last.ckpt").is_file()

            # 3. A clean trainer resumes it from that checkpoint: attempt 2, one version.
            trainers.start()
            async with fresh_stack.clients() as again:
                done = await again.trainer.wait(job.id)
                assert done.state == pb.SUCCEEDED and done.attempts == 2 and done.model_version == 1, done
                assert [v.version for v in await again.registry.versions(late)] == [1]
                assert await again.registry.versions(early) == []
                finished = await again.events.wait_for("SPLITSTACK_TRAINING", "training.finished.>", count=2)
                by_job = {e.payload.job_id: e.payload for e in finished}
                assert by_job[job.id].state == pb.SUCCEEDED and by_job[unstarted.id].state == pb.FAILED
                assert await again.trainer.jobs(state=pb.RUNNING) == []
    mine = [p for p in seen if p.job_id == job.id]
    resumed_at = next(i for i, p in enumerate(mine) if p.message.startswith("resuming from checkpoint"))
    before = [p.epoch for p in mine[:resumed_at] if p.stage == "fit" and p.step]
    after = [p.epoch for p in mine[resumed_at:] if p.stage == "fit" and p.step]
    assert max(before) >= 1 and after and min(after) >= 1, (before, after)   # not from epoch 0 again
