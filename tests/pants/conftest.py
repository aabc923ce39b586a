"""Fixtures of the Pants tests, which run under `make pants` only (SPLITSTACK_PANTS=1): each Pants
run takes a minute or more on these machines, and `make test` must not depend on Pants."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # pants_tree: beside this file
from pants_tree import CHECKED, PantsRun, bootstrap, copy_repo, run_pants  # noqa: E402

collect_ignore_glob = [] if os.environ.get("SPLITSTACK_PANTS") == "1" else ["test_*.py"]


@pytest.fixture(scope="session")
def pants_ready() -> None:
    """Bootstraps Pants (tools/pants.sh); skips, saying why, on a machine that cannot run it."""
    reason = bootstrap()
    if reason:
        pytest.skip(f"Pants cannot run on this machine: {reason}")


@pytest.fixture(scope="session")
def untouched(pants_ready, tmp_path_factory) -> tuple[Path, PantsRun]:
    """An unmodified copy of the repo: its dependency graph (rules enforced) and protobuf codegen."""
    tree = copy_repo(tmp_path_factory.mktemp("untouched") / "repo")
    return tree, run_pants(tree, "dependencies", "export-codegen", *CHECKED, "proto::")
