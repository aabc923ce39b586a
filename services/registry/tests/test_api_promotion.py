"""The promotion policy through the Registry API, on both backends: once a version is complete (READY
with a serving choice for every required target), AUTO compares it with production and moves staging
then production (history rows and model.promoted events, actor and reason with the numbers), or
records why not; MANUAL only records. Decisions are made once, serialized per model, survive a kill
-9 between commit and publish (the promotion events arrive exactly once), and follow rollbacks."""

from __future__ import annotations

import asyncio
import os

import grpc
import pytest

from splitstack.common.v1 import common_pb2 as common
from splitstack.contracts.events import subject
from splitstack.registry.v1 import registry_pb2 as pb

ACTOR = "registry/promotion-policy"
PROMOTED = pb.PromotionDecision.PROMOTED
REJECTED = pb.PromotionDecision.REJECTED
RECORDED = pb.PromotionDecision.RECORDED
AFTER_COMMIT = "registry.after_commit"
RELAY_ONLY_WHEN_WOKEN = {"SPLITSTACK_REGISTRY_RELAY_POLL_SECONDS": "60"}


def _auto(metric: str = "accuracy", direction: int = common.MAXIMIZE, margin: float = 0.0) -> pb.PromotionPolicy:
    return pb.PromotionPolicy(mode=pb.PromotionPolicy.AUTO, metric=metric, direction=direction, margin=margin)


async def _model(api, policy: pb.PromotionPolicy | None = None, targets: tuple[str, ...] = ("cpu",)) -> str:
    fields = {"required_targets": list(targets)}
    if policy is not None:
        fields["promotion_policy"] = policy
    return (await api.create_model(**fields)).name


async def _candidate(api, model: str, metrics: dict[str, float], targets: tuple[str, ...] = ("cpu",),
                     lineage: pb.Lineage | None = None) -> int:
    """A READY version with `metrics` in its lineage and an ONNX artifact per target, no serving choice."""
    version = (await api.ready_version(model, lineage=lineage or api.lineage(metrics=metrics))).version
    for target in targets:
        await api.upload(model, version, os.urandom(2048), common.ONNX, target=target, format=common.ONNX_FP32,
                         filename=f"{target}.onnx")
    return version


def _choice_request(version: pb.ModelVersion, target: str,
                    reason: str = "best on target") -> pb.SetServingChoiceRequest:
    onnx = next(a for a in version.artifacts if a.kind == common.ONNX and a.target == target)
    return pb.SetServingChoiceRequest(model=version.model, version=version.version, target=target,
                                      artifact_sha256=onnx.sha256, reason=reason)


async def _choose(api, model: str, version: int, target: str = "cpu") -> pb.ServingChoice:
    return await api.stub.SetServingChoice(_choice_request(await api.get_version(model, version), target))


async def _challenger(api, model: str, targets: tuple[str, ...] = ("cpu",), lineage: pb.Lineage | None = None,
                      **metrics: float) -> pb.PromotionDecision:
    """A new version with `metrics`, made complete by its serving choices; the decision it got."""
    version = await _candidate(api, model, metrics, targets, lineage)
    for target in targets:
        await _choose(api, model, version, target)
    stored = await api.get_version(model, version)
    assert stored.HasField("promotion"), f"version {version} is complete but was not decided"
    return stored.promotion


async def _aliases(api, model: str) -> dict[str, int]:
    found = (await api.stub.ListAliases(pb.ListAliasesRequest(model=model))).aliases
    return {a.alias: a.version for a in found}


async def _moves(api, model: str, alias: str = "") -> list[tuple]:
    return [(m.alias, m.from_version, m.to_version, m.actor) for m in await api.history(model, alias)]


async def test_auto_promotes_the_first_complete_version_to_staging_then_production(api, events) -> None:
    model = await _model(api, _auto())
    version = await _candidate(api, model, {"accuracy": 0.965})
    assert not (await api.get_version(model, version)).HasField("promotion"), "decided before it was complete"
    assert await _aliases(api, model) == {}

    choice = await _choose(api, model, version)
    decision = (await api.get_version(model, version)).promotion
    assert decision.outcome == PROMOTED and decision.champion_version == 0
    assert decision.reason == "auto: accuracy 0.965 and no production version yet"
    assert (decision.metric, decision.challenger_value) == ("accuracy", 0.965) and decision.at.seconds > 0
    assert await _aliases(api, model) == {"staging": version, "production": version}
    history = await api.history(model)
    assert [(m.alias, m.from_version, m.to_version, m.actor, m.reason) for m in history] == [
        ("staging", 0, version, ACTOR, decision.reason), ("production", 0, version, ACTOR, decision.reason)]

    staged, = await events.exactly(subject("model_promoted", model=model, alias="staging"), 1)
    produced, = await events.exactly(subject("model_promoted", model=model, alias="production"), 1, settle=0)
    assert staged.seq < produced.seq, "production moved before staging"
    for stored in (staged, produced):
        moved = stored.payload
        assert (moved.version, moved.previous_version) == (version, 0)
        assert (moved.actor, moved.reason) == (ACTOR, decision.reason)
        assert [(t.target, t.artifact.sha256) for t in moved.serving_artifacts] == [("cpu", choice.artifact.sha256)]


