"""The SDK against a real local stack: the client's own supervisor starts NATS, registry, trainer,
converter and serving (from the shipped stack file) into a temporary state dir, once per module.

Real digits training (small MLP, few epochs), real conversion and profiling, real serving. The
first deployment runs while serving follows no model (the pipeline loads the version there); then
serving is restarted following the model, and later promotions and rollbacks are followed by it.
"""

from __future__ import annotations

import hashlib
import sys
import threading
import time
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

import grpc
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))  # sdk_support: beside this file

from sdk_support import LocalStack, digits_arrays, download_artifact, register_by_hand, write_digits  # noqa: E402

from splitstack.chassis.testing.fixtures import SERVICE_LOGS  # noqa: E402
from splitstack.client.sdk import Deployment, Event, Pipeline, Platform, PlatformError  # noqa: E402
from splitstack.common.v1 import common_pb2 as common  # noqa: E402
from splitstack.events.v1 import events_pb2  # noqa: E402
from splitstack.trainer.v1 import trainer_pb2 as tpb  # noqa: E402

pytestmark = pytest.mark.timeout(900)   # the module's stack and first training count towards the first test

MODEL = "sdkdigits"
SPEC = {"model": MODEL, "recipe": "digits-mlp", "hyperparameters": {"hidden": 128, "lr": 0.02},
        "max_epochs": 10, "seed": 1}
WAIT_SECONDS = 180


@pytest.fixture(scope="module")
def local_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    running = LocalStack(tmp_path_factory.mktemp("sdk"))
    try:
        running.up()
        yield running
    finally:
        running.down()


def open_platform(local_stack: LocalStack) -> Platform:
    return Platform.from_stack(local_stack.paths.state_dir, local_stack.paths.stack_file)


@pytest.fixture
def platform(local_stack: LocalStack, request: pytest.FixtureRequest) -> Iterator[Platform]:
    request.node.stash.setdefault(SERVICE_LOGS, []).append(local_stack)
    with open_platform(local_stack) as opened:
        yield opened


@pytest.fixture(scope="module")
def first(local_stack: LocalStack, tmp_path_factory: pytest.TempPathFactory) -> tuple[Deployment, list[tpb.Job]]:
    """The first deployment of MODEL, from a local .npz file, while serving follows no model."""
    data = write_digits(tmp_path_factory.mktemp("data") / "digits.npz")
    seen: list[tpb.Job] = []
    with open_platform(local_stack) as platform:
        deployment = Pipeline(platform).train_and_deploy(SPEC, data, on_progress=seen.append, timeout=600)
    return deployment, seen


def next_event(subscription: object, match: object, timeout: float = 30.0) -> Event:
    """The first event on `subscription` for which `match(event)` holds."""
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        event = subscription.get(timeout=left)     # type: ignore[attr-defined]
        if event is not None and match(event):     # type: ignore[operator]
            return event
    raise AssertionError(f"no matching event within {timeout:g}s")


def accuracy(platform: Platform, version: int | None = None) -> float:
    inputs, labels = digits_arrays()
    outputs = platform.predict(MODEL, inputs, version=version)
    assert list(outputs) == ["logits"] and outputs["logits"].shape == (len(inputs), 10)
    assert outputs["logits"].dtype == np.float32
    return float((outputs["logits"].argmax(axis=1) == labels).mean())


def test_publish_dataset_round_trip_and_data_updated(platform: Platform, tmp_path: Path) -> None:
    path = write_digits(tmp_path / "five-hundred.npz", rows=500)
    with platform.subscribe(["data.updated.>"]) as live:
        published = platform.publish_dataset("sdkdata", path, metadata={"source": "sklearn"}, description="digits")
        event = next_event(live, lambda e: e.subject == "data.updated.sdkdata")
    assert (published.dataset, published.version, published.row_count) == ("sdkdata", 1, 500)
    assert published.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert isinstance(event.payload, events_pb2.DataUpdated) and event.payload.dataset_version == published
    assert event.producer.startswith("registry/") and event.event_id
    assert abs(datetime.now(timezone.utc) - event.occurred_at) < timedelta(minutes=5)

    inputs, labels = digits_arrays()
    keyed = [platform.publish_dataset("sdkdata", {"inputs": inputs[:300], "labels": labels[:300]},
                                      idempotency_key="three-hundred") for _ in range(2)]
    assert keyed[0].version == keyed[1].version == 2 and keyed[0].row_count == 300   # a retry is the same version
    assert [v.version for v in platform.dataset_versions("sdkdata")] == [1, 2]
    assert "sdkdata" in [d.name for d in platform.datasets()]

    stop = threading.Event()
    timer = threading.Timer(30.0, stop.set)
    timer.start()
    try:
        history = platform.tail_events(["data.updated.sdkdata"], since_start=True, stop=stop)
        replayed = [next(history).payload.dataset_version.version for _ in range(2)]
        history.close()
    finally:
        timer.cancel()
    assert replayed == [1, 2]


