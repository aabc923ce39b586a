"""The whole loop on one shared stack, without crashes: dataset -> train -> convert -> promote (the
registry's AUTO policy) -> serve -> new dataset version -> retrain -> challenger promoted -> hot swap;
and the promotion rules seen from outside: an INT8 candidate that fails its gate is never served, two
required targets wait for both serving choices, a worse challenger is not promoted, a rollback is
served."""

from __future__ import annotations

import numpy as np
import pytest

from e2e_checks import check_datasets_announced, check_loop, check_predictions
from e2e_clients import Predictor, StoredEvent, stored_events
from e2e_stack import Stack, wait_until
from e2e_support import (
    LOOP_DATASET, PROMOTION_ACTOR, Champion, Clients, Digits, HandOff, auto_model, copy_and_serve, job_spec, settle,
    wait_alias, wait_choice, wait_job, wait_served,
)

from splitstack.common.v1 import common_pb2 as common
from splitstack.converter.v1 import converter_pb2 as cpb
from splitstack.events.v1 import events_pb2 as epb
from splitstack.registry.v1 import registry_pb2 as rpb
from splitstack.trainer.v1 import trainer_pb2 as tpb

pytestmark = pytest.mark.timeout(600)   # several processes start, train and convert per test

CHALLENGER_ROWS = 1500
CHALLENGER_EPOCHS = 10


def promotions(events: list[StoredEvent], model: str) -> list[epb.ModelPromoted]:
    return [e.payload for e in events if isinstance(e.payload, epb.ModelPromoted) and e.payload.model == model]


def test_full_loop_retrains_on_new_data_and_hot_swaps_the_better_challenger(
        shared: Stack, shared_clients: Clients, champion: Champion, digits: Digits) -> None:
    api, model = shared_clients, champion.model
    inputs, labels = digits.held_out
    accuracy, versions = api.serving.accuracy(model, inputs, labels)
    assert versions == {str(champion.version)} and accuracy > 0.9, (accuracy, versions)

    policy = tpb.RetrainPolicy(name="loop-on-new-digits", model=model, dataset=LOOP_DATASET, enabled=True,
                               debounce_seconds=0.5,
                               template=job_spec(model, LOOP_DATASET, max_epochs=CHALLENGER_EPOCHS,
                                                 hyperparameters={"hidden": 128, "layers": 1, "lr": 0.01}))
    api.trainer.set_policy(policy)
    with Predictor(shared.address("serving"), model, inputs[:8]) as predictor:
        api.registry.upload_dataset(LOOP_DATASET, digits.dataset(CHALLENGER_ROWS))
        retrained = wait_until(lambda: [j for j in api.trainer.jobs(model) if j.retrain_policy == policy.name],
                               60, "the retraining job")[0]
        job = wait_job(api.trainer, retrained.id)
        challenger = job.model_version
        assert challenger == champion.version + 1
        wait_choice(api.registry, model, challenger)
        wait_alias(api.registry, model, challenger)
        wait_served(api.serving, model, challenger)
        predictor.wait_answered(str(challenger))
    check_predictions(predictor)          # the hot swap failed no request
    assert predictor.versions() == [str(champion.version), str(challenger)]

    accuracy, _ = api.serving.accuracy(model, inputs, labels)
    assert accuracy > 0.9, accuracy
    found = api.registry.version(model, challenger)
    assert found.lineage.dataset_version == 2 and found.lineage.primary_metric_value >= champion.handoff.metric_value
    assert found.promotion.outcome == rpb.PromotionDecision.PROMOTED and found.promotion.champion_version == 1
    assert api.registry.version(model, champion.version).promotion.outcome == rpb.PromotionDecision.PROMOTED
    conversions = [(c.version, c.target, c.state) for c in api.converter.conversions(model)]
    assert conversions == [(champion.version, "cpu", cpb.SUCCEEDED), (challenger, "cpu", cpb.SUCCEEDED)]
    settle()
    events = stored_events(shared.nats_url)
    check_loop(api.registry, events, model, trainer=api.trainer)
    check_datasets_announced(events, LOOP_DATASET, 2)
    moved = promotions(events, model)
    assert [(p.alias, p.version) for p in moved] == [("staging", 1), ("production", 1), ("staging", 2),
                                                      ("production", 2)], moved
    assert all(p.actor == PROMOTION_ACTOR for p in moved)
    deployed = [e.payload for e in events if isinstance(e.payload, epb.ModelDeployed) and e.payload.model == model]
    assert [(d.version, d.previous_version) for d in deployed][-1] == (challenger, champion.version), deployed


def test_int8_candidate_failing_its_gate_is_never_promoted_in_int8(
        shared: Stack, shared_clients: Clients, champion: Champion) -> None:
    """INT8 calibrated on all-zero inputs (the sample's `calibration_inputs`) collapses every activation:
    the gate rejects it, so the version is converted, promoted and served in FP32 only."""
    api, model = shared_clients, "int8-gate"
    api.registry.create_model(auto_model(model))
    degenerate = champion.handoff.with_calibration(np.zeros((64, 64), np.float32))
    with Predictor(shared.address("serving"), model, np.zeros((4, 64), np.float32)) as predictor:
        version, served = copy_and_serve(api.registry, api.serving, degenerate, model)
        predictor.wait_answered(str(version))
    assert {o.version for o in predictor.outcomes if not o.error} == {str(version)}   # never anything else

    found = api.registry.version(model, version)
    choice = found.serving_choices[0]
    assert choice.artifact.precision == common.PRECISION_FP32 and choice.artifact.format == common.ONNX_FP32
    assert served == choice.artifact.sha256
    int8 = [c for c in choice.candidates if c.format == common.ONNX_INT8]
    assert len(int8) == 1 and not int8[0].accepted and not int8[0].gate.passed, int8
    assert not int8[0].artifact_sha256
    assert all(a.precision != common.PRECISION_INT8 for a in found.artifacts), "a rejected INT8 was stored"
    assert found.promotion.outcome == found.promotion.PROMOTED, found.promotion
    settle()
    events = stored_events(shared.nats_url)
    check_loop(api.registry, events, model)
    for promoted in promotions(events, model):
        assert [t.artifact.sha256 for t in promoted.serving_artifacts] == [choice.artifact.sha256], promoted


