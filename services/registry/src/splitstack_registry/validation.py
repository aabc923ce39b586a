"""Checks of request fields that need no stored state; each error names the field it rejects.

The one place where the registry bounds what a client sends (services/registry/README.md, "Input
bounds", lists every field):

- **Names** (models, datasets, targets, aliases; they become NATS subjects and paths) obey
  `splitstack.contracts.names.check_name`, a full match: "prod\\n" is refused.
- **Text and metadata** are bounded by `splitstack.contracts.limits`: identifiers and labels
  (`MAX_SHORT_TEXT`, one line), prose such as reasons and descriptions (`MAX_LONG_TEXT`), string
  maps (`check_metadata`: entries, key, value and total size).
- **Repeated fields** (targets, tensors, dimensions, candidates, profile points, tolerations) have
  the counts below, chosen so that the largest event a request can cause stays well inside
  `MAX_EVENT_BYTES`.

Every check raises an error that the chassis maps to INVALID_ARGUMENT (InvalidName, OutOfBounds,
InvalidArgument), so a bad field never stores anything.
"""

from __future__ import annotations

import base64
import binascii
import math
import re
from collections.abc import Iterable, Mapping

from splitstack.chassis.errors import InvalidArgument
from splitstack.common.v1 import common_pb2
from splitstack.contracts.limits import (
    MAX_LONG_TEXT, MAX_METADATA_ENTRIES, MAX_METADATA_KEY, MAX_SHORT_TEXT, check_metadata, check_text,
)
from splitstack.contracts.names import check_name
from splitstack.registry.v1 import registry_pb2 as pb

SHA256 = re.compile(r"[0-9a-f]{64}")
DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000
MAX_TARGETS = 64               # required_targets of a model
MAX_TENSORS = 64               # inputs, and outputs, of a signature
MAX_DIMENSIONS = 16            # dimensions of one tensor
MAX_CANDIDATES = 8             # candidates of a serving choice
MAX_PROFILE_POINTS = 64        # latency points of a measured profile
MAX_TOLERATIONS = 16           # tolerations of a training profile

__all__ = ["check_name", "check_names", "check_text", "check_metadata", "check_short", "check_long"]


# ---- the basic shapes of a field ------------------------------------------------------------------

def check_short(field: str, value: str) -> str:
    """An identifier-like text (key, file name, actor, metric name): one line, `MAX_SHORT_TEXT` chars."""
    return check_text(field, value, MAX_SHORT_TEXT, single_line=True)


def check_long(field: str, value: str) -> str:
    """Prose (a reason, a description): at most `MAX_LONG_TEXT` characters."""
    return check_text(field, value, MAX_LONG_TEXT)


def check_count(field: str, values: object, limit: int) -> None:
    """A repeated field with at most `limit` items."""
    count = len(values)  # type: ignore[arg-type]
    if count > limit:
        raise InvalidArgument(f"{field} has {count} items; at most {limit} are allowed")


def check_names(field: str, values: Iterable[str], limit: int = MAX_TARGETS) -> list[str]:
    """At most `limit` values; each obeys the naming rule and none repeats."""
    values = list(values)
    check_count(field, values, limit)
    seen: list[str] = []
    for value in values:
        check_name(field, value)
        if value in seen:
            raise InvalidArgument(f"{field}: {value!r} is listed twice")
        seen.append(value)
    return seen


def check_number_map(field: str, values: Mapping[str, float]) -> None:
    """A map of named numbers (metrics): bounded entries, non-empty one-line bounded keys."""
    if len(values) > MAX_METADATA_ENTRIES:
        raise InvalidArgument(f"{field} has {len(values)} entries; at most {MAX_METADATA_ENTRIES} are allowed")
    for key in values:
        if not key:
            raise InvalidArgument(f"{field} has an empty key")
        check_text(f"{field} key {key[:40]!r}", key, MAX_METADATA_KEY, single_line=True)


def check_version(field: str, version: int) -> int:
    """A version number (1, 2, ...)."""
    if version < 1:
        raise InvalidArgument(f"{field} must be a version number >= 1, got {version}")
    return version


def check_sha256(field: str, value: str) -> str:
    """A digest in 64 lowercase hex characters."""
    if not SHA256.fullmatch(value):
        shown = value if len(value) <= 80 else f"{value[:77]}..."
        raise InvalidArgument(f"{field}: expected a SHA-256 in 64 lowercase hex characters, got {shown!r}")
    return value


