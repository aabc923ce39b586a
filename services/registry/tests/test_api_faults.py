"""kill -9 of the registry at its crash points, then a restart on the same state: nothing partial is
visible, committed changes stay committed, and each event reaches its stream exactly once — the
ones caught between commit and publish only after the restart. Both backends."""

from __future__ import annotations

import asyncio
import hashlib
import os

import grpc
import pytest

from splitstack.chassis.testing.servers import start_nats
from splitstack.common.v1 import common_pb2 as common
from splitstack.contracts.events import subject
from splitstack.registry.v1 import registry_pb2 as pb

MIB = 1024 * 1024
MID_STREAM = "registry.upload.mid_stream"
AFTER_COMMIT = "registry.after_commit"
# The relay of a crashing process then publishes only at start or when woken after a commit, so an
# event caught by the crash point cannot have been published before the kill.
RELAY_ONLY_WHEN_WOKEN = {"SPLITSTACK_REGISTRY_RELAY_POLL_SECONDS": "60"}
WRITE_WITHOUT_BUS_SECONDS = 4.0   # generous for a small write; a publish to a dead NATS times out after 5 s


async def _dies_at(process, point: str) -> None:
    returncode = await asyncio.to_thread(process.wait_exit)
    assert returncode == -9, f"{process.name} ended with {returncode}, not SIGKILL"
    assert process.crashed_at(point), f"{process.name} died without reaching {point}"


async def test_kill_during_an_upload_leaves_nothing_visible_and_a_retry_succeeds(registry) -> None:
    crashing = await registry.start("upload-crash", crash_points=[MID_STREAM])
    data = os.urandom(3 * MIB + 5)
    digest = hashlib.sha256(data).hexdigest()
    async with registry.connect(crashing) as api:
        model = (await api.create_model()).name
        version = (await api.create_version(model)).version
        before = registry.state.stored_files()
        with pytest.raises(grpc.aio.AioRpcError):
            await api.upload(model, version, data, common.CHECKPOINT)
    await _dies_at(crashing, MID_STREAM)

    restarted = await registry.start("after-upload-crash")
    async with registry.connect(restarted) as api:
        stored = await api.get_version(model, version)
        assert stored.state == pb.PENDING and not stored.artifacts
        assert await api.artifacts(model, version) == []
        await api.fails(api.download(sha256=digest), grpc.StatusCode.NOT_FOUND)
        await api.fails(api.download(model=model, version=version, kind=common.CHECKPOINT,
                                     precision=common.PRECISION_FP32), grpc.StatusCode.NOT_FOUND)
        assert registry.state.stored_files() == before, "the killed upload left a partial blob or spool file"
        artifact = await api.upload(model, version, data, common.CHECKPOINT)
        assert artifact.sha256 == digest
        _, content = await api.download(sha256=digest)
        assert content == data
    assert list(registry.state.blobs_named(digest).values()) == [len(data)]


async def _crash_during(registry, log, name: str, call, published: tuple[str, int]) -> None:
    """Start a process armed at the after-commit point; once it has published what the previous crash
    left pending (`published`: pattern, count), make `call(api)` and see the process die there."""
    process = await registry.start(name, RELAY_ONLY_WHEN_WOKEN, crash_points=[AFTER_COMMIT])
    await log.wait_for(*published)
    async with registry.connect(process) as api:
        with pytest.raises(grpc.aio.AioRpcError):
            await call(api)
    await _dies_at(process, AFTER_COMMIT)


