"""Alembic environment: runs the registry's migrations on the connection handed over by upgrade_to_head."""

from __future__ import annotations

from alembic import context

from splitstack_registry.tables import metadata

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run the registry's migrations through splitstack_registry.migrations.upgrade_to_head")

# render_as_batch: later revisions that alter tables also work on SQLite (copy-and-move).
context.configure(connection=connection, target_metadata=metadata, render_as_batch=True,
                  compare_type=True)
with context.begin_transaction():
    context.run_migrations()