async def test_a_better_challenger_is_promoted_and_a_worse_one_rejected(api, events) -> None:
    model = await _model(api, _auto())
    assert (await _challenger(api, model, accuracy=0.965)).outcome == PROMOTED
    better = await _challenger(api, model, accuracy=0.9712)
    assert better.outcome == PROMOTED and better.champion_version == 1
    assert better.reason == "auto: accuracy 0.9712 >= production v1 0.965 (margin 0)"
    assert await _aliases(api, model) == {"staging": 2, "production": 2}

    worse = await _challenger(api, model, accuracy=0.95)
    assert worse.outcome == REJECTED
    assert worse.reason == "auto: accuracy 0.95 < 0.9712 needed (production v2 0.9712 + margin 0); not promoted"
    assert (worse.champion_version, worse.challenger_value, worse.champion_value) == (2, 0.95, 0.9712)
    assert await _aliases(api, model) == {"staging": 2, "production": 2}

    # as good as the champion is enough with margin 0; the value may come from the primary metric alone
    primary_only = pb.Lineage(training_job="job-eq", primary_metric_value=0.9712,
                              primary_metric=common.PrimaryMetric(name="accuracy", direction=common.MAXIMIZE))
    tie = await _challenger(api, model, lineage=primary_only)
    assert tie.outcome == PROMOTED and tie.reason == "auto: accuracy 0.9712 >= production v2 0.9712 (margin 0)"
    assert await _moves(api, model, "production") == [("production", 0, 1, ACTOR), ("production", 1, 2, ACTOR),
                                                      ("production", 2, 4, ACTOR)]
    found = await events.exactly(subject("model_promoted", model=model, alias="production"), 3)
    assert sorted((e.payload.previous_version, e.payload.version) for e in found) == [(0, 1), (1, 2), (2, 4)]
    await events.exactly(subject("model_promoted", model=model, alias="staging"), 3, settle=0)


async def test_a_challenger_must_beat_production_by_the_margin(api) -> None:
    model = await _model(api, _auto(margin=0.01))
    assert (await _challenger(api, model, accuracy=0.9)).outcome == PROMOTED
    close = await _challenger(api, model, accuracy=0.905)
    assert close.outcome == REJECTED
    assert close.reason == "auto: accuracy 0.905 < 0.91 needed (production v1 0.9 + margin 0.01); not promoted"
    clear = await _challenger(api, model, accuracy=0.92)
    assert clear.outcome == PROMOTED and clear.reason == "auto: accuracy 0.92 >= production v1 0.9 (margin 0.01)"
    assert await _aliases(api, model) == {"staging": 3, "production": 3}


async def test_minimize_promotes_lower_values_beyond_the_margin(api) -> None:
    model = await _model(api, _auto("loss", common.MINIMIZE, margin=0.05))
    assert (await _challenger(api, model, loss=0.4, accuracy=0.9)).outcome == PROMOTED
    close = await _challenger(api, model, loss=0.38, accuracy=0.99)
    assert close.outcome == REJECTED
    assert close.reason == "auto: loss 0.38 > 0.35 needed (production v1 0.4 - margin 0.05); not promoted"
    lower = await _challenger(api, model, loss=0.3, accuracy=0.5)
    assert lower.outcome == PROMOTED and lower.reason == "auto: loss 0.3 <= production v1 0.4 (margin 0.05)"
    assert (await _challenger(api, model, loss=0.9, accuracy=0.99)).outcome == REJECTED
    assert await _aliases(api, model) == {"staging": 3, "production": 3}


