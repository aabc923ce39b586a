"""Untrusted input through the Registry API (issue 12): every name in every RPC is matched in full
(a trailing newline is refused), and every free-text, map and repeated field is bounded. A refused
request stores nothing: no record, no alias move, no outbox row, no event. Both backends."""

from __future__ import annotations

import grpc

from splitstack.common.v1 import common_pb2 as common
from splitstack.contracts.limits import MAX_LONG_TEXT, MAX_METADATA_ENTRIES, MAX_METADATA_VALUE, MAX_SHORT_TEXT
from splitstack.registry.v1 import registry_pb2 as pb

INVALID = grpc.StatusCode.INVALID_ARGUMENT
LONG = "r" * (MAX_LONG_TEXT + 1)
SHORT = "s" * (MAX_SHORT_TEXT + 1)
BIG_VALUE = "v" * (MAX_METADATA_VALUE + 1)
TOO_MANY = {f"k{i}": "v" for i in range(MAX_METADATA_ENTRIES + 1)}


async def _world(api) -> dict:
    """A model with a READY version (an ONNX artifact for `cpu`, a serving choice) and a dataset version:
    real names, so a request naming them with a newline would find them if the name were accepted."""
    model = (await api.create_model(required_targets=[])).name
    ready = await api.ready_version(model, onnx_target="cpu")
    onnx = next(a for a in ready.artifacts if a.kind == common.ONNX)
    await api.stub.SetServingChoice(pb.SetServingChoiceRequest(model=model, version=ready.version, target="cpu",
                                                               artifact_sha256=onnx.sha256, reason="fastest"))
    await api.set_alias(model, "prod", ready.version)
    pending = (await api.create_version(model)).version
    dataset = (await api.create_dataset()).name
    await api.upload_dataset(dataset, api.sample_npz(5))
    return dict(model=model, version=ready.version, pending=pending, onnx=onnx.sha256, dataset=dataset)


async def _snapshot(api, w: dict) -> tuple:
    """Everything a refused request could have changed."""
    model = await api.stub.GetModel(pb.GetModelRequest(name=w["model"]))
    versions = await api.all_versions(w["model"])
    aliases = (await api.stub.ListAliases(pb.ListAliasesRequest(model=w["model"]))).aliases
    datasets = await api.all_dataset_versions(w["dataset"])
    return (model, versions, list(aliases), await api.history(w["model"]), datasets,
            sorted(api.state.outbox_subjects(f"model.promoted.{w['model']}")),
            sorted(api.state.outbox_subjects(f"data.updated.{w['dataset']}")), api.state.stored_files())


