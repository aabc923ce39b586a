"""Checks of request fields that need no stored state; each error names the field it rejects."""

from __future__ import annotations

import base64
import binascii
import math
import re
from collections.abc import Iterable, Mapping

from splitstack.chassis.errors import InvalidArgument
from splitstack.common.v1 import common_pb2
from splitstack.contracts.names import check_name
from splitstack.registry.v1 import registry_pb2 as pb

SHA256 = re.compile(r"[0-9a-f]{64}")
MAX_TEXT = 255                      # idempotency keys, file names, actors
MAX_METADATA_ENTRIES = 256
DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000


def check_names(field: str, values: Iterable[str]) -> list[str]:
    """Each value obeys the naming rule and none repeats."""
    seen: list[str] = []
    for value in values:
        check_name(field, value)
        if value in seen:
            raise InvalidArgument(f"{field}: {value!r} is listed twice")
        seen.append(value)
    return seen


def check_version(field: str, version: int) -> int:
    """A version number (1, 2, ...)."""
    if version < 1:
        raise InvalidArgument(f"{field} must be a version number >= 1, got {version}")
    return version


def check_sha256(field: str, value: str) -> str:
    """A digest in 64 lowercase hex characters."""
    if not SHA256.fullmatch(value):
        raise InvalidArgument(f"{field}: expected a SHA-256 in 64 lowercase hex characters, got {value!r}")
    return value


def check_text(field: str, value: str, limit: int = MAX_TEXT) -> str:
    """A short free-text field (key, file name, actor) of at most `limit` characters."""
    if len(value) > limit:
        raise InvalidArgument(f"{field} is {len(value)} characters long; at most {limit} are allowed")
    return value


def check_metadata(field: str, values: Mapping[str, str]) -> None:
    """A string map with non-empty keys and a bounded number of entries."""
    if len(values) > MAX_METADATA_ENTRIES:
        raise InvalidArgument(f"{field} has {len(values)} entries; at most {MAX_METADATA_ENTRIES} are allowed")
    if any(not key for key in values):
        raise InvalidArgument(f"{field} has an empty key")


def check_enum(field: str, enum: object, value: int, *, allow_unspecified: bool = True) -> int:
    """A value defined by `enum` (a generated EnumTypeWrapper), optionally not its zero value."""
    if value not in enum.values() or (value == 0 and not allow_unspecified):  # type: ignore[attr-defined]
        raise InvalidArgument(f"{field}: {value} is not a valid {enum.DESCRIPTOR.name}")  # type: ignore[attr-defined]
    return value


def check_policy(field: str, policy: pb.PromotionPolicy) -> pb.PromotionPolicy:
    """A promotion policy: MANUAL or AUTO; AUTO names a metric and its direction; margin finite, >= 0."""
    if policy.mode not in (pb.PromotionPolicy.MANUAL, pb.PromotionPolicy.AUTO):
        raise InvalidArgument(f"{field}.mode must be MANUAL or AUTO")
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
    """A primary metric: a direction only together with a name."""
    check_enum(f"{field}.direction", common_pb2.MetricDirection, metric.direction)
    if metric.direction and not metric.name:
        raise InvalidArgument(f"{field}.name must be set when {field}.direction is")


def check_lineage(lineage: pb.Lineage) -> None:
    """Lineage fields that can be judged without the database."""
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
    check_primary_metric("lineage.primary_metric", lineage.primary_metric)


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
    try:
        prefix, _, value = base64.urlsafe_b64decode(token.encode()).decode().partition(":")
        if prefix != kind.__name__:
            raise ValueError(prefix)
        return kind(value)
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise InvalidArgument(f"page_token {token!r} is not a token this list returned") from None
