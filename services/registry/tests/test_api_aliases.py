"""Aliases and lineage through the Registry API: set / resolve / list / delete with actor and reason,
the audit history, no-op moves, preconditions, GetLineage, and that only aliases ever move."""

from __future__ import annotations

import os

import grpc

from splitstack.common.v1 import common_pb2 as common
from splitstack.registry.v1 import registry_pb2 as pb

NOT_FOUND = grpc.StatusCode.NOT_FOUND
INVALID = grpc.StatusCode.INVALID_ARGUMENT
EXISTS = grpc.StatusCode.ALREADY_EXISTS
PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION


def _moves(moves) -> list[tuple]:
    return [(m.alias, m.from_version, m.to_version, m.actor, m.reason) for m in moves]


async def _resolve(api, model: str, alias: str) -> pb.ResolveAliasResponse:
    return await api.stub.ResolveAlias(pb.ResolveAliasRequest(model=model, alias=alias))


async def _aliases(api, model: str) -> list[pb.Alias]:
    return list((await api.stub.ListAliases(pb.ListAliasesRequest(model=model))).aliases)


async def test_aliases_set_resolve_list_move_and_delete_with_actor_and_reason(api) -> None:
    model = (await api.create_model()).name
    first, second = await api.ready_version(model), await api.ready_version(model)
    production = await api.set_alias(model, "production", 1, actor="alice", reason="first release")
    assert (production.model, production.alias, production.version) == (model, "production", 1)
    assert (production.actor, production.reason) == ("alice", "first release")
    assert production.updated_at.seconds > 0
    resolved = await _resolve(api, model, "production")
    assert resolved.alias == production and resolved.version == first
    assert await _aliases(api, model) == [production]

    staging = await api.set_alias(model, "staging", 2, actor="bob", reason="candidate")
    moved = await api.set_alias(model, "production", 2, actor="carol", reason="better accuracy")
    assert (moved.version, moved.actor, moved.reason) == (2, "carol", "better accuracy")
    assert (await _resolve(api, model, "production")).version == second
    assert sorted((a.alias, a.version) for a in await _aliases(api, model)) == [("production", 2), ("staging", 2)]

    deleted = await api.stub.DeleteAlias(pb.DeleteAliasRequest(model=model, alias="production", actor="dave",
                                                               reason="retired"))
    assert _moves([deleted.move]) == [("production", 2, 0, "dave", "retired")] and deleted.move.at.seconds > 0
    await api.fails(_resolve(api, model, "production"), NOT_FOUND, "production")
    assert await _aliases(api, model) == [staging]

    history = await api.history(model, "production")
    assert _moves(history) == [("production", 0, 1, "alice", "first release"),
                               ("production", 1, 2, "carol", "better accuracy"),
                               ("production", 2, 0, "dave", "retired")]
    times = [m.at.ToNanoseconds() for m in history]
    assert times == sorted(times) and times[0] > 0
    assert all(m.model == model for m in history)
    everything = await api.history(model)
    assert sorted(_moves(everything)) == sorted(_moves(history) + [("staging", 0, 2, "bob", "candidate")])


async def test_setting_an_alias_to_its_current_version_is_a_no_op(api) -> None:
    model = (await api.create_model()).name
    await api.ready_version(model)
    first = await api.set_alias(model, "production", 1, actor="alice", reason="release")
    again = await api.set_alias(model, "production", 1, actor="bob", reason="again")
    assert again.version == 1
    assert (await _resolve(api, model, "production")).alias == first, "a no-op must not rewrite the alias"
    assert _moves(await api.history(model, "production")) == [("production", 0, 1, "alice", "release")]