def test_train_and_deploy_serves_the_trained_version(platform: Platform, first: tuple[Deployment, list[tpb.Job]]) -> None:
    deployment, seen = first
    job = deployment.job
    assert job is not None and job.state == tpb.SUCCEEDED and deployment.version == job.model_version >= 1
    assert seen[-1].state == tpb.SUCCEEDED and any(j.state == tpb.RUNNING and j.progress.epoch > 0 for j in seen)
    assert (deployment.model, deployment.target, deployment.promoted_alias) == (MODEL, "cpu", "production")
    assert deployment.endpoint == platform.endpoints.serving["cpu"]
    # The data was published from the local file first: the job trained on that dataset version.
    assert job.spec.dataset == MODEL and job.spec.dataset_version == platform.dataset_versions(MODEL)[-1].version

    choice = deployment.serving_choice
    assert (choice.model, choice.version, choice.target) == (MODEL, deployment.version, "cpu")
    assert deployment.format in ("ONNX_FP32", "ONNX_INT8") and choice.artifact.sha256 and choice.reason
    profile = deployment.profile
    assert profile.target == "cpu" and profile.device and "onnxruntime" in profile.runtime
    assert profile.points and all(p.p50_ms > 0 and p.p99_ms >= p.p50_ms and p.throughput_rows_per_s > 0
                                  and p.runs > 0 for p in profile.points)
    assert 0.5 < profile.accuracy <= 1.0
    assert 0.5 < deployment.metrics["accuracy"] <= 1.0 and "loss" in deployment.metrics

    assert platform.serving_version(MODEL) == deployment.version
    assert accuracy(platform) > 0.6                        # chance is 0.1
    assert [a.version for a in platform.aliases(MODEL) if a.alias == "production"] == [deployment.version]
    assert deployment.summary().startswith(f"{MODEL} production -> version {deployment.version} serving on cpu")


def test_serving_follows_promotion_and_rollback(local_stack: LocalStack,
                                                first: tuple[Deployment, list[tpb.Job]]) -> None:
    v1 = first[0].version
    local_stack.up(serving_models=MODEL)          # serving restarts, now following MODEL@production
    with open_platform(local_stack) as platform, \
            platform.subscribe([f"model.deployed.{MODEL}.cpu"]) as deployed:
        assert platform.serving_version(MODEL) == v1
        second = Pipeline(platform).train_and_deploy({**SPEC, "seed": 2}, MODEL, timeout=600)
        v2 = second.version
        assert v2 == v1 + 1 and second.promoted_alias == "production"
        followed = next_event(deployed, lambda e: e.payload.version == v2)
        assert followed.payload.alias == "production" and followed.payload.previous_version == v1
        assert platform.serving_version(MODEL) == v2 and accuracy(platform) > 0.6

        moved = platform.rollback(MODEL, reason="sdk test")
        assert (moved.alias, moved.version, moved.reason) == ("production", v1, "sdk test")
        platform.wait_serving_version(MODEL, v1, timeout=WAIT_SECONDS, events=deployed)
        assert platform.serving_version(MODEL) == v1 and accuracy(platform) > 0.6

        assert platform.promote(MODEL, v2, reason="again").version == v2
        platform.wait_serving_version(MODEL, v2, timeout=WAIT_SECONDS, events=deployed)
        assert platform.serving_version(MODEL) == v2
        history = [(m.from_version, m.to_version) for m in platform.alias_history(MODEL, "production")]
        assert history == [(0, v1), (v1, v2), (v2, v1), (v1, v2)]


