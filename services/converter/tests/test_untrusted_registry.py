"""What the registry holds is checked, and the registry may restart: real converter, registry and NATS.

- A program carrying a pickled object (see program_payloads.py) is refused by a pool with the
  default settings before anything is unpickled: the payload never runs.
- An artifact registered by a client under a candidate's key (same kind, precision and target),
  with a self-declared perfect gate result and an impossible latency, is kept (keys are immutable)
  but gated and measured by the converter itself: the serving choice follows what was measured.
- The registry restarting in the middle of a conversion (UNAVAILABLE for a while) is ridden out by
  retrying the call: the conversion finishes in its first attempt.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from converter_models import HandOff
from converter_support import (FAST_PROFILE, conversion_artifacts, expect_failure, fresh_name, get_version,
                               open_channel, open_event_log, register_version, sha256_of, start_registry)
from program_payloads import SPY_CODE, Exec, plant

from splitstack.common.v1 import common_pb2 as common
from splitstack.converter.v1 import converter_pb2 as cpb
from splitstack.converter.v1 import converter_pb2_grpc
from splitstack.registry.v1 import registry_pb2_grpc
from splitstack_converter.pipeline.export import export_onnx
from splitstack_converter.pipeline.optimize import optimize_onnx
from splitstack_converter.pipeline.quantize import quantize_int8

pytestmark = pytest.mark.timeout(420)

FORGED_P50_MS = 1e-6
FORGED_GATE = common.GateResult(passed=True, top1_agreement=1.0, reference_metric=1.0, candidate_metric=1.0,
                                metric_name="accuracy", reason="passed: trust me")


def forged_profile() -> common.MeasuredProfile:
    points = [common.LatencyPoint(batch_size=b, p50_ms=FORGED_P50_MS, p99_ms=FORGED_P50_MS, runs=1000,
                                  throughput_rows_per_s=1e12) for b in (1, 64)]
    return common.MeasuredProfile(target="cpu", device="forged", runtime="forged", points=points, accuracy=1.0)


def forged_artifacts(mlp: HandOff, root: Path) -> dict[int, bytes]:
    """FP32: the unoptimized export (accurate, other bytes than the converter's optimized model);
    INT8: calibrated on zeros (fails the gate, see test_service)."""
    (root / "model.pt2").write_bytes(mlp.program)
    export_onnx(root / "model.pt2", root / "exported.onnx")
    optimize_onnx(root / "exported.onnx", root / "optimized.onnx")
    quantize_int8(root / "optimized.onnx", root / "int8.onnx", np.zeros((64, 64), dtype=np.float32), "x")
    return {common.ONNX_FP32: (root / "exported.onnx").read_bytes(),
            common.ONNX_INT8: (root / "int8.onnx").read_bytes()}


def header_fields(fmt: int) -> dict:
    precision = common.PRECISION_FP32 if fmt == common.ONNX_FP32 else common.PRECISION_INT8
    return {"kind": common.ONNX, "precision": precision, "target": "cpu", "format": fmt,
            "filename": f"forged-{fmt}.onnx", "gate": FORGED_GATE, "profile": forged_profile()}


@pytest.fixture(scope="module")
def guarded_pool(stacks: Callable):  # noqa: ANN201  conftest.Stack
    return stacks("guarded", dict(FAST_PROFILE))


@pytest.fixture
def guarded(guarded_pool, request: pytest.FixtureRequest):  # noqa: ANN001, ANN201
    guarded_pool.attach_logs(request.node)
    return guarded_pool


async def test_pickled_programs_are_refused_before_unpickling(guarded, handoffs: dict[str, HandOff],
                                                              tmp_path: Path) -> None:
    stack = guarded
    marker = tmp_path / "spy.json"
    cnn = handoffs["cnn"]
    failed = await expect_failure(stack, plant(cnn.program, Exec(SPY_CODE, marker)), cnn.sample, "refused")
    assert "pickled object" in failed.reason and "Unsupported global: GLOBAL exec" in failed.reason, failed.reason
    assert not marker.exists()                                   # never unpickled
    assert stack.converter.proc.poll() is None


async def test_registered_artifacts_are_gated_and_measured_again(guarded, handoffs: dict[str, HandOff],  # noqa: ANN001
                                                                 tmp_path: Path) -> None:
    stack = guarded
    mlp = handoffs["mlp"]
    forged = forged_artifacts(mlp, tmp_path)
    model = fresh_name("forged")
    async with open_channel(stack.registry.address) as channel, open_event_log(stack.nats.url) as events:
        stub = registry_pb2_grpc.RegistryStub(channel)
        version = (await register_version(stub, model, mlp.program, mlp.sample,
                                          extra=[(header_fields(f), data) for f, data in forged.items()])).version
        converted = await events.wait_for(f"model.converted.{model}.cpu")
        found = await get_version(stub, model, version)
        assert await events.read(f"conversion.failed.{model}.>") == []
    assert len(converted) == 1 and len(found.serving_choices) == 1
    assert {a.sha256 for a in conversion_artifacts(found)} == {sha256_of(d) for d in forged.values()}  # kept
    choice = found.serving_choices[0]
    candidates = {c.format: c for c in choice.candidates}

    int8 = candidates[common.ONNX_INT8]          # self-declared: passed, agreement 1.0, 1 ns
    assert not int8.accepted and not int8.gate.passed and not int8.artifact_sha256
    assert int8.gate.top1_agreement < 0.97 and "top-1 agreement" in int8.gate.reason
    assert "re-gated here: rejected" in int8.reason and not int8.HasField("profile")

    fp32 = candidates[common.ONNX_FP32]          # accurate, but its latency was made up
    assert fp32.accepted and fp32.gate.passed and fp32.artifact_sha256 == sha256_of(forged[common.ONNX_FP32])
    assert fp32.gate.reason != FORGED_GATE.reason and "re-gated here" in fp32.reason
    assert fp32.profile.runtime.startswith("onnxruntime") and fp32.profile.device != "forged"
    assert all(p.p50_ms > 1000 * FORGED_P50_MS for p in fp32.profile.points)
    assert choice.artifact.sha256 == fp32.artifact_sha256 and choice.artifact.format == common.ONNX_FP32

    async with open_channel(stack.converter.address) as channel:
        record = await converter_pb2_grpc.ConverterStub(channel).GetConversion(
            cpb.GetConversionRequest(model=model, version=version, target="cpu"))
    assert record.state == cpb.SUCCEEDED and record.serving_choice.artifact.sha256 == fp32.artifact_sha256
    recorded = {c.format: c for c in record.candidates}
    assert not recorded[common.ONNX_INT8].accepted and recorded[common.ONNX_FP32].profile.device != "forged"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


async def wait_until(check: Callable[[], bool], what: str, timeout: float = 300.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not check():
        assert asyncio.get_running_loop().time() < deadline, f"no {what} within {timeout}s"
        await asyncio.sleep(0.2)


async def test_a_registry_restart_during_a_conversion_is_retried(stacks: Callable, handoffs: dict[str, HandOff],
                                                                 request: pytest.FixtureRequest) -> None:
    port = free_port()
    stack = stacks("restart", {**FAST_PROFILE, "SPLITSTACK_CONVERTER_REGISTRY_RETRY_SECONDS": "600"},
                   registry_port=port)
    stack.attach_logs(request.node)
    converter = stack.converter
    cnn = handoffs["cnn"]
    model = fresh_name("restart")
    async with open_channel(stack.registry.address) as channel:
        version = (await register_version(registry_pb2_grpc.RegistryStub(channel), model, cnn.program,
                                          cnn.sample)).version
    # Once the inputs are fetched, the registry goes away; the next call (at registration) fails.
    await wait_until(lambda: f"starting conversion {model}." in converter.log(), "conversion start")
    async with open_channel(converter.address) as channel:
        api = converter_pb2_grpc.ConverterStub(channel)
        while (await api.GetConversion(cpb.GetConversionRequest(model=model, version=version, target="cpu"))
               ).stage in ("", "fetch"):
            await asyncio.sleep(0.2)
    stack.registry.stop()
    await wait_until(lambda: "registry GetVersion failed (attempt" in converter.log(), "retried registry call")
    stack.registry = start_registry(stack.pool.root.parent / "registry", stack.nats.url, port)
    async with open_event_log(stack.nats.url) as events:
        converted = await events.wait_for(f"model.converted.{model}.cpu", timeout=300)
        assert await events.read(f"conversion.failed.{model}.>") == []
    assert len(converted) == 1 and converter.proc.poll() is None
    assert converter.log().count(f"starting conversion {model}.") == 1       # the first attempt finished
