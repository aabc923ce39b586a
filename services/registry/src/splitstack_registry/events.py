"""Which events the registry announces, on which subjects, under which ids.

Each change has exactly one event, and its id is derived from the change itself (plus the model's
or dataset's random uid, so a re-created database never reuses ids still inside JetStream's
duplicate window). A retried idempotent write therefore never adds a second event, and a relay
re-publishing after a crash is de-duplicated by the server through the Nats-Msg-Id header.
"""

from __future__ import annotations

from collections.abc import Iterable

from splitstack.contracts.events import subject
from splitstack.events.v1 import events_pb2
from splitstack.registry.v1 import registry_pb2 as pb
from splitstack_registry.records import artifact_ref
from splitstack_registry.store import Tx


def data_updated(tx: Tx, uid: str, version: pb.DatasetVersion) -> None:
    """data.updated.<dataset>: a dataset version was registered."""
    tx.add_event(subject("data_updated", dataset=version.dataset),
                 events_pb2.DataUpdated(dataset_version=version),
                 event_id=f"data.updated:{version.dataset}:{uid}:{version.version}")


def model_registered(tx: Tx, uid: str, model: pb.Model, version: pb.ModelVersion) -> None:
    """model.registered.<model>: a version was finalized (lineage, artifacts, required targets)."""
    payload = events_pb2.ModelRegistered(
        model=version.model, version=version.version, lineage=version.lineage,
        artifacts=[artifact_ref(a) for a in version.artifacts], required_targets=model.required_targets,
        signature=version.signature)
    tx.add_event(subject("model_registered", model=version.model), payload,
                 event_id=f"model.registered:{version.model}:{uid}:{version.version}")


def model_converted(tx: Tx, uid: str, choice: pb.ServingChoice) -> None:
    """model.converted.<model>.<target>: a serving choice was written."""
    tx.add_event(subject("model_converted", model=choice.model, target=choice.target),
                 events_pb2.ModelConverted(serving_choice=choice),
                 event_id=f"model.converted:{choice.model}:{uid}:{choice.version}:{choice.target}")


def model_promoted(tx: Tx, uid: str, move: pb.AliasMove, move_id: int,
                   choices: Iterable[pb.ServingChoice]) -> None:
    """model.promoted.<model>.<alias>: an alias moved (version 0 when it was deleted)."""
    payload = events_pb2.ModelPromoted(
        model=move.model, alias=move.alias, version=move.to_version, previous_version=move.from_version,
        serving_artifacts=[events_pb2.TargetArtifact(target=c.target, artifact=artifact_ref(c.artifact))
                           for c in choices],
        actor=move.actor, reason=move.reason)
    tx.add_event(subject("model_promoted", model=move.model, alias=move.alias), payload,
                 event_id=f"model.promoted:{move.model}:{uid}:{move.alias}:{move_id}")
