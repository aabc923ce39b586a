"""Models and versions through the Registry API: records, idempotent creates, numbering, finalize
preconditions, promotion policy, naming rule and NOT_FOUND — on both backends."""

from __future__ import annotations

import asyncio
import os

import grpc
import pytest

from splitstack.common.v1 import common_pb2 as common
from splitstack.registry.v1 import registry_pb2 as pb

NOT_FOUND = grpc.StatusCode.NOT_FOUND
INVALID = grpc.StatusCode.INVALID_ARGUMENT
EXISTS = grpc.StatusCode.ALREADY_EXISTS
PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION
BAD_NAMES = ["", "Upper", "-lead", "_lead", "a" * 64, "has space", "dot.name", "slash/name", "star*", "ünï"]


def _policy(**fields) -> pb.PromotionPolicy:
    defaults = dict(mode=pb.PromotionPolicy.MANUAL, metric="accuracy", direction=common.MAXIMIZE, margin=0.0)
    return pb.PromotionPolicy(**{**defaults, **fields})


async def test_create_model_stores_every_field_and_get_returns_it(api) -> None:
    name = api.name("m")
    created = await api.create_model(name, description="digits classifier", required_targets=["cpu", "gpu-t4"],
                                     promotion_policy=_policy(mode=pb.PromotionPolicy.AUTO, margin=0.5),
                                     labels={"team": "vision"})
    assert created.name == name and created.description == "digits classifier"
    assert list(created.required_targets) == ["cpu", "gpu-t4"]
    assert created.promotion_policy == _policy(mode=pb.PromotionPolicy.AUTO, margin=0.5)
    assert created.primary_metric == common.PrimaryMetric(name="accuracy", direction=common.MAXIMIZE)
    assert dict(created.labels) == {"team": "vision"}
    assert created.created_at.seconds > 0
    assert await api.stub.GetModel(pb.GetModelRequest(name=name)) == created


async def test_create_model_again_returns_the_record_and_a_different_payload_already_exists(api) -> None:
    created = await api.create_model(description="first")
    again = await api.create_model(created.name, description="first")
    assert again == created
    await api.fails(api.create_model(created.name, description="second"), EXISTS, created.name)
    await api.fails(api.create_model(created.name, description="first", required_targets=["gpu-t4"]), EXISTS)
    assert await api.stub.GetModel(pb.GetModelRequest(name=created.name)) == created


async def test_concurrent_identical_creates_all_return_the_one_record(api) -> None:
    name = api.name("m")
    models = await asyncio.gather(*(api.create_model(name, description="same") for _ in range(8)))
    assert all(m == models[0] for m in models)
    dataset = api.name("d")
    datasets = await asyncio.gather(*(api.create_dataset(dataset, description="same") for _ in range(8)))
    assert all(d == datasets[0] for d in datasets)


async def test_a_retry_is_the_same_payload_whatever_the_order_of_its_map_entries(api) -> None:
    model = (await api.create_model(labels={"a": "1", "b": "2", "c": "3"})).name
    assert (await api.create_model(model, labels={"c": "3", "b": "2", "a": "1"})).name == model
    forward = api.lineage(training_job="job-9", hyperparameters={f"p{i}": str(i) for i in range(6)},
                          metrics={f"m{i}": i / 10 for i in range(6)})
    backward = api.lineage(training_job="job-9", hyperparameters={f"p{i}": str(i) for i in reversed(range(6))},
                           metrics={f"m{i}": i / 10 for i in reversed(range(6))})
    first = await api.create_version(model, key="job-9", lineage=forward)
    assert (await api.create_version(model, key="job-9", lineage=backward)).version == first.version


async def test_a_garbage_page_token_is_invalid(api) -> None:
    await api.fails(api.stub.ListModels(pb.ListModelsRequest(page_token="not a token!")), INVALID, "page_token")


async def test_list_models_pages_through_every_model_once(api) -> None:
    names = {(await api.create_model()).name for _ in range(3)}
    listed = [m.name for m in await api.all_models(page_size=2)]
    assert len(listed) == len(set(listed)), "a model appeared on two pages"
    assert names <= set(listed)