def check_enum(field: str, enum: object, value: int, *, allow_unspecified: bool = True) -> int:
    """A value defined by `enum` (a generated EnumTypeWrapper), optionally not its zero value."""
    if value not in enum.values() or (value == 0 and not allow_unspecified):  # type: ignore[attr-defined]
        raise InvalidArgument(f"{field}: {value} is not a valid {enum.DESCRIPTOR.name}")  # type: ignore[attr-defined]
    return value


# ---- models ---------------------------------------------------------------------------------------

def check_model(field: str, model: pb.Model) -> None:
    """A CreateModel request's model (the policy is checked by the caller, after defaulting)."""
    check_name(f"{field}.name", model.name)
    check_long(f"{field}.description", model.description)
    check_names(f"{field}.required_targets", model.required_targets)
    check_primary_metric(f"{field}.primary_metric", model.primary_metric)
    check_metadata(f"{field}.labels", model.labels)


def check_policy(field: str, policy: pb.PromotionPolicy) -> pb.PromotionPolicy:
    """A promotion policy: MANUAL or AUTO; AUTO names a metric and its direction; margin finite, >= 0."""
    if policy.mode not in (pb.PromotionPolicy.MANUAL, pb.PromotionPolicy.AUTO):
        raise InvalidArgument(f"{field}.mode must be MANUAL or AUTO")
    check_short(f"{field}.metric", policy.metric)
    check_enum(f"{field}.direction", common_pb2.MetricDirection, policy.direction)
    if not math.isfinite(policy.margin) or policy.margin < 0:
        raise InvalidArgument(f"{field}.margin must be a finite number >= 0, got {policy.margin}")
    if policy.mode == pb.PromotionPolicy.AUTO:
        if not policy.metric:
            raise InvalidArgument(f"{field}.metric must name the metric an AUTO policy compares")
        if policy.direction == common_pb2.METRIC_DIRECTION_UNSPECIFIED:
            raise InvalidArgument(f"{field}.direction must be MAXIMIZE or MINIMIZE for an AUTO policy")
    return policy


def check_primary_metric(field: str, metric: common_pb2.PrimaryMetric) -> None:
    """A primary metric: a bounded name; a direction only together with a name."""
    check_short(f"{field}.name", metric.name)
    check_enum(f"{field}.direction", common_pb2.MetricDirection, metric.direction)
    if metric.direction and not metric.name:
        raise InvalidArgument(f"{field}.name must be set when {field}.direction is")


# ---- versions -------------------------------------------------------------------------------------

def check_lineage(lineage: pb.Lineage) -> None:
    """Lineage fields that can be judged without the database."""
    check_short("lineage.training_job", lineage.training_job)
    check_short("lineage.code_version", lineage.code_version)
    if lineage.dataset:
        check_name("lineage.dataset", lineage.dataset)
        if lineage.dataset_version < 1:
            raise InvalidArgument("lineage.dataset_version must name a version (>= 1) of lineage.dataset")
    elif lineage.dataset_version or lineage.dataset_digest:
        raise InvalidArgument("lineage.dataset must be set when lineage.dataset_version or dataset_digest is")
    if lineage.dataset_digest:
        check_sha256("lineage.dataset_digest", lineage.dataset_digest)
    if lineage.parent_version < 0:
        raise InvalidArgument(f"lineage.parent_version must be >= 0, got {lineage.parent_version}")
    check_metadata("lineage.hyperparameters", lineage.hyperparameters)
    check_number_map("lineage.metrics", lineage.metrics)
    check_primary_metric("lineage.primary_metric", lineage.primary_metric)
    check_training_profile("lineage.training_profile", lineage.training_profile)


def check_training_profile(field: str, profile: common_pb2.TrainingProfile) -> None:
    """The training stack a version was trained on, as the trainer reports it."""
    for name in ("name", "gpu_product", "precision", "interconnect"):
        check_short(f"{field}.{name}", getattr(profile, name))
    check_long(f"{field}.description", profile.description)
    check_metadata(f"{field}.node_selector", profile.node_selector)
    check_metadata(f"{field}.resources", profile.resources)
    check_count(f"{field}.tolerations", profile.tolerations, MAX_TOLERATIONS)
    for i, toleration in enumerate(profile.tolerations):
        for name in ("key", "operator", "value", "effect"):
            check_short(f"{field}.tolerations[{i}].{name}", getattr(toleration, name))