def _name_rpcs(api, w: dict) -> list[tuple[str, object]]:
    """(what, call) for every RPC that carries a name, each with one name given a trailing newline."""
    s = api.stub
    m, v, d, nl = w["model"], w["version"], w["dataset"], "\n"
    artifact = pb.ArtifactHeader(model=m + nl, version=w["pending"], kind=common.CHECKPOINT,
                                 sha256=api.sha256(b"x"), size_bytes=1)
    onnx = pb.ArtifactHeader(model=m, version=v, kind=common.ONNX, target="cpu" + nl, format=common.ONNX_FP32,
                             sha256=api.sha256(b"x"), size_bytes=1)
    policy = pb.PromotionPolicy(mode=pb.PromotionPolicy.MANUAL)
    return [
        ("CreateModel name", api.create_model(m + nl)),
        ("CreateModel required_targets", api.create_model(api.name("m"), required_targets=["cpu" + nl])),
        ("GetModel", s.GetModel(pb.GetModelRequest(name=m + nl))),
        ("SetPromotionPolicy", s.SetPromotionPolicy(pb.SetPromotionPolicyRequest(model=m + nl, policy=policy))),
        ("CreateVersion model", api.create_version(m + nl)),
        ("CreateVersion lineage.dataset",
         api.create_version(m, lineage=pb.Lineage(dataset=d + nl, dataset_version=1))),
        ("GetVersion", s.GetVersion(pb.GetVersionRequest(model=m + nl, version=v))),
        ("ListVersions", s.ListVersions(pb.ListVersionsRequest(model=m + nl))),
        ("FinalizeVersion", s.FinalizeVersion(pb.FinalizeVersionRequest(model=m + nl, version=w["pending"]))),
        ("UploadArtifact model", s.UploadArtifact(iter([pb.UploadArtifactRequest(header=artifact)]))),
        ("UploadArtifact target", s.UploadArtifact(iter([pb.UploadArtifactRequest(header=onnx)]))),
        ("DownloadArtifact model", api.download(model=m + nl, version=v, kind=common.ONNX, target="cpu")),
        ("DownloadArtifact target", api.download(model=m, version=v, kind=common.ONNX, target="cpu" + nl)),
        ("ListArtifacts", s.ListArtifacts(pb.ListArtifactsRequest(model=m + nl, version=v))),
        ("SetServingChoice model", s.SetServingChoice(pb.SetServingChoiceRequest(
            model=m + nl, version=v, target="cpu", artifact_sha256=w["onnx"]))),
        ("SetServingChoice target", s.SetServingChoice(pb.SetServingChoiceRequest(
            model=m, version=v, target="gpu" + nl, artifact_sha256=w["onnx"]))),
        ("GetServingChoice model",
         s.GetServingChoice(pb.GetServingChoiceRequest(model=m + nl, version=v, target="cpu"))),
        ("GetServingChoice target",
         s.GetServingChoice(pb.GetServingChoiceRequest(model=m, version=v, target="cpu" + nl))),
        ("CreateDataset", api.create_dataset(d + nl)),
        ("GetDataset", s.GetDataset(pb.GetDatasetRequest(name=d + nl))),
        ("UploadDatasetVersion", api.upload_dataset(d + nl, api.sample_npz(3))),
        ("GetDatasetVersion", s.GetDatasetVersion(pb.GetDatasetVersionRequest(dataset=d + nl, version=1))),
        ("ListDatasetVersions", s.ListDatasetVersions(pb.ListDatasetVersionsRequest(dataset=d + nl))),
        ("DownloadDatasetVersion", api.download_dataset(d + nl, 1)),
        ("SetAlias alias", api.set_alias(m, "prod" + nl, v)),
        ("SetAlias model", api.set_alias(m + nl, "prod", v)),
        ("DeleteAlias alias", s.DeleteAlias(pb.DeleteAliasRequest(model=m, alias="prod" + nl))),
        ("DeleteAlias model", s.DeleteAlias(pb.DeleteAliasRequest(model=m + nl, alias="prod"))),
        ("ResolveAlias alias", s.ResolveAlias(pb.ResolveAliasRequest(model=m, alias="prod" + nl))),
        ("ResolveAlias model", s.ResolveAlias(pb.ResolveAliasRequest(model=m + nl, alias="prod"))),
        ("ListAliases", s.ListAliases(pb.ListAliasesRequest(model=m + nl))),
        ("GetAliasHistory alias", s.GetAliasHistory(pb.GetAliasHistoryRequest(model=m, alias="prod" + nl))),
        ("GetAliasHistory model", s.GetAliasHistory(pb.GetAliasHistoryRequest(model=m + nl))),
        ("GetLineage", s.GetLineage(pb.GetLineageRequest(model=m + nl, version=v))),
    ]


async def test_a_name_with_a_trailing_newline_is_invalid_in_every_rpc_and_changes_nothing(api, events) -> None:
    w = await _world(api)
    before = await _snapshot(api, w)
    for what, call in _name_rpcs(api, w):
        error = await api.fails(call, INVALID, "not a valid name")
        assert "\\n" in error.details(), f"{what}: the message should show the refused value: {error.details()}"
    assert await _snapshot(api, w) == before
    promoted = await events.exactly(f"model.promoted.{w['model']}.>", 1)
    assert [e.subject for e in promoted] == [f"model.promoted.{w['model']}.prod"]


