"""The outbox's dead-letter table: poison events the relay parked after bounded refusals.

Revision ID: 0003_outbox_parking
Revises: 0002_promotion_decisions
Create Date: 2026-12-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003_outbox_parking"
down_revision = "0002_promotion_decisions"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # splitstack.chassis.outbox.parked_table, as of this revision: the outbox row moves here whole.
    op.create_table(
        "outbox_parked",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("event_id", sa.String(200), nullable=False),
        sa.Column("subject", sa.String(255), nullable=False),
        sa.Column("data", sa.LargeBinary(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("parked_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_outbox_parked"),
        sa.UniqueConstraint("event_id", name="uq_outbox_parked_event_id"),
    )


def downgrade() -> None:
    op.drop_table("outbox_parked")
