"""Event-driven retraining: a burst of data.updated inside the debounce window is one job on the
latest version; a redelivered (or late, older) event starts none; policies are checked and stored."""

from __future__ import annotations

import asyncio
import uuid

import grpc
import nats.js.errors
from trainer_support import RPC_TIMEOUT_SECONDS, digits_npz, name, spec

from splitstack.contracts.envelope import MSG_ID_HEADER
from splitstack.trainer.v1 import trainer_pb2 as pb

DEBOUNCE_SECONDS = 3.0


def policy(policy_name: str, model: str, dataset: str, **fields: object) -> pb.RetrainPolicy:
    template = spec(model, dataset, max_epochs=1)
    template.ClearField("dataset")
    values: dict[str, object] = {"debounce_seconds": DEBOUNCE_SECONDS, "enabled": True, **fields}
    return pb.RetrainPolicy(name=policy_name, model=model, dataset=dataset, template=template, **values)


async def consumer_caught_up(events, timeout: float = 20.0) -> None:  # noqa: ANN001
    """Wait until the trainer's work consumer has acked everything in SPLITSTACK_DATA."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        stream = await events.js.stream_info("SPLITSTACK_DATA")
        info = await events.js.consumer_info("SPLITSTACK_DATA", "trainer")
        if info.num_pending == 0 and info.num_ack_pending == 0 and info.ack_floor.stream_seq >= stream.state.last_seq:
            return
        assert asyncio.get_running_loop().time() < deadline, f"consumer 'trainer' did not catch up: {info}"
        await asyncio.sleep(0.1)


async def redeliver(events, subject: str, seqs: list[int]) -> None:  # noqa: ANN001
    """Put stored data.updated messages into the stream again: the same events, arriving once more."""
    for seq in seqs:
        stored = await events.js.get_msg("SPLITSTACK_DATA", seq=seq)
        await events.js.publish(subject, stored.data, headers={MSG_ID_HEADER: f"again-{uuid.uuid4().hex}"})


async def test_a_burst_is_one_job_on_the_latest_version_and_a_redelivery_starts_none(stack) -> None:  # noqa: ANN001
    dataset, model, policy_name = name("fresh"), name("retrained"), name("policy")
    async with stack.clients() as api:
        await api.registry.dataset(dataset, [])
        stored = await api.trainer.stub.SetRetrainPolicy(pb.SetRetrainPolicyRequest(
            policy=policy(policy_name, model, dataset)), timeout=RPC_TIMEOUT_SECONDS)
        assert stored.template.dataset == dataset and stored.max_concurrent_jobs == 1 and stored.created_at.seconds

        started = asyncio.get_running_loop().time()
        versions = [await api.registry.upload_dataset(dataset, digits_npz(1797 - i, seed=i)) for i in range(3)]
        assert asyncio.get_running_loop().time() - started < DEBOUNCE_SECONDS, "uploads too slow for the window"
        job = (await wait_for_jobs(api.trainer, model, 1))[0]
        assert job.retrain_policy == policy_name and job.spec.dataset_version == versions[-1].version
        done = await api.trainer.wait(job.id)
        assert done.state == pb.SUCCEEDED, done.error
        lineage = (await api.registry.version(model, done.model_version)).lineage
        assert (lineage.dataset_version, lineage.dataset_digest) == (versions[-1].version, versions[-1].sha256)

        subject = f"data.updated.{dataset}"
        seqs = [e.seq for e in await stored_seqs(api.events, subject)]
        assert len(seqs) == 3
        await redeliver(api.events, subject, [seqs[-1], seqs[0]])
        await consumer_caught_up(api.events)
        await asyncio.sleep(DEBOUNCE_SECONDS + 1.0)   # past the window a new trigger would have fired in
        assert [j.id for j in await api.trainer.jobs(model=model)] == [job.id]


async def wait_for_jobs(trainer, model: str, count: int, timeout: float = 30.0,  # noqa: ANN001
                        settle: float = DEBOUNCE_SECONDS) -> list[pb.Job]:
    """Wait for `count` jobs of `model`; after `settle` seconds there must still be exactly that many."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        jobs = await trainer.jobs(model=model)
        if len(jobs) >= count:
            await asyncio.sleep(settle)
            jobs = await trainer.jobs(model=model)
            assert len(jobs) == count, [(j.id, j.spec.dataset_version) for j in jobs]
            return jobs
        assert asyncio.get_running_loop().time() < deadline, f"no retraining job for {model} within {timeout}s"
        await asyncio.sleep(0.1)