async def test_kill_between_commit_and_publish_publishes_each_event_once_after_restart(registry) -> None:
    async with registry.event_log() as log:
        setup = await registry.start("setup")
        async with registry.connect(setup) as api:
            model = (await api.create_model(required_targets=["cpu"])).name
            dataset = (await api.create_dataset()).name
            first = await api.ready_version(model, onnx_target="cpu")
            onnx = next(a for a in first.artifacts if a.kind == common.ONNX)
            pending = (await api.create_version(model, key="job-2", lineage=api.lineage())).version
            await api.upload(model, pending, os.urandom(4000), common.EXPORTED_PROGRAM)
            await api.upload(model, pending, api.sample_npz(), common.SAMPLE)
            table = api.sample_npz(30)
        registered = subject("model_registered", model=model)
        converted = subject("model_converted", model=model, target="cpu")
        updated = subject("data_updated", dataset=dataset)
        promoted = subject("model_promoted", model=model, alias="production")
        await log.wait_for(registered, 1)
        assert await asyncio.to_thread(setup.stop) == 0, "the registry did not stop cleanly on SIGTERM"
        choice = pb.SetServingChoiceRequest(model=model, version=first.version, target="cpu",
                                            artifact_sha256=onnx.sha256, reason="crash test")

        async def set_alias_after_checking(api) -> pb.Alias:
            assert (await api.get_version(model, pending)).state == pb.READY
            return await api.set_alias(model, "production", first.version, actor="ops", reason="crash test")

        await _crash_during(registry, log, "finalize-crash", lambda api: api.finalize(model, pending), (registered, 1))
        assert [e.payload.version for e in await log.read(registered)] == [1], "published before the kill?"
        await _crash_during(registry, log, "choice-crash", lambda api: api.stub.SetServingChoice(choice),
                            (registered, 2))
        assert await log.read(converted) == []
        await _crash_during(registry, log, "dataset-crash",
                            lambda api: api.upload_dataset(dataset, table, key="snap"), (converted, 1))
        assert await log.read(updated) == []
        await _crash_during(registry, log, "alias-crash", set_alias_after_checking, (updated, 1))
        assert await log.read(promoted) == []

        final = await registry.start("after-crashes")
        await log.wait_for(promoted, 1)
        async with registry.connect(final) as api:
            resolved = await api.stub.ResolveAlias(pb.ResolveAliasRequest(model=model, alias="production"))
            assert (resolved.alias.version, resolved.alias.actor) == (first.version, "ops")
            latest = await api.stub.GetDatasetVersion(pb.GetDatasetVersionRequest(dataset=dataset))
            assert (latest.version, latest.idempotency_key, latest.sha256) == (1, "snap", api.sha256(table))
            # the clients retry the writes whose answers the crashes swallowed: no new changes, no new events
            assert (await api.finalize(model, pending)).state == pb.READY
            written = await api.stub.SetServingChoice(choice)
            assert written.artifact.sha256 == onnx.sha256
            assert await api.upload_dataset(dataset, table, key="snap") == latest
            await api.set_alias(model, "production", first.version, actor="ops", reason="crash test")
            assert len(await api.history(model, "production")) == 1

        found = {pattern: await log.exactly(pattern, count, settle=settle) for pattern, count, settle in
                 ((registered, 2, 1.5), (converted, 1, 0), (updated, 1, 0), (promoted, 1, 0))}
    assert sorted(e.payload.version for e in found[registered]) == [1, 2]
    assert found[converted][0].payload.serving_choice == written
    assert found[updated][0].payload.dataset_version == latest
    moved = found[promoted][0].payload
    assert (moved.version, moved.previous_version, moved.actor) == (first.version, 0, "ops")
    assert [(t.target, t.artifact.sha256) for t in moved.serving_artifacts] == [("cpu", onnx.sha256)]


async def test_changes_made_while_nats_is_down_are_announced_once_it_is_back(registry, nats_server) -> None:
    process = await registry.start("nats-outage")
    async with registry.connect(process) as api:
        model = (await api.create_model()).name
        dataset = (await api.create_dataset()).name
        await asyncio.to_thread(nats_server.stop)
        clock = asyncio.get_running_loop().time
        try:
            writes = (lambda: api.ready_version(model), lambda: api.upload_dataset(dataset, api.sample_npz()),
                      lambda: api.set_alias(model, "production", 1))
            for write in writes:                      # writes go to the outbox: the bus must not hold them up
                started = clock()
                await write()
                assert clock() - started < WRITE_WITHOUT_BUS_SECONDS, (
                    f"a write took {clock() - started:.1f}s while NATS was down: held up by the outbox relay?")
        finally:
            revived = await asyncio.to_thread(start_nats, nats_server.data_dir, port=nats_server.ports["client"])
        try:
            async with registry.event_log() as log:
                for pattern in (subject("model_registered", model=model), subject("data_updated", dataset=dataset),
                                subject("model_promoted", model=model, alias="production")):
                    await log.wait_for(pattern, 1, timeout=60)
                for pattern in (subject("model_registered", model=model), subject("data_updated", dataset=dataset),
                                subject("model_promoted", model=model, alias="production")):
                    await log.exactly(pattern, 1, settle=0)
        finally:
            await asyncio.to_thread(revived.stop)