async def test_the_reported_newline_alias_is_refused_and_events_keep_flowing(api, events) -> None:
    """The case of the report: SetAlias(alias="prod\\n") was accepted and its subject blocked the relay."""
    model = (await api.create_model(required_targets=[])).name
    version = (await api.ready_version(model)).version
    await api.fails(api.set_alias(model, "prod\n", version), INVALID, "alias", "prod")
    assert api.state.outbox_subjects(f"model.promoted.{model}") == []
    await api.set_alias(model, "prod", version)
    found = await events.exactly(f"model.promoted.{model}.>", 1)
    assert found[0].subject == f"model.promoted.{model}.prod"


def _bounded_rpcs(api, w: dict) -> list[tuple[str, object]]:
    """(field, call) for a request with one field past its bound, in every RPC that writes text."""
    s, m, v, d = api.stub, w["model"], w["version"], w["dataset"]
    x = b"x" * 10

    def artifact(**fields) -> object:
        header = pb.ArtifactHeader(model=m, version=w["pending"], kind=common.CHECKPOINT,
                                   sha256=api.sha256(x), size_bytes=len(x), **fields)
        return s.UploadArtifact(iter([pb.UploadArtifactRequest(header=header), pb.UploadArtifactRequest(chunk=x)]))

    def choice(**fields) -> object:
        return s.SetServingChoice(pb.SetServingChoiceRequest(model=m, version=v, target="gpu",
                                                             artifact_sha256=w["onnx"], **fields))

    def version(**lineage) -> object:
        return api.create_version(m, lineage=pb.Lineage(**lineage))

    many_tensors = common.Signature(inputs=[common.TensorSpec(name=f"t{i}", shape=[1]) for i in range(65)])
    deep_tensor = common.Signature(inputs=[common.TensorSpec(name="x", shape=[1] * 17)])
    return [
        ("reason", api.set_alias(m, "staging", v, reason=LONG)),
        ("actor", api.set_alias(m, "staging", v, actor=SHORT)),
        ("actor", api.set_alias(m, "staging", v, actor="ops\nInjected: line")),
        ("reason", s.DeleteAlias(pb.DeleteAliasRequest(model=m, alias="prod", reason=LONG))),
        ("actor", s.SetPromotionPolicy(pb.SetPromotionPolicyRequest(
            model=m, policy=pb.PromotionPolicy(mode=pb.PromotionPolicy.MANUAL), actor=SHORT))),
        ("policy.metric", s.SetPromotionPolicy(pb.SetPromotionPolicyRequest(
            model=m, policy=pb.PromotionPolicy(mode=pb.PromotionPolicy.AUTO, metric=SHORT,
                                               direction=common.MAXIMIZE)))),
        ("model.description", api.create_model(description=LONG)),
        ("model.labels", api.create_model(labels={"team": BIG_VALUE})),
        ("model.labels", api.create_model(labels=TOO_MANY)),
        ("model.required_targets", api.create_model(required_targets=[f"t{i}" for i in range(65)])),
        ("idempotency_key", api.create_version(m, key=SHORT)),
        ("lineage.training_job", version(training_job=SHORT)),
        ("lineage.hyperparameters", version(hyperparameters={"lr": BIG_VALUE})),
        ("lineage.metrics", version(metrics={f"m{i}": 1.0 for i in range(MAX_METADATA_ENTRIES + 1)})),
        ("lineage.training_profile.description", version(training_profile=common.TrainingProfile(description=LONG))),
        ("lineage.training_profile.node_selector", version(
            training_profile=common.TrainingProfile(node_selector={"zone": BIG_VALUE}))),
        ("signature.inputs", api.create_version(m, signature=many_tensors)),
        ("signature.inputs[0].shape", api.create_version(m, signature=deep_tensor)),
        ("filename", artifact(filename=SHORT)),
        ("metadata", artifact(metadata={"note": BIG_VALUE})),
        ("gate.reason", artifact(gate=common.GateResult(reason=LONG))),
        ("profile.points", artifact(profile=common.MeasuredProfile(points=[common.LatencyPoint()] * 65))),
        ("reason", choice(reason=LONG)),
        ("candidates", choice(candidates=[pb.Candidate()] * 9)),
        ("candidates[0].reason", choice(candidates=[pb.Candidate(reason=LONG)])),
        ("dataset.description", api.create_dataset(description=LONG)),
        ("metadata", api.upload_dataset(d, api.sample_npz(4), metadata={"source": BIG_VALUE})),
        ("idempotency_key", api.upload_dataset(d, api.sample_npz(4), key=SHORT)),
        ("page_token", s.ListModels(pb.ListModelsRequest(page_token=SHORT))),
    ]


