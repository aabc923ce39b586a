"""Our proto/inference contracts are wire-identical to NVIDIA Triton's (tritonclient).

tritonclient's stubs and ours both register ``inference.*`` in protobuf's default descriptor
pool, so Triton's side is summarized in a subprocess (tests/contracts/_wire_summary.py
--triton) and compared with the same summary built here from our generated descriptors.
tritonclient is a dev dependency: if it is missing the test fails, it does not skip.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from inference import grpc_service_pb2, model_config_pb2

HELPER_PATH = Path(__file__).with_name("_wire_summary.py")
SERVICE = "inference.GRPCInferenceService"
EXPECTED_METHODS = {
    f"{SERVICE}/{name}"
    for name in (
        "ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata",
        "ModelInfer", "ModelStreamInfer", "ModelConfig", "ModelStatistics",
        "RepositoryIndex", "RepositoryModelLoad", "RepositoryModelUnload",
    )
}


def _load_helper() -> ModuleType:
    """Import _wire_summary.py by path (tests/ is not a package)."""
    spec = importlib.util.spec_from_file_location("_inference_wire_summary", HELPER_PATH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


helper = _load_helper()


@pytest.fixture(scope="module")
def ours() -> dict[str, dict[str, Any]]:
    """Summary of our generated inference descriptors."""
    return helper.summarize([model_config_pb2.DESCRIPTOR, grpc_service_pb2.DESCRIPTOR])


@pytest.fixture(scope="module")
def triton() -> dict[str, dict[str, Any]]:
    """Summary of tritonclient's descriptors, built in a separate interpreter."""
    result = subprocess.run(
        [sys.executable, str(HELPER_PATH), "--triton"],
        capture_output=True, text=True, timeout=120, check=False,
    )
    if result.returncode == helper.EXIT_NO_TRITON:
        pytest.fail(
            "tritonclient[grpc] is a dev dependency and must be installed for the "
            f"Open Inference Protocol wire test: {result.stderr.strip()}"
        )
    assert result.returncode == 0, f"tritonclient summary failed:\n{result.stderr}"
    return json.loads(result.stdout)


def test_declares_exactly_the_twelve_rpcs(ours: dict[str, dict[str, Any]]) -> None:
    assert set(ours["methods"]) == EXPECTED_METHODS


def test_every_declaration_matches_triton(
    ours: dict[str, dict[str, Any]], triton: dict[str, dict[str, Any]]
) -> None:
    problems = helper.compare(ours, triton)
    assert not problems, "\n".join(problems)


def test_declares_exactly_what_the_rpcs_need(
    ours: dict[str, dict[str, Any]], triton: dict[str, dict[str, Any]]
) -> None:
    needed = helper.closure(triton, EXPECTED_METHODS)
    declared = set(ours["messages"]) | set(ours["enums"])
    assert declared == needed, {
        "missing": sorted(needed - declared), "extra": sorted(declared - needed)
    }


def test_compare_reports_a_field_number_mismatch() -> None:
    field = {"number": 1, "type": "TYPE_STRING", "label": "LABEL_OPTIONAL", "type_name": "",
             "oneof": None, "proto3_optional": False, "options": ""}
    message = {"syntax": "proto3", "map_entry": False, "oneofs": [],
               "fields": {"name": field}, "nested_messages": [], "nested_enums": []}
    reference = {"messages": {"pkg.M": message}, "enums": {}, "methods": {}}
    renumbered = {**message, "fields": {"name": {**field, "number": 2}}}
    ours = {"messages": {"pkg.M": renumbered}, "enums": {}, "methods": {}}

    assert helper.compare(reference, reference) == []
    assert helper.compare(ours, reference) == [
        "message pkg.M: fields.name.number: ours 2 != reference 1"
    ]
    assert helper.compare({"messages": {"pkg.N": message}}, reference) == [
        "message pkg.N: not declared by the reference"
    ]