async def test_names_outside_the_naming_rule_are_invalid_and_store_nothing(api) -> None:
    for bad in BAD_NAMES:
        await api.fails(api.create_model(bad), INVALID, "model")
        await api.fails(api.stub.GetModel(pb.GetModelRequest(name=bad)), INVALID, repr(bad))
    await api.fails(api.create_model(api.name("m"), required_targets=["cpu", "Bad Target"]), INVALID, "target")
    await api.fails(api.create_version("Not-Valid"), INVALID, "model")
    listed = {m.name for m in await api.all_models()}
    assert not listed & set(BAD_NAMES)
    longest = "a" * 55 + api.name("")[-8:]          # 63 characters: the longest valid name
    assert (await api.create_model(longest)).name == longest


async def test_unknown_models_and_versions_are_not_found_naming_them(api) -> None:
    missing = api.name("missing")
    await api.fails(api.stub.GetModel(pb.GetModelRequest(name=missing)), NOT_FOUND, missing)
    await api.fails(api.create_version(missing), NOT_FOUND, missing)
    await api.fails(api.get_version(missing, 1), NOT_FOUND, missing)
    await api.fails(api.stub.ListVersions(pb.ListVersionsRequest(model=missing)), NOT_FOUND, missing)
    await api.fails(api.finalize(missing, 1), NOT_FOUND, missing)
    await api.fails(api.stub.SetPromotionPolicy(pb.SetPromotionPolicyRequest(model=missing, policy=_policy())),
                    NOT_FOUND, missing)
    model = (await api.create_model()).name
    await api.fails(api.get_version(model, 99), NOT_FOUND, "99")
    await api.fails(api.finalize(model, 99), NOT_FOUND, "99")
    await api.fails(api.stub.ListArtifacts(pb.ListArtifactsRequest(model=model, version=99)), NOT_FOUND, "99")
    assert await api.all_versions(model) == []
    assert missing not in {m.name for m in await api.all_models()}


async def test_set_promotion_policy_changes_only_the_policy(api) -> None:
    created = await api.create_model(promotion_policy=_policy())
    policy = _policy(mode=pb.PromotionPolicy.AUTO, metric="f1", direction=common.MINIMIZE, margin=0.25)
    updated = await api.stub.SetPromotionPolicy(pb.SetPromotionPolicyRequest(model=created.name, policy=policy,
                                                                             actor="alice"))
    assert updated.promotion_policy == policy
    stored = await api.stub.GetModel(pb.GetModelRequest(name=created.name))
    assert stored.promotion_policy == policy
    stored.promotion_policy.CopyFrom(created.promotion_policy)
    assert stored == created, "SetPromotionPolicy changed more than the policy"


async def test_set_promotion_policy_rejects_a_negative_margin(api) -> None:
    created = await api.create_model(promotion_policy=_policy())
    await api.fails(api.stub.SetPromotionPolicy(pb.SetPromotionPolicyRequest(
        model=created.name, policy=_policy(mode=pb.PromotionPolicy.AUTO, margin=-1.0))), INVALID, "margin")
    assert (await api.stub.GetModel(pb.GetModelRequest(name=created.name))).promotion_policy == _policy()


async def test_create_version_numbers_from_one_pending_with_lineage_and_signature(api) -> None:
    model = (await api.create_model()).name
    lineage = api.lineage(parent_version=0)
    versions = [await api.create_version(model, lineage=lineage) for _ in range(3)]
    assert [v.version for v in versions] == [1, 2, 3]
    for version in versions:
        assert version.model == model and version.state == pb.PENDING
        assert version.lineage == lineage and version.signature == api.SIGNATURE
        assert version.created_at.seconds > 0 and not version.HasField("finalized_at")
        assert not version.artifacts and not version.serving_choices
        assert await api.get_version(model, version.version) == version
    listed = await api.all_versions(model, page_size=2)
    assert [v.version for v in listed] == [1, 2, 3]


async def test_each_model_numbers_its_own_versions(api) -> None:
    first, second = (await api.create_model()).name, (await api.create_model()).name
    numbers = [(await api.create_version(model)).version for model in (first, second, first, second, first)]
    assert numbers == [1, 1, 2, 2, 3]