def test_an_auto_policy_that_rejects_the_version_is_respected(platform: Platform,
                                                             first: tuple[Deployment, list[tpb.Job]]) -> None:
    production = next(a.version for a in platform.aliases(MODEL) if a.alias == "production")
    impossible = {"mode": "AUTO", "metric": "accuracy", "direction": "MAXIMIZE", "margin": 1.0}
    assert platform.set_promotion_policy(MODEL, impossible).promotion_policy.margin == 1.0
    third = Pipeline(platform).train_and_deploy({**SPEC, "seed": 3, "max_epochs": 3}, MODEL, timeout=600)
    assert third.version > production and third.promoted_alias is None
    assert third.promotion is not None and third.promotion.outcome == third.promotion.REJECTED
    assert third.promotion.champion_version == production and "accuracy" in third.promotion.reason
    assert "NOT promoted" in third.summary()
    assert next(a.version for a in platform.aliases(MODEL) if a.alias == "production") == production
    assert platform.serving_version(MODEL) == production
    platform.set_promotion_policy(MODEL, {"mode": "MANUAL"})


def test_service_errors_reach_the_caller_with_the_services_message(platform: Platform, tmp_path: Path,
                                                                   first: tuple[Deployment, list[tpb.Job]]) -> None:
    with pytest.raises(PlatformError) as unknown_model:
        platform.model("sdk-no-such-model")
    error = unknown_model.value
    assert (error.service, error.code) == ("registry", grpc.StatusCode.NOT_FOUND) and "sdk-no-such-model" in error.message
    assert str(error) == f"registry: NOT_FOUND: {error.message}"

    cases = [(lambda: platform.submit({"model": MODEL, "recipe": "no-such-recipe", "dataset": MODEL}),
              "trainer", grpc.StatusCode.INVALID_ARGUMENT, "no-such-recipe"),
             (lambda: platform.predict("sdk-no-such-model", np.zeros((1, 64))), "serving", grpc.StatusCode.NOT_FOUND,
              "sdk-no-such-model"),
             (lambda: platform.predict(MODEL, np.zeros((1, 3))), "serving", grpc.StatusCode.INVALID_ARGUMENT, "x"),
             (lambda: platform.convert(MODEL, 999, "cpu"), "converter", grpc.StatusCode.NOT_FOUND, "999"),
             (lambda: platform.promote(MODEL, 999), "registry", grpc.StatusCode.NOT_FOUND, "999"),
             (lambda: platform.publish_dataset("sdkbad", b"not an npz"), "registry", grpc.StatusCode.INVALID_ARGUMENT,
              "npz")]
    for action, service, code, mentioned in cases:
        with pytest.raises(PlatformError) as failure:
            action()
        assert (failure.value.service, failure.value.code) == (service, code), failure.value
        assert mentioned in failure.value.message, failure.value

    jobs_before = len(platform.jobs(model=MODEL))
    with pytest.raises(ValueError, match="no serving address for target 'tpu'"):
        Pipeline(platform).train_and_deploy(SPEC, MODEL, target="tpu")
    with pytest.raises(ValueError, match="missing.npz"):
        Pipeline(platform).train_and_deploy(SPEC, str(tmp_path / "missing.npz"))
    assert len(platform.jobs(model=MODEL)) == jobs_before     # nothing was submitted
    platform.promote(MODEL, first[0].version, "sdk-moved-once")
    with pytest.raises(PlatformError, match="no earlier version to roll back to") as no_earlier:
        platform.rollback(MODEL, "sdk-moved-once")
    assert no_earlier.value.code == grpc.StatusCode.FAILED_PRECONDITION


def test_wait_serving_choice_reports_a_failed_conversion_and_times_out(
        platform: Platform, first: tuple[Deployment, list[tpb.Job]]) -> None:
    version = first[0].version
    sample = next(a for a in platform.artifacts(MODEL, version) if a.kind == common.SAMPLE)
    garbage = bytes(np.random.default_rng(7).integers(0, 256, 50_000, dtype=np.uint8))
    broken = register_by_hand(platform.endpoints.registry, "sdkcorrupt", garbage,
                              download_artifact(platform.endpoints.registry, sample.sha256))
    with pytest.raises(PlatformError) as failure:
        platform.wait_serving_choice("sdkcorrupt", broken, "cpu", timeout=WAIT_SECONDS)
    error = failure.value
    assert (error.service, error.details["stage"]) == ("converter", "export"), error
    assert "cannot load the exported program" in error.message and error.details["reason"] in error.message

    started = time.monotonic()
    with pytest.raises(TimeoutError, match=f"no serving choice for {MODEL} version {version} on target t4-int8"):
        platform.wait_serving_choice(MODEL, version, "t4-int8", timeout=2)
    assert time.monotonic() - started < 30
