"""Pants' protobuf codegen (the local protoc and gRPC plugin) writes the modules `make proto` writes,
into the contracts lib's source root, and they import and work with the repo's protobuf and grpcio."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from pants_tree import ROOT

CONTRACTS_SRC = ROOT / "libs" / "contracts" / "src"
PROBE = """
import sys
sys.path.insert(0, sys.argv[1])
import splitstack.registry.v1.registry_pb2 as pb, splitstack.registry.v1.registry_pb2_grpc as pb_grpc
import inference.grpc_service_pb2_grpc as inference_grpc
assert pb.__file__.startswith(sys.argv[1]), pb.__file__
assert "Registry" in pb.DESCRIPTOR.services_by_name
assert hasattr(pb_grpc, "RegistryStub") and hasattr(inference_grpc, "GRPCInferenceServiceStub")
"""


def generated(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*_pb2*.py")}


def test_codegen_writes_the_contracts_modules(untouched):
    tree, run = untouched
    assert run.returncode == 0, run.output
    out = tree / "dist" / "codegen" / "libs" / "contracts" / "src"
    assert generated(out), run.output
    assert generated(out) == generated(CONTRACTS_SRC)  # the same modules as `make proto`


def test_generated_modules_import_with_the_repo_runtime(untouched):
    tree, _ = untouched
    out = tree / "dist" / "codegen" / "libs" / "contracts" / "src"
    result = subprocess.run([sys.executable, "-c", PROBE, str(out)], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
