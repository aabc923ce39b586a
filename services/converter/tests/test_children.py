"""The child processes that run untrusted models: their environment, and their limits enforced.

Real children (`python -I -m splitstack_converter.pipeline.worker`) on hand-made ONNX models: one
whose Loop never ends (ONNX Runtime runs it forever) and one that asks for far more memory than
the child may have. The service process only waits for them.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from splitstack.common.v1 import common_pb2 as common
from splitstack_converter.pipeline.isolation import MIB, ChildLimits, child_environment
from splitstack_converter.pipeline.runners import OrtOptions
from splitstack_converter.pipeline.worker import run_in_child

pytestmark = pytest.mark.timeout(300)

ROWS = np.zeros((4, 64), dtype=np.float32)


def save(graph: onnx.GraphProto, path: Path) -> Path:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))
    return path


def io_spec() -> tuple[list, list]:
    return ([helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 64])],
            [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 64])])


def endless_loop(path: Path) -> Path:
    """logits = x after 2**62 iterations of a Loop whose body passes its state through."""
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"]), helper.make_node("Neg", ["v_in"], ["v_out"])],
        "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("v_in", TensorProto.FLOAT, ["batch", 64])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("v_out", TensorProto.FLOAT, ["batch", 64])])
    nodes = [helper.make_node("Constant", [], ["trips"], value=helper.make_tensor("t", TensorProto.INT64, [], [2**62])),
             helper.make_node("Constant", [], ["go"], value=helper.make_tensor("g", TensorProto.BOOL, [], [True])),
             helper.make_node("Loop", ["trips", "go", "x"], ["logits"], body=body)]
    return save(helper.make_graph(nodes, "endless", *io_spec()), path)


def huge_allocation(path: Path) -> Path:
    """logits = x + the sum of a zero tensor of [2**14, 2**15] floats (2 GiB: fits the machine, not the child)."""
    shape = helper.make_tensor("shape", TensorProto.INT64, [2], [2**14, 2**15])
    nodes = [helper.make_node("ConstantOfShape", ["shape"], ["zeros"]),
             helper.make_node("ReduceSum", ["zeros"], ["total"], keepdims=0),
             helper.make_node("Add", ["x", "total"], ["logits"])]
    graph = helper.make_graph(nodes, "huge", *io_spec(), initializer=[shape])
    return save(graph, path)


def test_a_model_that_never_finishes_is_killed_at_the_time_limit(tmp_path: Path) -> None:
    model = endless_loop(tmp_path / "endless.onnx")
    started = time.monotonic()
    with pytest.raises(RuntimeError, match=r"running the candidate on the sample did not finish within its 20s "
                                           r"time limit \(the process was killed\)"):
        run_in_child(common.ONNX_FP32, model, ROWS, 64, OrtOptions(), tmp_path / "child", ChildLimits(20, 2048 * MIB))
    assert 20 <= time.monotonic() - started < 120


def test_a_model_that_exhausts_memory_fails_naming_the_limit(tmp_path: Path) -> None:
    model = huge_allocation(tmp_path / "huge.onnx")
    with pytest.raises(RuntimeError, match=r"running the candidate on the sample ran out of its memory limit "
                                           r"\(1024 MiB\)"):
        run_in_child(common.ONNX_FP32, model, ROWS, 64, OrtOptions(), tmp_path / "child", ChildLimits(120, 1024 * MIB))


def test_a_child_inherits_no_credentials(tmp_path: Path) -> None:
    parent = {"PATH": "/usr/bin", "LANG": "C.UTF-8", "SPLITSTACK_CONVERTER_DATABASE_URL": "postgresql://u:pw@db/x",
              "SPLITSTACK_NATS_PASSWORD": "pw", "SPLITSTACK_TLS_CLIENT_KEY_FILE": "/secrets/key.pem",
              "AWS_SECRET_ACCESS_KEY": "pw", "AWS_ACCESS_KEY_ID": "id", "PYTHONPATH": "/evil", "HOME": "/root"}
    env = child_environment(tmp_path, parent)
    assert env["PATH"] == "/usr/bin" and env["LANG"] == "C.UTF-8"
    assert env["HOME"] == env["TMPDIR"] == str(tmp_path) and env["PYTHONSAFEPATH"] == "1"
    assert not [k for k in env if k.startswith(("SPLITSTACK_", "AWS_", "PYTHONPATH"))]
    assert "pw" not in "".join(env.values())