async def test_create_version_with_an_idempotency_key_is_created_once(api) -> None:
    model = (await api.create_model()).name
    lineage = api.lineage()
    first = await api.create_version(model, key="job-1", lineage=lineage)
    assert first.idempotency_key == "job-1"
    again = await api.create_version(model, key="job-1", lineage=lineage)
    assert again == first
    await api.fails(api.create_version(model, key="job-1", lineage=api.lineage()), EXISTS, "job-1")
    other = await api.create_version(model, key="job-2", lineage=lineage)
    unkeyed = [await api.create_version(model, lineage=lineage) for _ in range(2)]
    assert [other.version] + [v.version for v in unkeyed] == [2, 3, 4]
    assert [v.version for v in await api.all_versions(model)] == [1, 2, 3, 4]


async def test_concurrent_creates_with_one_key_return_one_version(api) -> None:
    model = (await api.create_model()).name
    lineage = api.lineage()
    results = await asyncio.gather(*(api.create_version(model, key="retry", lineage=lineage) for _ in range(8)))
    assert {r.version for r in results} == {1}
    assert [v.version for v in await api.all_versions(model)] == [1]


async def test_concurrent_creates_without_a_key_number_versions_without_gap_or_duplicate(api) -> None:
    model = (await api.create_model()).name
    created = await asyncio.gather(*(api.create_version(model) for _ in range(20)))
    assert sorted(v.version for v in created) == list(range(1, 21))
    assert [v.version for v in await api.all_versions(model)] == list(range(1, 21))


async def test_many_concurrent_writers_get_gapless_versions_and_one_event_each(api, events) -> None:
    models = [(await api.create_model()).name for _ in range(3)]
    program, sample = os.urandom(1500), api.sample_npz()
    limit = asyncio.Semaphore(12)

    async def register(i: int) -> tuple[str, int]:
        async with limit:
            model = models[i % 3]
            version = (await api.create_version(model)).version
            await api.upload(model, version, program, common.EXPORTED_PROGRAM)
            await api.upload(model, version, sample, common.SAMPLE)
            assert (await api.finalize(model, version)).state == pb.READY
            return model, version

    done = await asyncio.gather(*(register(i) for i in range(45)))
    for model in models:
        assert sorted(v for m, v in done if m == model) == list(range(1, 16))
        found = await events.exactly(f"model.registered.{model}", 15, settle=0.5 if model == models[0] else 0)
        assert sorted(e.payload.version for e in found) == list(range(1, 16))


async def test_finalize_needs_an_exported_program_and_a_sample(api) -> None:
    model = (await api.create_model()).name
    version = (await api.create_version(model)).version
    await api.fails(api.finalize(model, version), PRECONDITION, "exported_program")
    await api.upload(model, version, b"program" * 100, common.EXPORTED_PROGRAM)
    await api.fails(api.finalize(model, version), PRECONDITION, "sample")
    assert (await api.get_version(model, version)).state == pb.PENDING
    await api.upload(model, version, api.sample_npz(), common.SAMPLE)
    ready = await api.finalize(model, version)
    assert ready.state == pb.READY and ready.finalized_at.seconds > 0
    assert {a.kind for a in ready.artifacts} == {common.EXPORTED_PROGRAM, common.SAMPLE}
    assert await api.finalize(model, version) == ready, "finalizing a READY version must return it unchanged"
    assert await api.get_version(model, version) == ready


async def test_finalize_without_a_sample_names_it_even_with_other_artifacts(api) -> None:
    model = (await api.create_model()).name
    version = (await api.create_version(model)).version
    await api.upload(model, version, api.sample_npz(), common.SAMPLE)
    await api.upload(model, version, b"ckpt" * 100, common.CHECKPOINT)
    await api.fails(api.finalize(model, version), PRECONDITION, "exported_program")
    stored = await api.get_version(model, version)
    assert stored.state == pb.PENDING and not stored.HasField("finalized_at")


@pytest.mark.parametrize("bad_version", [0, -1])
async def test_version_numbers_below_one_are_rejected(api, bad_version: int) -> None:
    model = (await api.create_model()).name
    await api.create_version(model)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await api.get_version(model, bad_version)
    assert caught.value.code() in (INVALID, NOT_FOUND), caught.value
