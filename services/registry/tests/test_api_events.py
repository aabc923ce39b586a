"""The registry's events as stored in JetStream: subjects from the contracts, payloads, exactly one
message per change (idempotent retries and no-op moves add none), nothing for rejected writes."""

from __future__ import annotations

import os

import grpc

from splitstack.common.v1 import common_pb2 as common
from splitstack.contracts.events import subject
from splitstack.events.v1 import events_pb2
from splitstack.registry.v1 import registry_pb2 as pb

PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION
INVALID = grpc.StatusCode.INVALID_ARGUMENT
EXISTS = grpc.StatusCode.ALREADY_EXISTS


def _ref(artifact: pb.Artifact) -> events_pb2.ArtifactRef:
    return events_pb2.ArtifactRef(kind=artifact.kind, precision=artifact.precision, target=artifact.target,
                                  sha256=artifact.sha256, size_bytes=artifact.size_bytes, format=artifact.format)


def _key(ref: events_pb2.ArtifactRef) -> tuple:
    return (ref.kind, ref.precision, ref.target, ref.sha256, ref.size_bytes, ref.format)


async def test_data_updated_announces_each_dataset_version_once(api, events) -> None:
    dataset = (await api.create_dataset()).name
    data = api.sample_npz(12)
    first = await api.upload_dataset(dataset, data, key="snapshot-1")
    assert await api.upload_dataset(dataset, data, key="snapshot-1") == first     # a retry: no second event
    second = await api.upload_dataset(dataset, api.sample_npz(13))
    found = await events.exactly(subject("data_updated", dataset=dataset), 2)
    assert {e.stream for e in found} == {"SPLITSTACK_DATA"}
    assert all(isinstance(e.payload, events_pb2.DataUpdated) for e in found)
    assert sorted((e.payload.dataset_version for e in found), key=lambda v: v.version) == [first, second]
    assert all(e.event.occurred_at.seconds > 0 for e in found)


async def test_model_registered_carries_lineage_artifacts_targets_and_signature(api, events) -> None:
    model = (await api.create_model(required_targets=["cpu", "gpu-t4"])).name
    lineage = api.lineage(hyperparameters={"lr": "0.1", "epochs": "3"}, metrics={"accuracy": 0.95, "loss": 0.2})
    version = (await api.create_version(model, key="job-7", lineage=lineage)).version
    artifacts = [await api.upload(model, version, os.urandom(3000), common.EXPORTED_PROGRAM, filename="m.pt2"),
                 await api.upload(model, version, api.sample_npz(), common.SAMPLE),
                 await api.upload(model, version, os.urandom(2000), common.CHECKPOINT, precision=common.PRECISION_BF16)]
    ready = await api.finalize(model, version)
    assert await api.finalize(model, version) == ready                 # idempotent: no second event
    [stored] = await events.exactly(subject("model_registered", model=model), 1)
    assert stored.stream == "SPLITSTACK_MODELS"
    registered = stored.payload
    assert isinstance(registered, events_pb2.ModelRegistered)
    assert (registered.model, registered.version) == (model, version)
    assert registered.lineage == lineage
    assert sorted(map(_key, registered.artifacts)) == sorted(_key(_ref(a)) for a in artifacts)
    assert list(registered.required_targets) == ["cpu", "gpu-t4"]
    assert registered.signature == api.SIGNATURE


async def test_model_converted_announces_the_serving_choice_once(api, events) -> None:
    model = (await api.create_model()).name
    ready = await api.ready_version(model, onnx_target="cpu")
    onnx = next(a for a in ready.artifacts if a.kind == common.ONNX)
    request = pb.SetServingChoiceRequest(model=model, version=ready.version, target="cpu", artifact_sha256=onnx.sha256,
                                         candidates=[pb.Candidate(format=common.ONNX_FP32, accepted=True,
                                                                  artifact_sha256=onnx.sha256)],
                                         reason="only candidate")
    choice = await api.stub.SetServingChoice(request)
    assert await api.stub.SetServingChoice(request) == choice
    [stored] = await events.exactly(subject("model_converted", model=model, target="*"), 1)
    assert stored.subject == subject("model_converted", model=model, target="cpu")
    assert isinstance(stored.payload, events_pb2.ModelConverted)
    assert stored.payload.serving_choice == choice


