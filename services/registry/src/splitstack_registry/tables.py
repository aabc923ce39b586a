"""The registry's tables (SQLAlchemy Core): one MetaData, shared by the store and the migrations.

Nested contract messages (lineage, signature, profile, gate, candidates) are stored as their
deterministic protobuf serialization; string maps as sorted JSON. Columns that queries filter or
join on are plain columns. Uniqueness that correctness rests on (version numbers, idempotency
keys, artifact keys, write-once serving choices, one alias name per model) is a database
constraint, so two replicas can never both win a race.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger, Column, DateTime, ForeignKey, Index, Integer, LargeBinary, MetaData, SmallInteger, String,
    Table, Text, UniqueConstraint,
)

from splitstack.chassis.outbox import outbox_table

NAME = 63          # contracts.names.NAME_RULE: at most 63 characters
SHA256_HEX = 64
KEY = 255          # idempotency keys, file names, actors

metadata = MetaData(naming_convention={
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
})


def _id() -> Column:
    return Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True)


def _when(name: str, nullable: bool = False) -> Column:
    return Column(name, DateTime(timezone=True), nullable=nullable)


models = Table(
    "models", metadata,
    Column("name", String(NAME), primary_key=True),
    Column("uid", String(32), nullable=False),              # random; makes event ids unique per database
    Column("spec", LargeBinary, nullable=False),            # Model: description, targets, metric, labels
    Column("policy", LargeBinary, nullable=False),          # PromotionPolicy (the one mutable part)
    Column("policy_actor", String(KEY), nullable=False, server_default=""),
    _when("policy_updated_at"),
    Column("last_version", BigInteger, nullable=False, server_default="0"),  # guarded by the row lock
    _when("created_at"),
)

versions = Table(
    "versions", metadata,
    _id(),
    Column("model", String(NAME), ForeignKey("models.name"), nullable=False),
    Column("version", BigInteger, nullable=False),
    Column("state", SmallInteger, nullable=False),          # registry.v1.VersionState
    Column("idempotency_key", String(KEY), nullable=True),  # NULL: none (NULLs never collide)
    Column("lineage", LargeBinary, nullable=False),
    Column("signature", LargeBinary, nullable=False),
    Column("parent_version", BigInteger, nullable=False, server_default="0"),
    Column("dataset", String(NAME), nullable=True),
    Column("dataset_version", BigInteger, nullable=False, server_default="0"),
    _when("created_at"),
    _when("finalized_at", nullable=True),
    Column("promotion", LargeBinary, nullable=True),        # PromotionDecision; NULL: not decided yet
    UniqueConstraint("model", "version", name="uq_versions_model_version"),
    UniqueConstraint("model", "idempotency_key", name="uq_versions_model_idempotency_key"),
)

artifacts = Table(
    "artifacts", metadata,
    _id(),
    Column("version_id", BigInteger().with_variant(Integer, "sqlite"), ForeignKey("versions.id"), nullable=False),
    Column("kind", SmallInteger, nullable=False),           # common.v1.ArtifactKind
    Column("precision", SmallInteger, nullable=False),      # common.v1.Precision
    Column("target", String(NAME), nullable=False),         # "" for target-independent artifacts
    Column("sha256", String(SHA256_HEX), nullable=False),
    Column("size_bytes", BigInteger, nullable=False),
    Column("filename", String(KEY), nullable=False),
    Column("format", SmallInteger, nullable=False),         # common.v1.ModelFormat
    Column("profile", LargeBinary, nullable=False),         # common.v1.MeasuredProfile
    Column("gate", LargeBinary, nullable=False),            # common.v1.GateResult
    Column("metadata", Text, nullable=False),               # JSON object of strings
    _when("created_at"),
    UniqueConstraint("version_id", "kind", "precision", "target", name="uq_artifacts_key"),
    Index("ix_artifacts_sha256", "sha256"),
)

serving_choices = Table(
    "serving_choices", metadata,
    _id(),
    Column("version_id", BigInteger().with_variant(Integer, "sqlite"), ForeignKey("versions.id"), nullable=False),
    Column("target", String(NAME), nullable=False),
    Column("artifact_id", BigInteger().with_variant(Integer, "sqlite"), ForeignKey("artifacts.id"),
           nullable=False),
    Column("detail", LargeBinary, nullable=False),          # ServingChoice holding candidates + reason
    _when("created_at"),
    UniqueConstraint("version_id", "target", name="uq_serving_choices_version_target"),
)

datasets = Table(
    "datasets", metadata,
    Column("name", String(NAME), primary_key=True),
    Column("uid", String(32), nullable=False),
    Column("description", Text, nullable=False),
    Column("last_version", BigInteger, nullable=False, server_default="0"),  # guarded by the row lock
    _when("created_at"),
)

dataset_versions = Table(
    "dataset_versions", metadata,
    _id(),
    Column("dataset", String(NAME), ForeignKey("datasets.name"), nullable=False),
    Column("version", BigInteger, nullable=False),
    Column("sha256", String(SHA256_HEX), nullable=False),
    Column("size_bytes", BigInteger, nullable=False),
    Column("row_count", BigInteger, nullable=False),
    Column("metadata", Text, nullable=False),
    Column("idempotency_key", String(KEY), nullable=True),
    _when("created_at"),
    UniqueConstraint("dataset", "version", name="uq_dataset_versions_dataset_version"),
    UniqueConstraint("dataset", "idempotency_key", name="uq_dataset_versions_dataset_idempotency_key"),
)

aliases = Table(
    "aliases", metadata,
    _id(),
    Column("model", String(NAME), ForeignKey("models.name"), nullable=False),
    Column("alias", String(NAME), nullable=False),
    Column("version", BigInteger, nullable=False),
    Column("actor", String(KEY), nullable=False),
    Column("reason", Text, nullable=False),
    _when("updated_at"),
    UniqueConstraint("model", "alias", name="uq_aliases_model_alias"),
)

alias_moves = Table(
    "alias_moves", metadata,
    _id(),
    Column("model", String(NAME), ForeignKey("models.name"), nullable=False),
    Column("alias", String(NAME), nullable=False),
    Column("from_version", BigInteger, nullable=False),     # 0: the alias was created
    Column("to_version", BigInteger, nullable=False),       # 0: the alias was deleted
    Column("actor", String(KEY), nullable=False),
    Column("reason", Text, nullable=False),
    _when("at"),
    Index("ix_alias_moves_model_alias", "model", "alias", "id"),
)

outbox = outbox_table(metadata)

__all__ = ["metadata", "models", "versions", "artifacts", "serving_choices", "datasets", "dataset_versions",
           "aliases", "alias_moves", "outbox"]