async def test_nothing_moves_until_every_required_target_has_a_serving_choice(api, events) -> None:
    model = await _model(api, _auto(), targets=("cpu", "gpu-t4"))
    version = await _candidate(api, model, {"accuracy": 0.9}, targets=("cpu", "gpu-t4", "edge"))
    await _choose(api, model, version, "cpu")
    assert not (await api.get_version(model, version)).HasField("promotion")
    assert await _aliases(api, model) == {} and await api.history(model) == []
    await events.exactly(subject("model_promoted", model=model, alias="*"), 0)

    await _choose(api, model, version, "gpu-t4")
    decided = await api.get_version(model, version)
    assert decided.promotion.outcome == PROMOTED
    assert await _aliases(api, model) == {"staging": version, "production": version}
    produced, = await events.exactly(subject("model_promoted", model=model, alias="production"), 1)
    assert sorted(t.target for t in produced.payload.serving_artifacts) == ["cpu", "gpu-t4"]

    # a choice for another target after the decision decides nothing again
    await _choose(api, model, version, "edge")
    assert (await api.get_version(model, version)).promotion == decided.promotion
    assert len(await api.history(model)) == 2
    await events.exactly(subject("model_promoted", model=model, alias="*"), 2)


async def test_a_model_without_required_targets_decides_when_a_version_is_finalized(api, events) -> None:
    model = await _model(api, _auto(), targets=())
    version = (await api.create_version(model, lineage=api.lineage(metrics={"accuracy": 0.8}))).version
    await api.upload(model, version, os.urandom(4096), common.EXPORTED_PROGRAM, filename="model.pt2")
    await api.upload(model, version, api.sample_npz(), common.SAMPLE, filename="sample.npz")
    assert not (await api.get_version(model, version)).HasField("promotion")
    finalized = await api.finalize(model, version)
    assert finalized.promotion.outcome == PROMOTED and finalized == await api.get_version(model, version)
    assert await api.finalize(model, version) == finalized                     # a retry decides nothing again
    assert await _aliases(api, model) == {"staging": version, "production": version}
    await events.exactly(subject("model_promoted", model=model, alias="*"), 2)


async def test_manual_policy_records_the_decision_and_moves_nothing(api, events) -> None:
    model = await _model(api)                                      # no policy: MANUAL
    first = await _challenger(api, model, accuracy=0.9)
    assert first.outcome == RECORDED and first.champion_version == 0
    assert first.reason == "manual: recorded only; people move aliases (SetAlias); accuracy 0.9"
    assert await _aliases(api, model) == {} and await api.history(model) == []

    await api.set_alias(model, "production", 1, actor="alice", reason="by hand")
    second = await _challenger(api, model, accuracy=0.99)
    assert second.outcome == RECORDED and second.champion_version == 1
    assert second.reason.endswith("accuracy 0.99, production v1 0.9")
    assert await _aliases(api, model) == {"production": 1}
    assert await _moves(api, model) == [("production", 0, 1, "alice")]
    await events.exactly(subject("model_promoted", model=model, alias="*"), 1)


async def test_a_missing_metric_is_rejected_with_the_reason(api) -> None:
    model = await _model(api, _auto("f1"))
    missing = await _challenger(api, model, accuracy=0.99)
    assert missing.outcome == REJECTED
    assert missing.reason == "auto: v1 has no 'f1' metric in its lineage; not promoted"
    assert await _aliases(api, model) == {}
    assert (await _challenger(api, model, f1=0.8)).outcome == PROMOTED      # nothing in production yet

    policy = pb.SetPromotionPolicyRequest(model=model, policy=_auto("precision"), actor="alice")
    await api.stub.SetPromotionPolicy(policy)
    champion_lacks = await _challenger(api, model, precision=0.99)
    assert champion_lacks.outcome == REJECTED and champion_lacks.champion_version == 2
    assert champion_lacks.reason == "auto: production v2 has no 'precision' metric to compare 0.99 with; not promoted"
    assert await _aliases(api, model) == {"staging": 2, "production": 2}


async def test_after_a_rollback_the_restored_version_is_the_champion(api) -> None:
    model = await _model(api, _auto())
    await _challenger(api, model, accuracy=0.96)
    await _challenger(api, model, accuracy=0.97)
    await api.set_alias(model, "production", 1, actor="alice", reason="v2 misbehaves")
    third = await _challenger(api, model, accuracy=0.965)
    assert third.outcome == PROMOTED and third.champion_version == 1
    assert third.reason == "auto: accuracy 0.965 >= production v1 0.96 (margin 0)"
    fourth = await _challenger(api, model, accuracy=0.962)
    assert fourth.outcome == REJECTED and fourth.champion_version == 3
    assert await _moves(api, model, "production") == [
        ("production", 0, 1, ACTOR), ("production", 1, 2, ACTOR), ("production", 2, 1, "alice"),
        ("production", 1, 3, ACTOR)]
    assert await _moves(api, model, "staging") == [("staging", 0, 1, ACTOR), ("staging", 1, 2, ACTOR),
                                                   ("staging", 2, 3, ACTOR)]


