"""What "the loop completed" means, checked only through the contracts at the end of every test:

- every training gave exactly one version (its job id is the version's idempotency key);
- every version has at most one serving choice per target, one for each required target once
  converted, and it names an artifact of that version built for the target;
- no partial artifact: every artifact a version lists downloads completely and matches its SHA-256
  and size;
- no lost and no doubled event: each stream holds every message id once; every dataset version,
  finalized version, serving choice and alias move of the registry has exactly one event, and every
  ended training job one `training.finished`;
- the predicting client failed only while serving itself was down.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

from e2e_clients import Predictor, RegistryClient, StoredEvent, TrainerClient, sha256
from splitstack.events.v1 import events_pb2 as epb
from splitstack.registry.v1 import registry_pb2 as rpb
from splitstack.trainer.v1 import trainer_pb2 as tpb

FAILURE_SLACK_SECONDS = 1.0


def check_one_version_per_training(trainer: TrainerClient, registry: RegistryClient, model: str) -> None:
    """Each succeeded job of `model` is exactly one version, whose key is the job id."""
    by_key = Counter(v.idempotency_key for v in registry.versions(model))
    for job in trainer.jobs(model):
        if job.state == tpb.SUCCEEDED:
            assert by_key[job.id] == 1, f"job {job.id} gave {by_key[job.id]} versions of {model}"
            assert registry.version(model, job.model_version).idempotency_key == job.id


def check_serving_choices(registry: RegistryClient, model: str, targets: Iterable[str] = ("cpu",)) -> None:
    """One choice per (version, target), each for a listed artifact of that version."""
    for version in registry.versions(model):
        per_target = Counter(c.target for c in version.serving_choices)
        assert all(n == 1 for n in per_target.values()), f"{model} v{version.version}: choices {per_target}"
        digests = {a.sha256 for a in version.artifacts}
        for choice in version.serving_choices:
            assert choice.artifact.sha256 in digests, f"{model} v{version.version}: choice names an unlisted artifact"
        if version.serving_choices:
            assert set(targets) <= set(per_target), f"{model} v{version.version}: choices only for {set(per_target)}"


def check_artifacts(registry: RegistryClient, model: str) -> int:
    """Every listed artifact of every version downloads and matches its digest and size; how many."""
    count = 0
    for version in registry.versions(model):
        for artifact in version.artifacts:
            record, content = registry.download(artifact.sha256)
            assert record.sha256 == artifact.sha256
            assert sha256(content) == artifact.sha256 and len(content) == artifact.size_bytes, \
                f"{model} v{version.version}: artifact {artifact.filename} is partial or corrupt"
            count += 1
    return count


def check_events_once(events: list[StoredEvent]) -> None:
    """No message id twice in a stream (JetStream's de-duplication held across every restart)."""
    doubled = [k for k, n in Counter((e.stream, e.msg_id) for e in events).items() if n > 1]
    assert not doubled, f"events stored twice: {doubled}"
    assert all(e.msg_id for e in events), "a stored event has no Nats-Msg-Id"


def registry_changes(registry: RegistryClient, model: str) -> Counter:
    """What the registry holds for `model` that must have been announced once each."""
    expected: Counter = Counter()
    for version in registry.versions(model):
        if version.state == rpb.READY:
            expected[("model.registered", version.version)] += 1
        for choice in version.serving_choices:
            expected[("model.converted", version.version, choice.target)] += 1
    for move in registry.history(model):
        expected[("model.promoted", move.alias, move.from_version, move.to_version)] += 1
    return expected


def announced(events: list[StoredEvent], model: str) -> Counter:
    """The registry's announcements about `model` in the streams, in the shape of `registry_changes`."""
    seen: Counter = Counter()
    for event in events:
        payload = event.payload
        if isinstance(payload, epb.ModelRegistered) and payload.model == model:
            seen[("model.registered", payload.version)] += 1
        elif isinstance(payload, epb.ModelConverted) and payload.serving_choice.model == model:
            seen[("model.converted", payload.serving_choice.version, payload.serving_choice.target)] += 1
        elif isinstance(payload, epb.ModelPromoted) and payload.model == model:
            seen[("model.promoted", payload.alias, payload.previous_version, payload.version)] += 1
    return seen


def check_no_lost_event(events: list[StoredEvent], registry: RegistryClient, model: str,
                        trainer: TrainerClient | None = None) -> None:
    """Every registry change of `model` announced exactly once; every ended job of it finished once."""
    check_events_once(events)
    expected, seen = registry_changes(registry, model), announced(events, model)
    assert seen == expected, f"{model}: announced {dict(seen)}, registry holds {dict(expected)}"
    if trainer is not None:
        finished = Counter(e.payload.job_id for e in events if isinstance(e.payload, epb.TrainingFinished))
        for job in trainer.jobs(model):
            if job.state in (tpb.SUCCEEDED, tpb.FAILED, tpb.CANCELLED):
                assert finished[job.id] == 1, f"job {job.id}: training.finished {finished[job.id]} times"


def check_datasets_announced(events: list[StoredEvent], dataset: str, versions: int) -> None:
    """data.updated once for each of the dataset's versions."""
    seen = Counter(e.payload.dataset_version.version for e in events
                   if isinstance(e.payload, epb.DataUpdated) and e.payload.dataset_version.dataset == dataset)
    assert seen == Counter(range(1, versions + 1)), f"data.updated for {dataset}: {dict(seen)}"


def check_predictions(predictor: Predictor, down: Iterable[tuple[float, float]] = ()) -> None:
    """The client got answers throughout, and failures only inside the windows when serving was down."""
    windows = list(down)
    answered = [o for o in predictor.outcomes if not o.error]
    assert answered, "the predicting client never got an answer"
    stray = [o for o in predictor.failures()
             if not any(start <= o.at <= end + FAILURE_SLACK_SECONDS for start, end in windows)]
    assert not stray, f"{len(stray)} prediction(s) failed while serving was up, e.g. {stray[:3]}"


def check_loop(registry: RegistryClient, events: list[StoredEvent], model: str, *,
               trainer: TrainerClient | None = None, targets: Iterable[str] = ("cpu",)) -> None:
    """Every end-of-loop check on `model` (one version per training when `trainer` is given)."""
    if trainer is not None:
        check_one_version_per_training(trainer, registry, model)
    check_serving_choices(registry, model, targets)
    assert check_artifacts(registry, model) > 0
    check_no_lost_event(events, registry, model, trainer)
