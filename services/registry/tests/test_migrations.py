"""The Alembic migrations: they build the whole schema from nothing and match the code's tables.

On SQLite and PostgreSQL: an empty database migrates to head; the migrated schema equals
tables.metadata (Alembic's autogenerate comparison finds no difference, so no table, column,
index or constraint was forgotten, the chassis outbox table included); upgrading again is a
no-op; replicas migrating at the same moment all succeed; downgrade/upgrade round-trips; and a
database written at an older revision keeps its rows (versions stored before promotion decisions
existed come out undecided).
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Iterator
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Engine, insert, inspect, select

from splitstack_registry import tables
from splitstack_registry.migrations import alembic_config, current_revision, head_revision, upgrade_to_head
from splitstack_registry.store import open_engine

EXPECTED_TABLES = {"models", "versions", "artifacts", "serving_choices", "datasets", "dataset_versions",
                   "aliases", "alias_moves", "outbox", "outbox_parked", "alembic_version"}


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/nested/dir/registry.db"
    return request.getfixturevalue("postgres_url")


@pytest.fixture
def engine(database_url: str) -> Iterator[Engine]:
    engine = open_engine(database_url)
    yield engine
    engine.dispose()


def schema_differences(engine: Engine) -> list:
    with engine.connect() as conn:
        return compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), tables.metadata)


def test_an_empty_database_migrates_to_head_matching_the_tables(engine: Engine) -> None:
    assert current_revision(engine) is None
    assert upgrade_to_head(engine) == head_revision()
    assert current_revision(engine) == head_revision()
    assert set(inspect(engine).get_table_names()) == EXPECTED_TABLES
    assert schema_differences(engine) == []
    outbox_indexes = {ix["name"] for ix in inspect(engine).get_indexes("outbox")}
    assert "ix_outbox_pending" in outbox_indexes


def test_upgrading_again_changes_nothing(engine: Engine) -> None:
    upgrade_to_head(engine)
    upgrade_to_head(engine)
    assert current_revision(engine) == head_revision() and schema_differences(engine) == []


async def test_replicas_migrating_together_all_succeed(database_url: str) -> None:
    engines = [open_engine(database_url) for _ in range(3)]
    try:
        heads = await asyncio.gather(*(asyncio.to_thread(upgrade_to_head, e) for e in engines))
        assert heads == [head_revision()] * 3
        assert schema_differences(engines[0]) == []
    finally:
        for e in engines:
            e.dispose()


def test_downgrade_to_base_and_back(engine: Engine) -> None:
    upgrade_to_head(engine)
    with engine.begin() as conn:
        command.downgrade(alembic_config(conn), "base")
    assert set(inspect(engine).get_table_names()) <= {"alembic_version"}
    upgrade_to_head(engine)
    assert schema_differences(engine) == []


def test_versions_stored_before_promotion_decisions_survive_the_upgrade_undecided(engine: Engine) -> None:
    with engine.begin() as conn:
        command.upgrade(alembic_config(conn), "0001_initial")
    now = dt.datetime.now(dt.timezone.utc)
    with engine.begin() as conn:
        conn.execute(insert(tables.models).values(
            name="digits", uid="u", spec=b"", policy=b"", policy_updated_at=now, last_version=1, created_at=now))
        conn.execute(insert(tables.versions).values(
            model="digits", version=1, state=2, lineage=b"", signature=b"", created_at=now))
    assert upgrade_to_head(engine) == head_revision() and schema_differences(engine) == []
    with engine.connect() as conn:
        rows = conn.execute(select(tables.versions.c.model, tables.versions.c.version,
                                   tables.versions.c.promotion)).all()
    assert [tuple(r) for r in rows] == [("digits", 1, None)]
