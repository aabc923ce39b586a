"""Two registry processes on one PostgreSQL database and one S3 bucket, used at the same time: no gap,
duplicate or lost version, event, idempotent write or alias move; both start on an empty database."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections import Counter

import grpc

from splitstack.common.v1 import common_pb2 as common
from splitstack.contracts.events import subject
from splitstack.registry.v1 import registry_pb2 as pb

CONCURRENCY = 16


@contextlib.asynccontextmanager
async def _clients(deployment):
    async with contextlib.AsyncExitStack() as stack:
        yield [await stack.enter_async_context(deployment.launcher.connect(p)) for p in deployment.processes]


async def test_two_replicas_create_100_versions_without_gap_duplicate_or_lost_event(replicas, events) -> None:
    limit = asyncio.Semaphore(CONCURRENCY)
    async with _clients(replicas) as (first, second):
        clients = (first, second)
        model = (await first.create_model()).name

        async def create(i: int) -> int:
            async with limit:
                return (await clients[i % 2].create_version(model, lineage=first.lineage(training_job=f"j{i}"))).version

        numbers = await asyncio.gather(*(create(i) for i in range(100)))
        assert sorted(numbers) == list(range(1, 101)), Counter(numbers).most_common(3)
        for client in clients:
            assert [v.version for v in await client.all_versions(model)] == list(range(1, 101))

        program, sample = os.urandom(2048), first.sample_npz()

        async def finish(version: int) -> None:
            async with limit:
                await clients[version % 2].upload(model, version, program, common.EXPORTED_PROGRAM)
                await clients[(version + 1) % 2].upload(model, version, sample, common.SAMPLE)
                finalized = await asyncio.gather(first.finalize(model, version), second.finalize(model, version))
                assert [v.state for v in finalized] == [pb.READY, pb.READY]

        await asyncio.gather(*(finish(n) for n in numbers))
    found = await events.exactly(subject("model_registered", model=model), 100)
    assert sorted(e.payload.version for e in found) == list(range(1, 101))
    for content in (program, sample):
        stored = replicas.state.blobs_named(first.sha256(content))
        assert list(stored.values()) == [len(content)], stored


async def test_one_idempotency_key_on_both_replicas_creates_one_version(replicas, events) -> None:
    async with _clients(replicas) as clients:
        name = clients[0].name("m")
        models = await asyncio.gather(*(clients[i % 2].create_model(name, description="same") for i in range(8)))
        assert all(m == models[0] for m in models)
        model = models[0].name
        lineage = clients[0].lineage()
        for round_ in range(5):
            created = await asyncio.gather(*(clients[i % 2].create_version(model, key=f"job-{round_}", lineage=lineage)
                                             for i in range(8)))
            assert {v.version for v in created} == {round_ + 1}, [v.version for v in created]
        assert [v.version for v in await clients[1].all_versions(model)] == [1, 2, 3, 4, 5]

        dataset = (await clients[0].create_dataset()).name
        table = clients[0].sample_npz(40)
        uploaded = await asyncio.gather(*(clients[i % 2].upload_dataset(dataset, table, key="snap")
                                          for i in range(6)))
        assert {v.version for v in uploaded} == {1}
        assert [v.version for v in await clients[0].all_dataset_versions(dataset)] == [1]
    await events.exactly(subject("data_updated", dataset=dataset), 1)


async def test_concurrent_alias_moves_on_both_replicas_keep_one_consistent_history(replicas, events) -> None:
    async with _clients(replicas) as clients:
        model = (await clients[0].create_model()).name
        for _ in range(3):
            await clients[0].ready_version(model)

        async def move(i: int) -> bool:
            try:
                await clients[i % 2].set_alias(model, "production", i % 3 + 1, actor=f"actor-{i}", reason=f"move {i}")
            except grpc.aio.AioRpcError as exc:      # a lost compare-and-set race may be reported, never hidden
                assert exc.code() == grpc.StatusCode.ABORTED, exc
                return False
            return True

        outcomes = await asyncio.gather(*(move(i) for i in range(20)))
        assert sum(outcomes) >= 1
        history = await clients[1].history(model, "production")
        resolved = await clients[0].stub.ResolveAlias(pb.ResolveAliasRequest(model=model, alias="production"))
    steps = [(m.from_version, m.to_version) for m in history]
    assert steps[0][0] == 0, steps
    assert all(later[0] == earlier[1] for earlier, later in zip(steps, steps[1:])), f"history is no chain: {steps}"
    assert all(source != target for source, target in steps), f"a no-op was recorded as a move: {steps}"
    assert resolved.alias.version == steps[-1][1]
    found = await events.exactly(subject("model_promoted", model=model, alias="production"), len(steps))
    assert Counter((e.payload.previous_version, e.payload.version) for e in found) == Counter(steps)


async def test_an_event_a_replica_died_holding_is_published_by_the_other(postgres_registry) -> None:
    healthy = await postgres_registry.start("healthy")
    doomed = await postgres_registry.start("doomed", crash_points=["registry.after_commit"])
    async with postgres_registry.connect(healthy) as api:
        model = (await api.create_model()).name
        version = (await api.create_version(model)).version
        await api.upload(model, version, os.urandom(1000), common.EXPORTED_PROGRAM)
        await api.upload(model, version, api.sample_npz(), common.SAMPLE)
        async with postgres_registry.connect(doomed) as doomed_api:
            try:
                await doomed_api.finalize(model, version)
            except grpc.aio.AioRpcError:
                pass
            else:
                raise AssertionError("the armed replica answered instead of dying at registry.after_commit")
        assert await asyncio.to_thread(doomed.wait_exit) == -9 and doomed.crashed_at("registry.after_commit")
        assert (await api.get_version(model, version)).state == pb.READY
        async with postgres_registry.event_log() as log:
            [stored] = await log.exactly(subject("model_registered", model=model), 1)
    assert stored.payload.version == version


async def test_two_replicas_started_together_on_an_empty_database_both_serve(postgres_registry) -> None:
    starting = [postgres_registry.spawn(name) for name in ("first", "second")]
    processes = await asyncio.gather(*(asyncio.to_thread(postgres_registry.wait_ready, s) for s in starting))
    async with contextlib.AsyncExitStack() as stack:
        clients = [await stack.enter_async_context(postgres_registry.connect(p)) for p in processes]
        model = (await clients[0].create_model()).name
        assert (await clients[1].stub.GetModel(pb.GetModelRequest(name=model))).name == model
