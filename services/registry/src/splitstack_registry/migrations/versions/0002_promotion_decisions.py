"""Promotion decisions: versions.promotion holds what the promotion policy decided (NULL: not yet).

Revision ID: 0002_promotion_decisions
Revises: 0001_initial
Create Date: 2026-11-30
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002_promotion_decisions"
down_revision = "0001_initial"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Nullable and without a default: versions stored before this revision are simply undecided.
    with op.batch_alter_table("versions") as batch:
        batch.add_column(sa.Column("promotion", sa.LargeBinary(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("versions") as batch:
        batch.drop_column("promotion")