async def test_model_promoted_on_every_alias_move_with_serving_artifacts(api, events) -> None:
    model = (await api.create_model(required_targets=["cpu"])).name
    await api.ready_version(model)
    second = await api.ready_version(model, onnx_target="cpu")
    onnx = next(a for a in second.artifacts if a.kind == common.ONNX)
    await api.stub.SetServingChoice(pb.SetServingChoiceRequest(model=model, version=2, target="cpu",
                                                               artifact_sha256=onnx.sha256, reason="fastest"))
    await api.set_alias(model, "production", 1, actor="alice", reason="first")
    await api.set_alias(model, "production", 1, actor="alice", reason="first")     # no move, no event
    await api.set_alias(model, "production", 2, actor="bob", reason="better")
    await api.stub.DeleteAlias(pb.DeleteAliasRequest(model=model, alias="production", actor="carol", reason="off"))
    await api.set_alias(model, "staging", 2, actor="dave", reason="try")

    found = await events.exactly(subject("model_promoted", model=model, alias="production"), 3)
    promoted = [e.payload for e in found]
    assert all(isinstance(p, events_pb2.ModelPromoted) and (p.model, p.alias) == (model, "production")
               for p in promoted)
    assert [(p.version, p.previous_version, p.actor, p.reason) for p in promoted] == [
        (1, 0, "alice", "first"), (2, 1, "bob", "better"), (0, 2, "carol", "off")]
    assert not promoted[0].serving_artifacts and not promoted[2].serving_artifacts
    assert list(promoted[1].serving_artifacts) == [events_pb2.TargetArtifact(target="cpu", artifact=_ref(onnx))]
    [staging] = await events.exactly(subject("model_promoted", model=model, alias="staging"), 1, settle=0)
    assert (staging.payload.version, staging.payload.previous_version) == (2, 0)
    assert len({e.event.event_id for e in found + [staging]}) == 4


async def test_an_alias_moving_back_and_forth_is_announced_on_every_move(api, events) -> None:
    model = (await api.create_model()).name
    for _ in range(2):
        await api.ready_version(model)
    for version in (1, 2, 1):
        await api.set_alias(model, "production", version)
    await api.stub.DeleteAlias(pb.DeleteAliasRequest(model=model, alias="production", actor="x"))
    await api.set_alias(model, "production", 1)
    found = await events.exactly(subject("model_promoted", model=model, alias="production"), 5)
    assert [(e.payload.previous_version, e.payload.version) for e in found] == [(0, 1), (1, 2), (2, 1), (1, 0), (0, 1)]


async def test_rejected_writes_emit_no_events(api, events) -> None:
    model = (await api.create_model()).name
    dataset = (await api.create_dataset()).name
    version = (await api.create_version(model, key="job-1", lineage=api.lineage())).version
    await api.fails(api.finalize(model, version), PRECONDITION)
    await api.fails(api.upload(model, version, os.urandom(500), sha256=api.sha256(b"x")), INVALID)
    await api.fails(api.set_alias(model, "production", version), PRECONDITION)
    await api.fails(api.set_alias(model, "Bad Alias", version), INVALID)
    await api.fails(api.create_version(model, key="job-1", lineage=api.lineage()), EXISTS)
    await api.fails(api.upload_dataset(dataset, b"not an npz" * 50), INVALID)
    await api.fails(api.upload_dataset(dataset, api.sample_npz(), sha256=api.sha256(b"x")), INVALID)
    # sentinels: one relay publishes in commit order, so these arrive after anything the rejects added
    await api.upload(model, version, os.urandom(500), common.EXPORTED_PROGRAM)
    await api.upload(model, version, api.sample_npz(), common.SAMPLE)
    await api.finalize(model, version)
    await api.upload_dataset(dataset, api.sample_npz())
    registered = await events.exactly(subject("model_registered", model=model), 1)
    assert registered[0].payload.version == version
    assert len(await events.wait_for(subject("data_updated", dataset=dataset), 1)) == 1
    assert [e.subject for e in await events.read(f"model.*.{model}.*")] == []
    assert len(await events.read(subject("data_updated", dataset=dataset))) == 1
