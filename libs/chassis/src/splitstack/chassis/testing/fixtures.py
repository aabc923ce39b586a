"""pytest plugin (entry point `splitstack`): real servers for every service's tests.

- `nats_server`: a fresh nats-server with JetStream on a free port, per test.
- `postgres_url`: a fresh, empty PostgreSQL database per test, from SPLITSTACK_TEST_POSTGRES_URL or
  the local server at 127.0.0.1:5432; skipped (with the reason printed) when none is reachable.
- `s3_server`: a SeaweedFS S3 server on free ports, shared by the session; tests make their own buckets.
- `SERVICE_LOGS`: append objects with `log_files() -> [(label, path)]` to `item.stash[SERVICE_LOGS]`
  and a failing test's report carries the tail of each of those logs.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from splitstack.chassis.testing.servers import NatsServer, S3Server, start_nats, start_s3

DEFAULT_TEST_POSTGRES_URL = "postgresql://postgres@127.0.0.1:5432/test"
SERVICE_LOGS = pytest.StashKey[list]()
LOG_TAIL_CHARS = 20000


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    """Attach the tail of every registered service log to a failing test's report."""
    report = yield
    if report.failed:
        for owner in item.stash.get(SERVICE_LOGS, []):
            for label, path in owner.log_files():
                try:
                    text = Path(path).read_text(errors="replace")[-LOG_TAIL_CHARS:]
                except OSError as exc:
                    text = f"(cannot read {path}: {exc})"
                report.sections.append((f"log: {label}", text))
    return report


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[NatsServer]:
    """A real nats-server -js on a free port, with its own store."""
    server = start_nats(tmp_path / "nats")
    yield server
    server.stop()


def _admin_url() -> str:
    return os.environ.get("SPLITSTACK_TEST_POSTGRES_URL", DEFAULT_TEST_POSTGRES_URL)


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A SQLAlchemy URL (psycopg 3) of a fresh database, dropped after the test."""
    import psycopg

    admin = _admin_url()
    try:
        conn = psycopg.connect(admin, autocommit=True, connect_timeout=3)
    except psycopg.OperationalError as exc:
        pytest.skip(f"no PostgreSQL at {admin} ({str(exc).strip()}); set SPLITSTACK_TEST_POSTGRES_URL "
                    "or start the local server (see README)")
    name = f"splitstack_test_{uuid.uuid4().hex[:12]}"
    with conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base = admin.rsplit("/", 1)[0]
    yield f"postgresql+psycopg://{base.split('://', 1)[1]}/{name}"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """A real S3 API (SeaweedFS) shared by the test session."""
    server = start_s3(tmp_path_factory.mktemp("s3"))
    yield server
    server.stop()
