"""Initial schema: models, versions, artifacts, serving choices, datasets, aliases, alias moves, outbox.

Revision ID: 0001_initial
Revises:
Create Date: 2026-11-30
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001_initial"
down_revision = None
branch_labels = None
depends_on = None

NAME = 63
KEY = 255


def _id() -> sa.Column:
    return sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True,
                     autoincrement=True)


def _when(name: str, nullable: bool = False) -> sa.Column:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def _fk(table: str, column: str, target: str) -> sa.ForeignKeyConstraint:
    ref_table = target.split(".")[0]
    return sa.ForeignKeyConstraint([column], [target], name=f"fk_{table}_{column}_{ref_table}")


def upgrade() -> None:
    op.create_table(
        "models",
        sa.Column("name", sa.String(NAME), nullable=False),
        sa.Column("uid", sa.String(32), nullable=False),
        sa.Column("spec", sa.LargeBinary(), nullable=False),
        sa.Column("policy", sa.LargeBinary(), nullable=False),
        sa.Column("policy_actor", sa.String(KEY), nullable=False, server_default=""),
        _when("policy_updated_at"),
        sa.Column("last_version", sa.BigInteger(), nullable=False, server_default="0"),
        _when("created_at"),
        sa.PrimaryKeyConstraint("name", name="pk_models"),
    )
    op.create_table(
        "versions",
        _id(),
        sa.Column("model", sa.String(NAME), nullable=False),
        sa.Column("version", sa.BigInteger(), nullable=False),
        sa.Column("state", sa.SmallInteger(), nullable=False),
        sa.Column("idempotency_key", sa.String(KEY), nullable=True),
        sa.Column("lineage", sa.LargeBinary(), nullable=False),
        sa.Column("signature", sa.LargeBinary(), nullable=False),
        sa.Column("parent_version", sa.BigInteger(), nullable=False, server_default="0"),
        sa.Column("dataset", sa.String(NAME), nullable=True),
        sa.Column("dataset_version", sa.BigInteger(), nullable=False, server_default="0"),
        _when("created_at"),
        _when("finalized_at", nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_versions"),
        _fk("versions", "model", "models.name"),
        sa.UniqueConstraint("model", "version", name="uq_versions_model_version"),
        sa.UniqueConstraint("model", "idempotency_key", name="uq_versions_model_idempotency_key"),
    )
    op.create_table(
        "artifacts",
        _id(),
        sa.Column("version_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("kind", sa.SmallInteger(), nullable=False),
        sa.Column("precision", sa.SmallInteger(), nullable=False),
        sa.Column("target", sa.String(NAME), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("size_bytes", sa.BigInteger(), nullable=False),
        sa.Column("filename", sa.String(KEY), nullable=False),
        sa.Column("format", sa.SmallInteger(), nullable=False),
        sa.Column("profile", sa.LargeBinary(), nullable=False),
        sa.Column("gate", sa.LargeBinary(), nullable=False),
        sa.Column("metadata", sa.Text(), nullable=False),
        _when("created_at"),
        sa.PrimaryKeyConstraint("id", name="pk_artifacts"),
        _fk("artifacts", "version_id", "versions.id"),
        sa.UniqueConstraint("version_id", "kind", "precision", "target", name="uq_artifacts_key"),
    )
    op.create_index("ix_artifacts_sha256", "artifacts", ["sha256"])
    op.create_table(
        "serving_choices",
        _id(),
        sa.Column("version_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("target", sa.String(NAME), nullable=False),
        sa.Column("artifact_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("detail", sa.LargeBinary(), nullable=False),
        _when("created_at"),
        sa.PrimaryKeyConstraint("id", name="pk_serving_choices"),
        _fk("serving_choices", "version_id", "versions.id"),
        _fk("serving_choices", "artifact_id", "artifacts.id"),
        sa.UniqueConstraint("version_id", "target", name="uq_serving_choices_version_target"),
    )
    op.create_table(
        "datasets",
        sa.Column("name", sa.String(NAME), nullable=False),
        sa.Column("uid", sa.String(32), nullable=False),
        sa.Column("description", sa.Text(), nullable=False),
        sa.Column("last_version", sa.BigInteger(), nullable=False, server_default="0"),
        _when("created_at"),
        sa.PrimaryKeyConstraint("name", name="pk_datasets"),
    )
    op.create_table(
        "dataset_versions",
        _id(),
        sa.Column("dataset", sa.String(NAME), nullable=False),
        sa.Column("version", sa.BigInteger(), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("size_bytes", sa.BigInteger(), nullable=False),
        sa.Column("row_count", sa.BigInteger(), nullable=False),
        sa.Column("metadata", sa.Text(), nullable=False),
        sa.Column("idempotency_key", sa.String(KEY), nullable=True),
        _when("created_at"),
        sa.PrimaryKeyConstraint("id", name="pk_dataset_versions"),
        _fk("dataset_versions", "dataset", "datasets.name"),
        sa.UniqueConstraint("dataset", "version", name="uq_dataset_versions_dataset_version"),
        sa.UniqueConstraint("dataset", "idempotency_key", name="uq_dataset_versions_dataset_idempotency_key"),
    )
    op.create_table(
        "aliases",
        _id(),
        sa.Column("model", sa.String(NAME), nullable=False),
        sa.Column("alias", sa.String(NAME), nullable=False),
        sa.Column("version", sa.BigInteger(), nullable=False),
        sa.Column("actor", sa.String(KEY), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        _when("updated_at"),
        sa.PrimaryKeyConstraint("id", name="pk_aliases"),
        _fk("aliases", "model", "models.name"),
        sa.UniqueConstraint("model", "alias", name="uq_aliases_model_alias"),
    )
    op.create_table(
        "alias_moves",
        _id(),
        sa.Column("model", sa.String(NAME), nullable=False),
        sa.Column("alias", sa.String(NAME), nullable=False),
        sa.Column("from_version", sa.BigInteger(), nullable=False),
        sa.Column("to_version", sa.BigInteger(), nullable=False),
        sa.Column("actor", sa.String(KEY), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        _when("at"),
        sa.PrimaryKeyConstraint("id", name="pk_alias_moves"),
        _fk("alias_moves", "model", "models.name"),
    )
    op.create_index("ix_alias_moves_model_alias", "alias_moves", ["model", "alias", "id"])
    _create_outbox()


def _create_outbox() -> None:
    """The chassis outbox table (splitstack.chassis.outbox.outbox_table), as of this revision."""
    op.create_table(
        "outbox",
        _id(),
        sa.Column("event_id", sa.String(200), nullable=False),
        sa.Column("subject", sa.String(255), nullable=False),
        sa.Column("data", sa.LargeBinary(), nullable=False),
        _when("created_at"),
        _when("published_at", nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_outbox"),
        sa.UniqueConstraint("event_id", name="uq_outbox_event_id"),
    )
    pending = sa.text("published_at IS NULL")
    op.create_index("ix_outbox_pending", "outbox", ["id"], postgresql_where=pending, sqlite_where=pending)


def downgrade() -> None:
    for index, table in (("ix_outbox_pending", "outbox"), ("ix_alias_moves_model_alias", "alias_moves"),
                         ("ix_artifacts_sha256", "artifacts")):
        op.drop_index(index, table_name=table)
    for table in ("outbox", "alias_moves", "aliases", "dataset_versions", "datasets", "serving_choices",
                  "artifacts", "versions", "models"):
        op.drop_table(table)
