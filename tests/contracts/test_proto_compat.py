"""The breaking-change check really catches removed, renumbered and retyped fields."""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def compat():
    spec = importlib.util.spec_from_file_location("proto_compat", ROOT / "tools" / "proto_compat.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["proto_compat"] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def snapshot(compat) -> dict:
    return json.loads(compat.SNAPSHOT.read_text())


def _edited_proto_tree(tmp_path: Path, rel: str, old: str, new: str) -> Path:
    tree = tmp_path / "proto"
    shutil.copytree(ROOT / "proto", tree)
    path = tree / rel
    text = path.read_text()
    assert old in text, f"{old!r} not in {rel}"
    path.write_text(text.replace(old, new, 1))
    return tree


def test_committed_snapshot_matches_or_is_grown_by_current_protos(compat, snapshot):
    current = compat.summarize(compat.build_descriptor_set(ROOT / "proto"))
    assert compat.breaking_changes(snapshot, current) == []


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        ("  int64 row_count = 5;\n", "", "DatasetVersion.row_count was removed"),
        ("  int64 row_count = 5;", "  int64 row_count = 15;", "DatasetVersion.row_count changed"),
        ("  int64 row_count = 5;", "  string row_count = 5;", "DatasetVersion.row_count changed"),
        ("  int64 row_count = 5;", "  int64 rows = 5;", "reuses number 5 of removed field row_count"),
    ],
)
def test_breaking_edits_of_a_real_proto_are_reported(compat, snapshot, tmp_path, old, new, expected):
    tree = _edited_proto_tree(tmp_path, "splitstack/registry/v1/registry.proto", old, new)
    problems = compat.breaking_changes(snapshot, compat.summarize(compat.build_descriptor_set(tree)))
    assert any(expected in p for p in problems), problems


def test_adding_a_field_is_compatible(compat, snapshot, tmp_path):
    tree = _edited_proto_tree(tmp_path, "splitstack/registry/v1/registry.proto",
                              "  int64 row_count = 5;", "  int64 row_count = 5;\n  string note = 99;")
    assert compat.breaking_changes(snapshot, compat.summarize(compat.build_descriptor_set(tree))) == []


def test_method_streaming_change_and_enum_renumbering_are_breaking(compat, snapshot):
    edited = json.loads(json.dumps(snapshot))
    edited["services"][".splitstack.registry.v1.Registry"]["UploadArtifact"]["client_streaming"] = False
    edited["enums"][".splitstack.common.v1.Precision"]["PRECISION_INT8"] = 9
    problems = compat.breaking_changes(snapshot, edited)
    assert len(problems) == 2, problems