def check_signature(field: str, signature: common_pb2.Signature) -> None:
    """Inputs and outputs: bounded counts, bounded names, bounded ranks, dimensions >= -1."""
    for part in ("inputs", "outputs"):
        tensors = getattr(signature, part)
        check_count(f"{field}.{part}", tensors, MAX_TENSORS)
        for i, tensor in enumerate(tensors):
            where = f"{field}.{part}[{i}]"
            check_short(f"{where}.name", tensor.name)
            check_enum(f"{where}.dtype", common_pb2.DataType, tensor.dtype)
            check_count(f"{where}.shape", tensor.shape, MAX_DIMENSIONS)
            if any(d < -1 for d in tensor.shape):
                raise InvalidArgument(f"{where}.shape: dimensions are sizes >= 0 or -1 (dynamic), "
                                      f"got {list(tensor.shape)}")


def check_create_version(request: pb.CreateVersionRequest) -> None:
    """A CreateVersion request: model, idempotency key, lineage and signature."""
    check_name("model", request.model)
    check_short("idempotency_key", request.idempotency_key)
    check_lineage(request.lineage)
    check_signature("signature", request.signature)


# ---- artifacts and serving choices ----------------------------------------------------------------

def check_measured_profile(field: str, profile: common_pb2.MeasuredProfile) -> None:
    """A measured profile: bounded texts and number of latency points."""
    for name in ("target", "device", "runtime"):
        check_short(f"{field}.{name}", getattr(profile, name))
    check_count(f"{field}.points", profile.points, MAX_PROFILE_POINTS)


def check_gate(field: str, gate: common_pb2.GateResult) -> None:
    """An accuracy gate's verdict: a bounded metric name and reason."""
    check_short(f"{field}.metric_name", gate.metric_name)
    check_long(f"{field}.reason", gate.reason)


def check_artifact_texts(header: pb.ArtifactHeader) -> None:
    """The free-form parts of an artifact header: file name, profile, gate, metadata."""
    check_short("filename", header.filename)
    check_measured_profile("profile", header.profile)
    check_gate("gate", header.gate)
    check_metadata("metadata", header.metadata)


def check_candidates(field: str, candidates: Iterable[pb.Candidate]) -> None:
    """The candidates of a serving choice: a bounded number, each with bounded parts."""
    candidates = list(candidates)
    check_count(field, candidates, MAX_CANDIDATES)
    for i, candidate in enumerate(candidates):
        where = f"{field}[{i}]"
        check_enum(f"{where}.format", common_pb2.ModelFormat, candidate.format)
        if candidate.artifact_sha256:
            check_sha256(f"{where}.artifact_sha256", candidate.artifact_sha256)
        check_gate(f"{where}.gate", candidate.gate)
        check_measured_profile(f"{where}.profile", candidate.profile)
        check_long(f"{where}.reason", candidate.reason)


# ---- aliases --------------------------------------------------------------------------------------

def check_alias_move(request: pb.SetAliasRequest | pb.DeleteAliasRequest) -> None:
    """What every alias move names and records: model, alias, actor and reason."""
    check_name("model", request.model)
    check_name("alias", request.alias)
    check_short("actor", request.actor)
    check_long("reason", request.reason)


# ---- pages ----------------------------------------------------------------------------------------

def page_size(size: int) -> int:
    """The number of items a page holds (0: the default)."""
    if size < 0:
        raise InvalidArgument(f"page_size must be >= 0, got {size}")
    return min(size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)


def encode_page_token(after: str | int) -> str:
    """An opaque token for the page after the item keyed `after` (a name or a version)."""
    return base64.urlsafe_b64encode(f"{type(after).__name__}:{after}".encode()).decode()


def decode_page_token(token: str, kind: type[str] | type[int]) -> str | int:
    """The key a page token continues after ("" or 0 for the first page)."""
    if not token:
        return kind()
    check_short("page_token", token)
    try:
        prefix, _, value = base64.urlsafe_b64decode(token.encode()).decode().partition(":")
        if prefix != kind.__name__:
            raise ValueError(prefix)
        return kind(value)
    except (ValueError, binascii.Error, UnicodeDecodeError):
        shown = token if len(token) <= 80 else f"{token[:77]}..."
        raise InvalidArgument(f"page_token {shown!r} is not a token this list returned") from None
