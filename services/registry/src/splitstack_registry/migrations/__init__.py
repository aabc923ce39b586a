"""Alembic migrations of the registry's schema, run programmatically at start (no alembic.ini).

`upgrade_to_head(engine)` brings any database (empty or older) to the newest revision in one
transaction. Replicas starting together on PostgreSQL take an advisory lock first, so exactly one
of them migrates and the others then find the schema at head; on SQLite the write transaction
(BEGIN IMMEDIATE, see store.open_engine) serializes them the same way.
"""

from __future__ import annotations

import logging
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, text

log = logging.getLogger(__name__)

SCRIPT_LOCATION = Path(__file__).resolve().parent
ADVISORY_LOCK_KEY = 0x5E61_5713  # any constant shared by every registry replica


def alembic_config(connection: Connection | None = None) -> Config:
    """An Alembic Config pointing at this package's scripts (and at `connection`, when given)."""
    config = Config()
    config.set_main_option("script_location", str(SCRIPT_LOCATION))
    if connection is not None:
        config.attributes["connection"] = connection
    return config


def head_revision() -> str:
    """The newest revision this code knows."""
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    if head is None:
        raise RuntimeError(f"no migrations found under {SCRIPT_LOCATION}")
    return head


def current_revision(engine: Engine) -> str | None:
    """The revision the database is at (None when it was never migrated)."""
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def upgrade_to_head(engine: Engine) -> str:
    """Migrate the database to head in one transaction; return the head revision."""
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": ADVISORY_LOCK_KEY})
        before = MigrationContext.configure(conn).get_current_revision()
        command.upgrade(alembic_config(conn), "head")
    head = head_revision()
    if before != head:
        log.info("database migrated from %s to %s", before or "empty", head)
    return head
