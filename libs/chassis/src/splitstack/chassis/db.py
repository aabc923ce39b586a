"""SQLAlchemy engines the way every service runs them: PostgreSQL, or SQLite made safe for services.

On SQLite a service gets WAL (readers never block the writer), a busy timeout, and write
transactions that begin IMMEDIATE: the write lock is taken at BEGIN, so two transactions never
deadlock upgrading read locks and concurrent requests in one process queue instead of failing with
"database is locked". A connection whose execution options carry READ_ONLY_OPTION begins a plain
(deferred) transaction instead. The outbox relay never holds that lock across a publish.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.engine import make_url

SQLITE_BUSY_SECONDS = 30.0
READ_ONLY_OPTION = "splitstack_read_only"


def open_engine(url: str, *, foreign_keys: bool = False, pool_size: int = 8) -> Engine:
    """An engine for `url`: PostgreSQL (pre-ping, pooled) or SQLite (WAL, busy timeout, IMMEDIATE writes)."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        return create_engine(url, pool_pre_ping=True, pool_size=pool_size, max_overflow=pool_size)
    if parsed.database and parsed.database != ":memory:":
        Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": SQLITE_BUSY_SECONDS})

    @event.listens_for(engine, "connect")
    def _connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None  # the "begin" listener below emits BEGIN itself
        cursor = dbapi_connection.cursor()
        cursor.execute(f"PRAGMA busy_timeout={int(SQLITE_BUSY_SECONDS * 1000)}")
        if foreign_keys:
            cursor.execute("PRAGMA foreign_keys=ON")
        _use_wal(cursor)
        cursor.close()

    event.listen(engine, "begin", _sqlite_begin)
    return engine


def _use_wal(cursor: Any) -> None:
    """Switch a database file to WAL (once; the mode persists in the file).

    The switch needs an exclusive lock, and SQLite answers "database is locked" at once, without
    waiting, when connections of several processes race for it on a fresh file; so retry a while.
    """
    deadline = time.monotonic() + SQLITE_BUSY_SECONDS
    while cursor.execute("PRAGMA journal_mode").fetchone()[0] not in ("wal", "memory"):
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
        except sqlite3.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def _sqlite_begin(conn: Connection) -> None:
    """Writers (the default, the outbox relay included) take the write lock at BEGIN; readers do not."""
    read_only = conn.get_execution_options().get(READ_ONLY_OPTION, False)
    conn.exec_driver_sql("BEGIN" if read_only else "BEGIN IMMEDIATE")