async def test_fields_past_their_bounds_are_invalid_naming_the_field_and_store_nothing(api, events) -> None:
    w = await _world(api)
    before = await _snapshot(api, w)
    created = {m.name for m in await api.all_models()}, {d.name for d in await api.all_datasets()}
    for field, call in _bounded_rpcs(api, w):
        await api.fails(call, INVALID, field)
    assert await _snapshot(api, w) == before, "a refused request changed something"
    assert ({m.name for m in await api.all_models()}, {d.name for d in await api.all_datasets()}) == created
    assert api.state.outbox_subjects(f"model.converted.{w['model']}.gpu") == []
    assert [e.payload.dataset_version.version for e in await events.exactly(f"data.updated.{w['dataset']}", 1)] == [1]


async def test_fields_at_their_bounds_are_stored_whole(api, events) -> None:
    model = (await api.create_model(required_targets=[], description="d" * MAX_LONG_TEXT,
                                    labels={f"k{i}": "v" * 100 for i in range(MAX_METADATA_ENTRIES)})).name
    version = (await api.ready_version(model)).version
    reason, actor = "r" * MAX_LONG_TEXT, "a" * MAX_SHORT_TEXT
    alias = await api.set_alias(model, "prod", version, actor=actor, reason=reason)
    assert (alias.actor, alias.reason) == (actor, reason)
    moved = (await events.exactly(f"model.promoted.{model}.prod", 1))[0].payload
    assert (moved.actor, moved.reason) == (actor, reason)
    dataset = (await api.create_dataset()).name
    stored = await api.upload_dataset(dataset, api.sample_npz(3), key="k" * MAX_SHORT_TEXT,
                                      metadata={"note": "n" * MAX_METADATA_VALUE})
    assert stored.metadata["note"] == "n" * MAX_METADATA_VALUE


async def test_a_request_whose_event_would_be_too_large_is_invalid_and_stores_nothing(api, events) -> None:
    """Each field within its bound, but 4-byte characters everywhere: the model.converted event would pass
    MAX_EVENT_BYTES, so the outbox refuses it and the whole transaction (the serving choice) with it."""
    model = (await api.create_model(required_targets=["cpu"])).name
    ready = await api.ready_version(model, onnx_target="cpu")
    onnx = next(a for a in ready.artifacts if a.kind == common.ONNX)
    wide = "\N{GRINNING FACE}" * MAX_LONG_TEXT                   # 4096 characters, 16 KiB in UTF-8
    candidates = [pb.Candidate(format=common.ONNX_FP32, reason=wide, gate=common.GateResult(reason=wide))] * 8
    request = pb.SetServingChoiceRequest(model=model, version=ready.version, target="cpu",
                                         artifact_sha256=onnx.sha256, candidates=candidates, reason=wide)
    await api.fails(api.stub.SetServingChoice(request), INVALID, "event", "bytes")
    await api.fails(api.stub.GetServingChoice(pb.GetServingChoiceRequest(model=model, version=ready.version,
                                                                         target="cpu")), grpc.StatusCode.NOT_FOUND)
    assert api.state.outbox_subjects(f"model.converted.{model}") == []
    assert not (await api.get_version(model, ready.version)).HasField("promotion"), "the version was decided"
    del request.candidates[:]
    assert (await api.stub.SetServingChoice(request)).artifact.sha256 == onnx.sha256
    assert len(await events.exactly(f"model.converted.{model}.cpu", 1)) == 1
