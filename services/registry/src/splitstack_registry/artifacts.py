"""Artifacts and serving choices: the bodies of their write and read transactions.

Artifacts are immutable per key (kind, precision, target) within a version: the same key with the
same digest is the same artifact, another digest is ALREADY_EXISTS. Training artifacts are added
while a version is PENDING; conversion artifacts (ONNX, TensorRT plans) also after it is READY.
A serving choice is write-once per (version, target) and announced as model.converted; the one
that completes a version (every required target chosen) also has the promotion policy decide.
"""

from __future__ import annotations

from sqlalchemy import Row

from splitstack.chassis.errors import AlreadyExists, FailedPrecondition, NotFound
from splitstack.common.v1 import common_pb2
from splitstack.registry.v1 import registry_pb2 as pb
from splitstack_registry import events, promotion, records
from splitstack_registry.lookups import require_model, require_version
from splitstack_registry.store import Tx
from splitstack_registry.versions import kind_name

TRAINING_KINDS = (common_pb2.CHECKPOINT, common_pb2.EXPORTED_PROGRAM, common_pb2.SAMPLE)
CONVERSION_KINDS = (common_pb2.ONNX, common_pb2.TENSORRT_PLAN)


def artifact_upload_allowed(tx: Tx, header: pb.ArtifactHeader, lock: bool) -> pb.Artifact | None:
    """The existing artifact under this key (same digest), or None when the upload may proceed."""
    row = require_version(tx, header.model, header.version, lock=lock)
    existing = tx.artifact_row_by_key(row.id, header.kind, header.precision, header.target)
    if existing is not None:
        if existing.sha256 == header.sha256:
            return records.artifact_record(existing, header.model, header.version)
        raise AlreadyExists(
            f"model {header.model!r} version {header.version} already has a {kind_name(header.kind)} artifact "
            f"(precision {common_pb2.Precision.Name(header.precision)}, target {header.target!r}) with sha256 "
            f"{existing.sha256}; artifacts are immutable")
    if header.kind in TRAINING_KINDS and row.state != pb.PENDING:
        raise FailedPrecondition(f"model {header.model!r} version {header.version} is READY: "
                                 f"{kind_name(header.kind)} artifacts can only be added while it is PENDING")
    return None


def add_artifact(tx: Tx, header: pb.ArtifactHeader) -> pb.Artifact:
    """Record the verified blob as an artifact, re-checking the key and state under the version lock."""
    existing = artifact_upload_allowed(tx, header, lock=True)
    if existing is not None:
        return existing
    row = require_version(tx, header.model, header.version)
    tx.insert_artifact(version_id=row.id, kind=header.kind, precision=header.precision, target=header.target,
                       sha256=header.sha256, size_bytes=header.size_bytes, filename=header.filename,
                       format=header.format, profile=records.to_bytes(header.profile),
                       gate=records.to_bytes(header.gate), metadata=records.to_json(header.metadata),
                       created_at=records.utcnow())
    stored = tx.artifact_row_by_key(row.id, header.kind, header.precision, header.target)
    return records.artifact_record(stored, header.model, header.version)


def artifact_by_digest(tx: Tx, sha256: str) -> pb.Artifact:
    """The first artifact stored with this digest."""
    artifact = tx.artifact_by_sha256(sha256)
    if artifact is None:
        raise NotFound(f"no artifact with sha256 {sha256}")
    return artifact


def artifact_by_key(tx: Tx, request: pb.DownloadArtifactRequest) -> pb.Artifact:
    """The artifact of a version under (kind, precision, target)."""
    row = require_version(tx, request.model, request.version)
    found = tx.artifact_row_by_key(row.id, request.kind, request.precision, request.target)
    if found is None:
        raise NotFound(f"model {request.model!r} version {request.version} has no {kind_name(request.kind)} "
                       f"artifact with precision {common_pb2.Precision.Name(request.precision)} and target "
                       f"{request.target!r}")
    return records.artifact_record(found, request.model, request.version)


def set_serving_choice(tx: Tx, request: pb.SetServingChoiceRequest) -> pb.ServingChoice:
    """Write the serving choice of a READY version once and announce model.converted; when the choice
    completes the version, the promotion policy decides in the same transaction (promotion.py)."""
    model = require_model(tx, request.model, lock=True)  # serializes promotion decisions of the model
    row = require_version(tx, request.model, request.version, lock=True)
    detail = pb.ServingChoice(candidates=request.candidates, reason=request.reason)
    if tx.serving_choice_row(row.id, request.target) is not None:
        return _same_serving_choice(tx, row, request, detail)
    if row.state != pb.READY:
        raise FailedPrecondition(f"model {request.model!r} version {request.version} is PENDING: serving "
                                 "choices are written for READY (finalized) versions only")
    artifact_id = _artifact_id_for_choice(tx, row, request)
    tx.insert_serving_choice(version_id=row.id, target=request.target, artifact_id=artifact_id,
                             detail=records.to_bytes(detail), created_at=records.utcnow())
    choice = _choice_for(tx, row, request.target)
    events.model_converted(tx, model.uid, choice)
    promotion.decide_if_complete(tx, model, request.version)
    return choice


def _same_serving_choice(tx: Tx, row: Row, request: pb.SetServingChoiceRequest,
                         detail: pb.ServingChoice) -> pb.ServingChoice:
    """The stored choice when the request repeats it; ALREADY_EXISTS when it differs."""
    stored = _choice_for(tx, row, request.target)
    stored_detail = pb.ServingChoice(candidates=stored.candidates, reason=stored.reason)
    if stored.artifact.sha256 == request.artifact_sha256 and stored_detail == detail:
        return stored
    raise AlreadyExists(f"model {request.model!r} version {request.version} already has a serving choice for "
                        f"target {request.target!r} (artifact {stored.artifact.sha256}); serving choices are "
                        "write-once")


def _artifact_id_for_choice(tx: Tx, row: Row, request: pb.SetServingChoiceRequest) -> int:
    """The version's artifact with the digest, preferring one built for the choice's target."""
    matches = [a for a in tx.artifact_rows(row.id) if a.sha256 == request.artifact_sha256]
    if not matches:
        raise NotFound(f"artifact_sha256: model {request.model!r} version {request.version} has no artifact "
                       f"with sha256 {request.artifact_sha256}")
    return next((a for a in matches if a.target == request.target), matches[0]).id


def _choice_for(tx: Tx, row: Row, target: str) -> pb.ServingChoice:
    return next(c for c in tx.serving_choices(row) if c.target == target)


def serving_choice(tx: Tx, model: str, version: int, target: str) -> pb.ServingChoice:
    """The serving choice of a version for a target."""
    row = require_version(tx, model, version)
    if tx.serving_choice_row(row.id, target) is None:
        raise NotFound(f"model {model!r} version {version} has no serving choice for target {target!r}")
    return _choice_for(tx, row, target)