async def test_a_repeated_serving_choice_decides_and_moves_nothing_again(api, events) -> None:
    model = await _model(api, _auto())
    version = await _candidate(api, model, {"accuracy": 0.9})
    request = _choice_request(await api.get_version(model, version), "cpu")
    choice = await api.stub.SetServingChoice(request)
    decided = await api.get_version(model, version)
    assert await api.stub.SetServingChoice(request) == choice
    await api.fails(api.stub.SetServingChoice(pb.SetServingChoiceRequest(
        model=model, version=version, target="cpu", artifact_sha256=request.artifact_sha256, reason="other")),
        grpc.StatusCode.ALREADY_EXISTS)
    assert await api.get_version(model, version) == decided
    assert len(await api.history(model)) == 2
    await events.exactly(subject("model_promoted", model=model, alias="*"), 2)


async def test_concurrent_completions_are_decided_one_after_the_other(api, new_client) -> None:
    model = await _model(api, _auto())
    await _challenger(api, model, accuracy=0.9)
    candidates = {v: await api.get_version(model, await _candidate(api, model, {"accuracy": a}))
                  for v, a in ((2, 0.95), (3, 0.97))}
    async with new_client() as one, new_client() as other:
        await asyncio.gather(*(client.stub.SetServingChoice(_choice_request(candidates[v], "cpu"))
                               for client, v in ((one, 2), (other, 3))))
    second, third = [(await api.get_version(model, v)).promotion for v in (2, 3)]
    assert third.outcome == PROMOTED and await _aliases(api, model) == {"staging": 3, "production": 3}
    moves = await _moves(api, model, "production")
    assert all(a[2] == b[1] for a, b in zip(moves, moves[1:])), f"moves are not one chain: {moves}"
    if second.outcome == PROMOTED:          # v2 went first: v3 was compared with it
        assert (second.champion_version, third.champion_version) == (1, 2)
        assert [m[2] for m in moves] == [1, 2, 3]
    else:                                   # v3 went first: v2 was compared with v3
        assert (second.outcome, second.champion_version, third.champion_version) == (REJECTED, 3, 1)
        assert [m[2] for m in moves] == [1, 3]


async def _dies_at(process, point: str) -> None:
    returncode = await asyncio.to_thread(process.wait_exit)
    assert returncode == -9, f"{process.name} ended with {returncode}, not SIGKILL"
    assert process.crashed_at(point), f"{process.name} died without reaching {point}"


async def test_kill_after_the_promoting_commit_announces_each_move_once_after_restart(registry) -> None:
    async with registry.event_log() as log:
        setup = await registry.start("setup")
        async with registry.connect(setup) as api:
            model = await _model(api, _auto())
            version = await api.get_version(model, await _candidate(api, model, {"accuracy": 0.9}))
        registered = subject("model_registered", model=model)
        await log.wait_for(registered, 1)
        assert await asyncio.to_thread(setup.stop) == 0
        request = _choice_request(version, "cpu")

        crashing = await registry.start("choice-crash", RELAY_ONLY_WHEN_WOKEN, crash_points=[AFTER_COMMIT])
        async with registry.connect(crashing) as api:
            with pytest.raises(grpc.aio.AioRpcError):
                await api.stub.SetServingChoice(request)
        await _dies_at(crashing, AFTER_COMMIT)
        promoted = subject("model_promoted", model=model, alias="*")
        assert await log.read(promoted) == [], "published before the kill?"

        restarted = await registry.start("after-crash")
        await log.wait_for(promoted, 2)
        async with registry.connect(restarted) as api:
            decided = await api.get_version(model, version.version)
            assert decided.promotion.outcome == PROMOTED
            assert await _aliases(api, model) == {"staging": 1, "production": 1}
            assert await api.stub.SetServingChoice(request) == decided.serving_choices[0]   # the client's retry
            assert await api.get_version(model, version.version) == decided
            assert await _moves(api, model) == [("staging", 0, 1, ACTOR), ("production", 0, 1, ACTOR)]
        found = await log.exactly(promoted, 2)
        await log.exactly(subject("model_converted", model=model, target="cpu"), 1, settle=0)
    assert sorted(e.payload.alias for e in found) == ["production", "staging"]
    assert all((e.payload.version, e.payload.actor, e.payload.reason) == (1, ACTOR, decided.promotion.reason)
               for e in found)
