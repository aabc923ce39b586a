"""Conversions between stored rows and contract messages (timestamps, protobuf blobs, JSON maps).

Every message built here is what the registry returns and announces, so a record read back
from the database is identical however often it is read: nested messages are stored as their
deterministic serialization and maps as sorted JSON.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterable, Mapping
from typing import Any, TypeVar

from google.protobuf import message as pb_message
from google.protobuf.timestamp_pb2 import Timestamp

from splitstack.events.v1 import events_pb2
from splitstack.registry.v1 import registry_pb2 as pb

M = TypeVar("M", bound=pb_message.Message)


def utcnow() -> dt.datetime:
    """Now, in UTC (the only time zone stored)."""
    return dt.datetime.now(dt.timezone.utc)


def timestamp(value: dt.datetime | None) -> Timestamp | None:
    """A protobuf Timestamp of a stored time (SQLite returns naive values, which are UTC)."""
    if value is None:
        return None
    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.timezone.utc)
    ts = Timestamp()
    ts.FromDatetime(value)
    return ts


def to_bytes(message: pb_message.Message) -> bytes:
    """The stored form of a nested message."""
    return message.SerializeToString(deterministic=True)


def from_bytes(cls: type[M], data: bytes | None) -> M:
    """A message back from its stored form."""
    message = cls()
    if data:
        message.ParseFromString(bytes(data))
    return message


def merge_stored(field: pb_message.Message, data: bytes | None) -> None:
    """Fill a nested message field from its stored form, leaving it unset when nothing was stored."""
    if data:
        field.ParseFromString(bytes(data))


def to_json(values: Mapping[str, str]) -> str:
    """The stored form of a string map."""
    return json.dumps(dict(values), sort_keys=True, separators=(",", ":"))


def from_json(text: str | None) -> dict[str, str]:
    """A string map back from its stored form."""
    return json.loads(text) if text else {}


def _set_time(message: pb_message.Message, field: str, value: dt.datetime | None) -> None:
    ts = timestamp(value)
    if ts is not None:
        getattr(message, field).CopyFrom(ts)


def model_spec(model: pb.Model) -> pb.Model:
    """The immutable part of a model (what CreateModel compares): no policy, no creation time."""
    spec = pb.Model()
    spec.CopyFrom(model)
    spec.ClearField("promotion_policy")
    spec.ClearField("created_at")
    return spec


def model_record(row: Any) -> pb.Model:
    """A Model from a `models` row."""
    model = from_bytes(pb.Model, row.spec)
    model.name = row.name
    merge_stored(model.promotion_policy, row.policy)
    _set_time(model, "created_at", row.created_at)
    return model


def artifact_record(row: Any, model: str, version: int) -> pb.Artifact:
    """An Artifact from an `artifacts` row of `model` version `version`."""
    artifact = pb.Artifact(
        model=model, version=version, kind=row.kind, precision=row.precision, target=row.target,
        sha256=row.sha256, size_bytes=row.size_bytes, filename=row.filename, format=row.format,
        metadata=from_json(row.metadata))
    merge_stored(artifact.profile, row.profile)
    merge_stored(artifact.gate, row.gate)
    _set_time(artifact, "created_at", row.created_at)
    return artifact


def serving_choice_record(row: Any, artifact: pb.Artifact) -> pb.ServingChoice:
    """A ServingChoice from a `serving_choices` row and its (already built) artifact."""
    choice = from_bytes(pb.ServingChoice, row.detail)
    choice.model, choice.version, choice.target = artifact.model, artifact.version, row.target
    choice.artifact.CopyFrom(artifact)
    _set_time(choice, "created_at", row.created_at)
    return choice


def version_record(row: Any, artifacts: Iterable[pb.Artifact], choices: Iterable[pb.ServingChoice]) -> pb.ModelVersion:
    """A ModelVersion from a `versions` row with its artifacts and serving choices."""
    version = pb.ModelVersion(
        model=row.model, version=row.version, state=row.state,
        artifacts=list(artifacts), serving_choices=list(choices), idempotency_key=row.idempotency_key or "")
    merge_stored(version.lineage, row.lineage)
    merge_stored(version.signature, row.signature)
    _set_time(version, "created_at", row.created_at)
    _set_time(version, "finalized_at", row.finalized_at)
    merge_stored(version.promotion, row.promotion)
    return version


def dataset_record(row: Any) -> pb.Dataset:
    """A Dataset from a `datasets` row."""
    dataset = pb.Dataset(name=row.name, description=row.description, latest_version=row.last_version)
    _set_time(dataset, "created_at", row.created_at)
    return dataset


def dataset_version_record(row: Any) -> pb.DatasetVersion:
    """A DatasetVersion from a `dataset_versions` row."""
    version = pb.DatasetVersion(
        dataset=row.dataset, version=row.version, sha256=row.sha256, size_bytes=row.size_bytes,
        row_count=row.row_count, metadata=from_json(row.metadata), idempotency_key=row.idempotency_key or "")
    _set_time(version, "created_at", row.created_at)
    return version


def alias_record(row: Any) -> pb.Alias:
    """An Alias from an `aliases` row."""
    alias = pb.Alias(model=row.model, alias=row.alias, version=row.version, actor=row.actor, reason=row.reason)
    _set_time(alias, "updated_at", row.updated_at)
    return alias


def move_record(row: Any) -> pb.AliasMove:
    """An AliasMove from an `alias_moves` row."""
    move = pb.AliasMove(model=row.model, alias=row.alias, from_version=row.from_version,
                        to_version=row.to_version, actor=row.actor, reason=row.reason)
    _set_time(move, "at", row.at)
    return move


def artifact_ref(artifact: pb.Artifact) -> events_pb2.ArtifactRef:
    """The compact reference to an artifact that events carry."""
    return events_pb2.ArtifactRef(kind=artifact.kind, precision=artifact.precision, target=artifact.target,
                                  sha256=artifact.sha256, size_bytes=artifact.size_bytes, format=artifact.format)
