"""Fixtures of the deploy-check tests: the repository root on sys.path, and a copy of the tree to break."""

from __future__ import annotations

import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:   # tools/ is not an installed package: import tools.deploy_check from the root
    sys.path.insert(0, str(ROOT))


def copy_tree(destination: Path) -> Path:
    """What the deploy check reads: deploy/k8s and every service's Dockerfiles and pyproject.toml."""
    shutil.copytree(ROOT / "deploy" / "k8s", destination / "deploy" / "k8s")
    for service in sorted((ROOT / "services").iterdir()):
        files = [*service.glob("Dockerfile*"), service / "pyproject.toml"]
        for path in files:
            if path.is_file():
                (destination / "services" / service.name).mkdir(parents=True, exist_ok=True)
                shutil.copy(path, destination / "services" / service.name / path.name)
    return destination


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """A private copy of the deploy tree under tmp_path."""
    return copy_tree(tmp_path / "repo")


@pytest.fixture
def edit(tree: Path) -> Callable[[str, str, str], None]:
    """edit(relative_path, old, new): replace exactly one occurrence of `old` in a file of the copy."""
    def apply(relative: str, old: str, new: str) -> None:
        path = tree / relative
        text = path.read_text()
        assert text.count(old) == 1, f"{relative}: {old!r} occurs {text.count(old)} times"
        path.write_text(text.replace(old, new))
    return apply