async def test_aliases_need_an_existing_ready_version_and_a_valid_name(api) -> None:
    model = (await api.create_model()).name
    ready = (await api.ready_version(model)).version
    pending = (await api.create_version(model)).version
    await api.fails(api.set_alias(model, "production", pending), PRECONDITION)
    await api.fails(api.set_alias(model, "production", 99), NOT_FOUND, "99")
    missing = api.name("missing")
    await api.fails(api.set_alias(missing, "production", 1), NOT_FOUND, missing)
    for bad in ("Production", "has space", "", "a" * 64, "dot.ted"):
        await api.fails(api.set_alias(model, bad, ready), INVALID, "alias")
    await api.fails(_resolve(api, model, "production"), NOT_FOUND, "production")
    await api.fails(api.stub.DeleteAlias(pb.DeleteAliasRequest(model=model, alias="production", actor="x")),
                    NOT_FOUND, "production")
    await api.fails(api.stub.ListAliases(pb.ListAliasesRequest(model=missing)), NOT_FOUND, missing)
    await api.fails(api.stub.GetAliasHistory(pb.GetAliasHistoryRequest(model=missing)), NOT_FOUND, missing)
    await api.fails(api.stub.ResolveAlias(pb.ResolveAliasRequest(model=model, alias="Bad Alias")), INVALID, "alias")
    assert await _aliases(api, model) == []
    assert await api.history(model) == []


async def test_lineage_returns_the_dataset_version_ancestors_and_aliases(api) -> None:
    dataset = (await api.create_dataset()).name
    data = api.sample_npz(10)
    dataset_version = await api.upload_dataset(dataset, data)
    model = (await api.create_model()).name
    from_data = dict(dataset=dataset, dataset_version=1, dataset_digest=dataset_version.sha256)
    await api.ready_version(model, lineage=api.lineage(**from_data))
    await api.ready_version(model, lineage=api.lineage(**from_data, parent_version=1))
    third = await api.ready_version(model, lineage=api.lineage(**from_data, parent_version=2))
    for alias, version in (("production", 3), ("staging", 3), ("canary", 2)):
        await api.set_alias(model, alias, version)

    lineage = await api.stub.GetLineage(pb.GetLineageRequest(model=model, version=3))
    assert lineage.version == third
    assert lineage.dataset_version == dataset_version
    assert list(lineage.ancestors) == [await api.get_version(model, 2), await api.get_version(model, 1)]
    assert sorted(a.alias for a in lineage.aliases) == ["production", "staging"]
    root = await api.stub.GetLineage(pb.GetLineageRequest(model=model, version=1))
    assert not root.ancestors and not root.aliases and root.dataset_version == dataset_version
    await api.fails(api.stub.GetLineage(pb.GetLineageRequest(model=model, version=99)), NOT_FOUND, "99")


async def test_only_aliases_move_versions_artifacts_and_choices_stay_as_written(api) -> None:
    model = (await api.create_model()).name
    lineage = api.lineage()
    ready = await api.ready_version(model, key="job-1", lineage=lineage, onnx_target="cpu")
    onnx = next(a for a in ready.artifacts if a.kind == common.ONNX)
    await api.stub.SetServingChoice(pb.SetServingChoiceRequest(model=model, version=1, target="cpu",
                                                               artifact_sha256=onnx.sha256, reason="only one"))
    written = await api.get_version(model, 1)
    await api.set_alias(model, "production", 1)
    await api.set_alias(model, "staging", 1)
    await api.stub.DeleteAlias(pb.DeleteAliasRequest(model=model, alias="staging", actor="x"))

    await api.fails(api.create_version(model, key="job-1", lineage=api.lineage()), EXISTS)
    try:
        await api.upload(model, 1, os.urandom(64), common.EXPORTED_PROGRAM)
    except grpc.aio.AioRpcError as exc:
        assert exc.code() in (PRECONDITION, EXISTS), exc
    else:
        raise AssertionError("a READY version's exported program was replaced")
    await api.fails(api.upload(model, 1, os.urandom(64), common.ONNX, target="cpu", format=common.ONNX_FP32), EXISTS)
    await api.fails(api.stub.SetServingChoice(pb.SetServingChoiceRequest(
        model=model, version=1, target="cpu", artifact_sha256=onnx.sha256, reason="changed")), EXISTS)
    assert await api.finalize(model, 1) == written
    assert await api.get_version(model, 1) == written
