"""Models, versions and lineage: the bodies of their write and read transactions.

Each function runs inside one transaction (store.Tx) in a worker thread, called by core.Registry
after the request passed its stateless checks; it checks the stored state (under row locks for
writes), raises DomainErrors, and adds the events its change announces.
"""

from __future__ import annotations

import logging
import uuid

from google.protobuf import message as pb_message

from splitstack.chassis.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from splitstack.common.v1 import common_pb2
from splitstack.registry.v1 import registry_pb2 as pb
from splitstack_registry import events, promotion, records
from splitstack_registry.lookups import require_dataset_version, require_model, require_version
from splitstack_registry.store import Tx

log = logging.getLogger(__name__)

FINALIZE_NEEDS = (common_pb2.EXPORTED_PROGRAM, common_pb2.SAMPLE)


def new_uid() -> str:
    """A random id stamped on models and datasets (part of their event ids)."""
    return uuid.uuid4().hex[:16]


def differing_fields(stored: pb_message.Message, wanted: pb_message.Message) -> list[str]:
    """The names of the top-level fields whose values differ."""
    return [f.name for f in stored.DESCRIPTOR.fields if getattr(stored, f.name) != getattr(wanted, f.name)]


def kind_name(kind: int) -> str:
    """An artifact kind's name (EXPORTED_PROGRAM, ...)."""
    return common_pb2.ArtifactKind.Name(kind)



def create_model(tx: Tx, spec: pb.Model, policy: pb.PromotionPolicy) -> pb.Model:
    """Create the model; the same immutable fields again return it, others are ALREADY_EXISTS."""
    row = tx.model_row(spec.name)
    if row is not None:
        existing = records.model_record(row)
        differs = differing_fields(records.model_spec(existing), spec)
        if differs:
            raise AlreadyExists(f"model {spec.name!r} exists with a different {', '.join(differs)}")
        return existing
    now = records.utcnow()
    tx.insert_model(name=spec.name, uid=new_uid(), spec=records.to_bytes(spec), policy=records.to_bytes(policy),
                    policy_actor="", policy_updated_at=now, last_version=0, created_at=now)
    return records.model_record(require_model(tx, spec.name))


def set_policy(tx: Tx, model: str, policy: pb.PromotionPolicy, actor: str) -> pb.Model:
    """Replace the model's promotion policy (under the model row's lock)."""
    require_model(tx, model, lock=True)
    tx.set_policy(model, records.to_bytes(policy), actor)
    log.info("promotion policy of model %s set by %s", model, actor or "(no actor)")
    return records.model_record(require_model(tx, model))


def create_version(tx: Tx, request: pb.CreateVersionRequest) -> pb.ModelVersion:
    """Number a new PENDING version n+1 under the model lock, or return the one its key made."""
    model, key = request.model, request.idempotency_key
    require_model(tx, model, lock=True)  # serializes version numbering of this model
    lineage = _resolved_lineage(tx, model, request.lineage)
    if key and (row := tx.version_row_by_key(model, key)) is not None:
        stored = tx.version_record(row)
        differs = [f for f, a, b in (("lineage", stored.lineage, lineage),
                                     ("signature", stored.signature, request.signature)) if a != b]
        if differs:
            raise AlreadyExists(f"idempotency_key {key!r} already created model {model!r} version "
                                f"{row.version} with a different {' and '.join(differs)}")
        return stored
    number = tx.take_model_version(model)
    tx.insert_version(model=model, version=number, state=pb.PENDING, idempotency_key=key or None,
                      lineage=records.to_bytes(lineage), signature=records.to_bytes(request.signature),
                      parent_version=lineage.parent_version, dataset=lineage.dataset or None,
                      dataset_version=lineage.dataset_version, created_at=records.utcnow())
    return tx.version_record(require_version(tx, model, number))


def _resolved_lineage(tx: Tx, model: str, lineage: pb.Lineage) -> pb.Lineage:
    """The lineage as stored: the dataset version must exist and its digest is filled in."""
    resolved = pb.Lineage()
    resolved.CopyFrom(lineage)
    if lineage.dataset:
        data = require_dataset_version(tx, lineage.dataset, lineage.dataset_version, field="lineage")
        if lineage.dataset_digest and lineage.dataset_digest != data.sha256:
            raise InvalidArgument(f"lineage.dataset_digest {lineage.dataset_digest} is not the digest of dataset "
                                  f"{lineage.dataset!r} version {lineage.dataset_version} ({data.sha256})")
        resolved.dataset_digest = data.sha256
    if lineage.parent_version and tx.version_row(model, lineage.parent_version) is None:
        raise NotFound(f"lineage.parent_version: model {model!r} has no version {lineage.parent_version}")
    return resolved


def finalize_version(tx: Tx, model: str, version: int) -> pb.ModelVersion:
    """PENDING -> READY with model.registered in the same commit; READY stays as it is.

    A model without required targets has its versions complete here: the promotion policy decides.
    """
    model_row = require_model(tx, model, lock=True)  # the order every writer locks in: model, then version
    row = require_version(tx, model, version, lock=True)
    if row.state == pb.READY:
        return tx.version_record(row)
    kinds = {a.kind for a in tx.artifact_rows(row.id)}
    missing = [kind_name(k) for k in FINALIZE_NEEDS if k not in kinds]
    if missing:
        raise FailedPrecondition(f"model {model!r} version {version} cannot be finalized: it has no "
                                 f"{' and no '.join(missing)} artifact")
    tx.mark_ready(row.id)
    record = tx.version_record(require_version(tx, model, version))
    events.model_registered(tx, model_row.uid, records.model_record(model_row), record)
    if promotion.decide_if_complete(tx, model_row, version) is not None:
        record = tx.version_record(require_version(tx, model, version))
    return record


def lineage(tx: Tx, model: str, version: int) -> pb.GetLineageResponse:
    """The version, its dataset version, its ancestors (parent first) and its aliases."""
    row = require_version(tx, model, version)
    response = pb.GetLineageResponse(version=tx.version_record(row))
    if row.dataset and (data := tx.dataset_version_row(row.dataset, row.dataset_version)) is not None:
        response.dataset_version.CopyFrom(records.dataset_version_record(data))
    parent = row.parent_version
    while parent and (ancestor := tx.version_row(model, parent)) is not None:
        response.ancestors.append(tx.version_record(ancestor))
        parent = ancestor.parent_version if ancestor.parent_version < ancestor.version else 0
    response.aliases.extend(records.alias_record(a) for a in tx.alias_rows(model, version))
    return response