def test_two_required_targets_wait_for_the_t4_choice_written_as_a_gpu_converter_would(
        shared: Stack, shared_clients: Clients, champion: Champion) -> None:
    """Required targets cpu and t4-int8: the cpu pool's choice alone promotes nothing. No t4 converter
    runs here, so the test itself uploads the t4-int8 artifact and writes its serving choice through the
    registry's SetServingChoice, as a GPU converter pool would; only then is the version promoted."""
    api, model = shared_clients, "two-targets"
    loop_client = Predictor(shared.address("serving"), champion.model, np.zeros((4, 64), np.float32))
    with loop_client:     # serving a model while following another one's promotions fails nothing
        two_targets(api, shared, model, champion.handoff)
    check_predictions(loop_client)


def two_targets(api: Clients, shared: Stack, model: str, handoff: HandOff) -> None:
    """The body of the two-targets test: cpu choice, nothing promoted, t4-int8 choice, promoted and served."""
    api.registry.create_model(auto_model(model, ("cpu", "t4-int8")))
    version = handoff.register(api.registry, model)
    cpu = wait_choice(api.registry, model, version)
    settle()
    found = api.registry.version(model, version)
    assert not found.HasField("promotion"), found.promotion
    assert api.registry.alias(model) == 0 and api.registry.alias(model, "staging") == 0
    assert api.serving.served(model) == ("", "")
    assert promotions(stored_events(shared.nats_url), model) == []

    _, onnx = api.registry.download(cpu.artifact.sha256)
    t4 = api.registry.upload(rpb.ArtifactHeader(model=model, version=version, kind=common.ONNX, target="t4-int8",
                                                precision=common.PRECISION_FP32, format=common.ONNX_FP32,
                                                filename="model.onnx"), onnx)
    api.registry.set_serving_choice(model, version, "t4-int8", t4.sha256, "e2e: written as a t4-int8 pool would")
    wait_alias(api.registry, model, version)
    assert wait_served(api.serving, model, version) == cpu.artifact.sha256
    assert api.registry.version(model, version).promotion.outcome == rpb.PromotionDecision.PROMOTED
    settle()
    events = stored_events(shared.nats_url)
    check_loop(api.registry, events, model, targets=("cpu", "t4-int8"))
    for promoted in promotions(events, model):
        assert {t.target for t in promoted.serving_artifacts} == {"cpu", "t4-int8"}, promoted


def test_worse_challenger_is_not_promoted_and_serving_keeps_the_champion(
        shared: Stack, shared_clients: Clients, champion: Champion, digits: Digits) -> None:
    api, model = shared_clients, "worse"
    api.registry.create_model(auto_model(model))
    first, served = copy_and_serve(api.registry, api.serving, champion.handoff, model)
    inputs, _ = digits.held_out
    with Predictor(shared.address("serving"), model, inputs[:8]) as predictor:
        job = api.trainer.submit(job_spec(model, LOOP_DATASET, max_epochs=1,
                                          hyperparameters={"hidden": 8, "layers": 1, "lr": 0.0005}))
        worse = wait_job(api.trainer, job.id).model_version
        assert worse == first + 1
        wait_choice(api.registry, model, worse)
        decided = wait_until(lambda: (v := api.registry.version(model, worse)).HasField("promotion") and v, 30,
                             "the promotion decision")
        settle()
    assert decided.promotion.outcome == rpb.PromotionDecision.REJECTED, decided.promotion
    assert decided.promotion.champion_version == first
    assert decided.promotion.challenger_value < decided.promotion.champion_value
    assert api.registry.alias(model) == first and api.registry.alias(model, "staging") == first
    assert api.serving.served(model) == (str(first), served)
    check_predictions(predictor)
    assert predictor.versions() == [str(first)]
    check_loop(api.registry, stored_events(shared.nats_url), model, trainer=api.trainer)


def test_rollback_of_production_is_served(shared: Stack, shared_clients: Clients, champion: Champion,
                                          digits: Digits) -> None:
    api, model = shared_clients, "rollback"
    api.registry.create_model(auto_model(model))
    first, _ = copy_and_serve(api.registry, api.serving, champion.handoff, model)
    second, _ = copy_and_serve(api.registry, api.serving, champion.handoff, model)   # as good: promoted
    inputs, _ = digits.held_out
    with Predictor(shared.address("serving"), model, inputs[:8]) as predictor:
        predictor.wait_answered(str(second))
        api.registry.set_alias(model, first, reason="rollback: v2 misbehaves in production")
        wait_served(api.serving, model, first, timeout=60)
        predictor.wait_answered(str(first))
    check_predictions(predictor)
    assert predictor.versions() == [str(second), str(first)]
    assert api.registry.alias(model, "staging") == second       # a rollback moves production only
    last = api.registry.history(model)[-1]
    assert (last.alias, last.from_version, last.to_version, last.actor) == ("production", second, first,
                                                                            "e2e-operator")
    assert last.reason.startswith("rollback")
    settle()
    events = stored_events(shared.nats_url)
    check_loop(api.registry, events, model)
    deployed = [e.payload for e in events if isinstance(e.payload, epb.ModelDeployed) and e.payload.model == model]
    assert (deployed[-1].version, deployed[-1].previous_version) == (first, second), deployed