async def stored_seqs(events, subject: str) -> list:  # noqa: ANN001
    found, seq = [], 1
    while True:
        try:
            msg = await events.js.get_msg("SPLITSTACK_DATA", seq=seq, subject=subject, next=True)
        except nats.js.errors.NotFoundError:
            return found
        found.append(msg)
        seq = msg.seq + 1


async def test_policies_are_checked_stored_listed_and_deleted(stack) -> None:  # noqa: ANN001
    dataset, model = name("data"), name("model")
    async with stack.clients() as api:
        stub = api.trainer.stub
        bad_template = policy(name("p"), model, dataset)
        bad_template.template.recipe = "no-such-recipe"
        for bad, words in [
            (bad_template, ("recipe", "no-such-recipe")),
            (policy("Bad Name", model, dataset), ("policy.name",)),
            (policy(name("p"), model, dataset, debounce_seconds=-1), ("debounce_seconds",)),
            (policy(name("p"), model, dataset, min_interval_seconds=float("nan")), ("min_interval_seconds",)),
            (pb.RetrainPolicy(name=name("p"), model=model, dataset=dataset,
                              template=spec(name("other"), dataset)), ("template.model",)),
        ]:
            await api.trainer.fails(stub.SetRetrainPolicy(pb.SetRetrainPolicyRequest(policy=bad)),
                                    grpc.StatusCode.INVALID_ARGUMENT, *words)
        kept = policy(name("p"), model, dataset, min_interval_seconds=60, max_concurrent_jobs=2)
        first = await stub.SetRetrainPolicy(pb.SetRetrainPolicyRequest(policy=kept))
        kept.enabled = False
        second = await stub.SetRetrainPolicy(pb.SetRetrainPolicyRequest(policy=kept))
        assert not second.enabled and second.created_at == first.created_at
        assert (await stub.GetRetrainPolicy(pb.GetRetrainPolicyRequest(name=kept.name))) == second
        listed = (await stub.ListRetrainPolicies(pb.ListRetrainPoliciesRequest())).policies
        assert kept.name in [p.name for p in listed]
        await stub.DeleteRetrainPolicy(pb.DeleteRetrainPolicyRequest(name=kept.name))
        await api.trainer.fails(stub.GetRetrainPolicy(pb.GetRetrainPolicyRequest(name=kept.name)),
                                grpc.StatusCode.NOT_FOUND, kept.name)
        profiles = (await stub.ListProfiles(pb.ListProfilesRequest())).profiles
        assert {"cpu-local", "cpu-ddp2", "a100-bf16"} <= {p.name for p in profiles}


async def test_max_concurrent_jobs_and_min_interval_hold_a_trigger_back(stack) -> None:  # noqa: ANN001
    busy_data, spaced_data, busy, spaced = name("busy"), name("spaced"), name("busy-model"), name("spaced-model")
    async with stack.clients() as api:
        stub = api.trainer.stub
        for dataset in (busy_data, spaced_data):
            await api.registry.dataset(dataset, [])
        long_running = {"debounce_seconds": 0.2, "max_concurrent_jobs": 1}
        for policy_name, model, dataset, extra in ((name("p"), busy, busy_data, {}),
                                                   (name("p"), spaced, spaced_data, {"min_interval_seconds": 3600})):
            rule = policy(policy_name, model, dataset, **long_running, **extra)
            rule.template.max_epochs = 100000
            await stub.SetRetrainPolicy(pb.SetRetrainPolicyRequest(policy=rule))

        await api.registry.upload_dataset(busy_data, digits_npz(1700, seed=1))
        await api.registry.upload_dataset(spaced_data, digits_npz(1700, seed=2))
        first_busy = (await wait_for_jobs(api.trainer, busy, 1, settle=0.0))[0]
        first_spaced = (await wait_for_jobs(api.trainer, spaced, 1, settle=0.0))[0]
        await api.trainer.cancel(first_spaced.id, "only its start time matters")

        await api.registry.upload_dataset(busy_data, digits_npz(1690, seed=3))
        await api.registry.upload_dataset(spaced_data, digits_npz(1690, seed=4))
        await consumer_caught_up(api.events)
        await asyncio.sleep(1.0)   # both triggers are due; one waits for a free slot, the other for the interval
        assert [j.id for j in await api.trainer.jobs(model=busy)] == [first_busy.id]
        assert [j.id for j in await api.trainer.jobs(model=spaced)] == [first_spaced.id]

        await api.trainer.cancel(first_busy.id, "make room")
        second = [j for j in await wait_for_jobs(api.trainer, busy, 2, settle=0.0) if j.id != first_busy.id][0]
        assert second.spec.dataset_version == 2
        await api.trainer.cancel(second.id, "done")
        assert [j.id for j in await api.trainer.jobs(model=spaced)] == [first_spaced.id]
