"""Fixtures of the fuzz suite: one seeded stack of real processes for the session (`fuzz_stack`), the
session's log of cases, statuses and findings (`fuzz_log`), and the report `make fuzz` writes.

The bounded run (default, part of `make test`) and the long one (`make fuzz`) differ only by environment
(see `fuzz_report.py`); tests carry the `fuzz` marker, so `-m "not fuzz"` leaves them out.
"""

from __future__ import annotations

import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis.configuration import set_hypothesis_home_dir

sys.path.insert(0, str(Path(__file__).parent))  # fuzz_*: beside this file

from fuzz_report import REPORT, FuzzLog  # noqa: E402
from fuzz_stack import FuzzStack  # noqa: E402

from splitstack.chassis.testing.fixtures import SERVICE_LOGS  # noqa: E402

set_hypothesis_home_dir(Path(tempfile.gettempdir()) / "splitstack-hypothesis")  # caches out of the work tree
LOG = FuzzLog()
STARTED = time.monotonic()


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "fuzz: property-based fuzzing of the running stack (tests/fuzz)")


@pytest.fixture(scope="session")
def fuzz_log() -> FuzzLog:
    return LOG


@pytest.fixture(scope="session")
def fuzz_session_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FuzzStack]:
    stack = FuzzStack.start(tmp_path_factory.mktemp("fuzz"))
    try:
        yield stack
    finally:
        stack.stop()


@pytest.fixture
def fuzz_stack(fuzz_session_stack: FuzzStack, request: pytest.FixtureRequest) -> FuzzStack:
    """The session's stack, every process alive (a failing test's report carries its logs)."""
    request.node.stash.setdefault(SERVICE_LOGS, []).append(fuzz_session_stack.stack)
    fuzz_session_stack.revive()
    return fuzz_session_stack


def pytest_sessionfinish(session: pytest.Session) -> None:
    if REPORT and LOG.cases:
        path = Path(REPORT)
        if not path.is_absolute():
            path = Path(session.config.rootpath) / path
        LOG.write(path, time.monotonic() - STARTED)


def pytest_terminal_summary(terminalreporter) -> None:  # noqa: ANN001
    if not LOG.cases:
        return
    terminalreporter.write_sep("-", f"fuzz: {sum(LOG.cases.values())} cases over {len(LOG.cases)} RPCs/consumers, "
                                    f"{len(LOG.findings)} findings" + (f", report {REPORT}" if REPORT else ""))
    for finding in LOG.findings:
        terminalreporter.write_line(finding.line())
