"""Black-box tests of one converter pool (target cpu) against a real registry and a real NATS.

The models are trained here (MLP, tiny CNN on digits), registered through the registry API, and
converted by the `splitstack-converter` process with its default measurement floors: 1,000 runs
or 2 s per point. `test_serving_choices_follow_measurement` is the one test whose outcome depends
on timing: INT8 is about twice as fast as FP32 for the MLP at batch 1 and slower for the tiny CNN,
far from the 10 % switching margin either way.
"""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from converter_models import HandOff
from converter_support import (conversion_artifacts, fresh_name, get_version, open_channel, open_event_log,
                               register_version)

from splitstack.common.v1 import common_pb2 as common
from splitstack.converter.v1 import converter_pb2 as cpb
from splitstack.converter.v1 import converter_pb2_grpc
from splitstack.registry.v1 import registry_pb2_grpc

pytestmark = pytest.mark.timeout(240)


async def convert(stack, program: bytes, sample: bytes, prefix: str, **register: object) -> tuple[str, int, list]:
    """Register a version and wait for its model.converted event; (model, version, converted events)."""
    model = fresh_name(prefix)
    async with open_channel(stack.registry.address) as channel, open_event_log(stack.nats.url) as events:
        version = await register_version(registry_pb2_grpc.RegistryStub(channel), model, program, sample, **register)
        converted = await events.wait_for(f"model.converted.{model}.cpu")
    return model, version.version, converted


def assert_profiled(artifact, max_batch: int = 64) -> None:
    profile = artifact.profile
    assert profile.target == "cpu" and profile.device and profile.runtime.startswith("onnxruntime")
    assert [p.batch_size for p in profile.points] == [1, max_batch]
    for point in profile.points:
        assert 0 < point.p50_ms <= point.p99_ms
        assert point.throughput_rows_per_s > 0 and point.runs >= 1
        assert point.runs >= 1000 or point.runs * point.p50_ms >= 1000.0 * 0.5   # the floors held
    assert profile.peak_memory_bytes > 0
    assert 0.9 < profile.accuracy <= 1.0


def measured_choice(p50: dict[int, float]) -> int:
    """The selection rule on recorded p50s: INT8 only when >= 10 % faster than FP32."""
    better = (p50[common.ONNX_FP32] - p50[common.ONNX_INT8]) / p50[common.ONNX_FP32]
    return common.ONNX_INT8 if better >= 0.10 else common.ONNX_FP32


async def test_serving_choices_follow_measurement(stack, handoffs: dict[str, HandOff]) -> None:
    mlp = handoffs["mlp"]
    model, version, converted = await convert(stack, mlp.program, mlp.sample, "mlp")
    cnn_model, cnn_version, cnn_converted = await convert(stack, handoffs["cnn"].program, handoffs["cnn"].sample, "cnn")
    async with open_channel(stack.registry.address) as channel, open_event_log(stack.nats.url) as events:
        stub = registry_pb2_grpc.RegistryStub(channel)
        found = await get_version(stub, model, version)
        artifacts = {a.format: a for a in conversion_artifacts(found)}
        assert sorted(artifacts) == [common.ONNX_FP32, common.ONNX_INT8]
        for fmt, artifact in artifacts.items():
            assert artifact.kind == common.ONNX and artifact.filename.endswith(".onnx")
            assert artifact.gate.passed and artifact.gate.metric_name == "accuracy"
            assert artifact.gate.top1_agreement >= 0.97 and artifact.gate.max_metric_drop == pytest.approx(0.01)
            assert_profiled(artifact)
        assert artifacts[common.ONNX_INT8].precision == common.PRECISION_INT8
        assert len(found.serving_choices) == 1
        choice = found.serving_choices[0]
        mlp_p50 = {f: a.profile.points[0].p50_ms for f, a in artifacts.items()}
        assert choice.artifact.format == common.ONNX_INT8, (choice.reason, mlp_p50)
        assert choice.artifact.sha256 == artifacts[common.ONNX_INT8].sha256
        assert {c.format for c in choice.candidates if c.accepted} == {common.ONNX_FP32, common.ONNX_INT8}
        assert len(converted) == 1 and converted[0].payload.serving_choice.artifact.sha256 == choice.artifact.sha256
        assert await events.read(f"conversion.failed.{model}.>") == []

        cnn = await get_version(stub, cnn_model, cnn_version)
        cnn_artifacts = {a.format: a for a in conversion_artifacts(cnn)}
        cnn_p50 = {f: a.profile.points[0].p50_ms for f, a in cnn_artifacts.items()}
        assert len(cnn_converted) == 1
        # The tiny CNN's INT8 is slower than FP32 on a VNNI Xeon and faster on an AVX2 EPYC: which
        # wins is the measurement's to say, so the choice must follow the recorded profiles.
        assert cnn.serving_choices[0].artifact.format == measured_choice(cnn_p50), (cnn.serving_choices[0].reason,
                                                                                   cnn_p50)

    async with open_channel(stack.converter.address) as channel:
        api = converter_pb2_grpc.ConverterStub(channel)
        record = await api.GetConversion(cpb.GetConversionRequest(model=model, version=version, target="cpu"))
        assert record.state == cpb.SUCCEEDED and record.stage == "register" and not record.error
        assert record.id == f"{model}.{version}.cpu"
        assert record.serving_choice.artifact.sha256 == choice.artifact.sha256
        assert record.tolerance.max_metric_drop == pytest.approx(0.01)
        assert record.started_at.seconds and record.finished_at.ToDatetime() >= record.started_at.ToDatetime()
        watched = [c async for c in api.WatchConversion(cpb.WatchConversionRequest(model=model, version=version,
                                                                                   target="cpu"))]
        assert [c.state for c in watched] == [cpb.SUCCEEDED]


async def test_int8_failing_the_gate_is_rejected_and_fp32_served(stack, handoffs: dict[str, HandOff]) -> None:
    mlp = handoffs["mlp"]
    degenerate = mlp.sample_with(calibration_inputs=np.zeros((64, 64), dtype=np.float32))
    model, version, converted = await convert(stack, mlp.program, degenerate, "degenerate")
    async with open_channel(stack.registry.address) as channel:
        found = await get_version(registry_pb2_grpc.RegistryStub(channel), model, version)
    assert [a.format for a in conversion_artifacts(found)] == [common.ONNX_FP32]   # nothing rejected is kept
    choice = found.serving_choices[0]
    assert choice.artifact.format == common.ONNX_FP32 and len(converted) == 1
    int8 = next(c for c in choice.candidates if c.format == common.ONNX_INT8)
    assert not int8.accepted and not int8.artifact_sha256 and not int8.gate.passed
    assert int8.gate.candidate_metric < int8.gate.reference_metric - 0.01 or int8.gate.top1_agreement < 0.97
    assert "rejected" in int8.reason and "top-1 agreement" in int8.gate.reason
    assert not int8.HasField("profile")                     # only passing candidates are measured
    fp32 = next(c for c in choice.candidates if c.format == common.ONNX_FP32)
    assert fp32.accepted and fp32.gate.passed and fp32.gate.max_abs_diff < 1e-3


async def test_corrupt_exported_program_fails_and_registers_nothing(stack, handoffs: dict[str, HandOff]) -> None:
    garbage = bytes(np.random.default_rng(7).integers(0, 256, 200_000, dtype=np.uint8))
    model = fresh_name("corrupt")
    async with open_channel(stack.registry.address) as channel, open_event_log(stack.nats.url) as events:
        stub = registry_pb2_grpc.RegistryStub(channel)
        version = (await register_version(stub, model, garbage, handoffs["cnn"].sample)).version
        failed = await events.wait_for(f"conversion.failed.{model}.cpu")
        letters = await events.wait_for("deadletter.converter-cpu", 1)
        assert len(failed) == 1
        event = failed[0].payload
        assert (event.model, event.version, event.target, event.stage) == (model, version, "cpu", "export")
        assert "cannot load the exported program" in event.reason
        assert failed[0].msg_id == failed[0].event.event_id and failed[0].event.producer.startswith("converter/")
        assert any(f"model.registered.{model}" == letter.payload.subject for letter in letters)  # terminated
        found = await get_version(stub, model, version)
        assert conversion_artifacts(found) == [] and list(found.serving_choices) == []
        assert await events.read(f"model.converted.{model}.>") == []
    async with open_channel(stack.converter.address) as channel:
        record = await converter_pb2_grpc.ConverterStub(channel).GetConversion(
            cpb.GetConversionRequest(model=model, version=version, target="cpu"))
        assert record.state == cpb.FAILED and record.stage == "export" and record.error == event.reason


async def test_converter_api(stack, handoffs: dict[str, HandOff]) -> None:
    cnn = handoffs["cnn"]
    model = fresh_name("ondemand")
    async with open_channel(stack.registry.address) as channel, open_event_log(stack.nats.url) as events:
        stub = registry_pb2_grpc.RegistryStub(channel)
        # Required only on the GPU target: the cpu pool acks model.registered without converting.
        version = (await register_version(stub, model, cnn.program, cnn.sample, required_targets=["t4-int8"])).version
        async with open_channel(stack.converter.address) as converter_channel:
            api = converter_pb2_grpc.ConverterStub(converter_channel)
            targets = (await api.ListTargets(cpb.ListTargetsRequest())).targets
            assert {t.id for t in targets} >= {"cpu", "t4-int8"}
            cpu = next(t for t in targets if t.id == "cpu")
            assert cpu.selection_metric.name == "p50_latency_ms" and cpu.max_batch == 64

            await expect(api.RequestConversion(cpb.RequestConversionRequest(model=model, version=version, target="tpu")),
                         grpc.StatusCode.NOT_FOUND, "tpu")
            await expect(api.RequestConversion(cpb.RequestConversionRequest(model=model, version=0, target="cpu")),
                         grpc.StatusCode.INVALID_ARGUMENT, "version")
            await expect(api.RequestConversion(cpb.RequestConversionRequest(model=model, version=99, target="cpu")),
                         grpc.StatusCode.NOT_FOUND, "99")
            await expect(api.RequestConversion(cpb.RequestConversionRequest(
                model=model, version=version, target="cpu", tolerance=common.GateTolerance(min_top1_agreement=2))),
                grpc.StatusCode.INVALID_ARGUMENT, "min_top1_agreement")
            await expect(api.GetConversion(cpb.GetConversionRequest(model=model, version=version, target="cpu")),
                         grpc.StatusCode.NOT_FOUND, model)

            # Another target's request is announced for that pool; this pool keeps no record of it.
            other = await api.RequestConversion(cpb.RequestConversionRequest(model=model, version=version,
                                                                              target="t4-int8"))
            assert other.state == cpb.REQUESTED
            await events.wait_for(f"conversion.requested.{model}.t4-int8")
            await expect(api.GetConversion(cpb.GetConversionRequest(model=model, version=version, target="t4-int8")),
                         grpc.StatusCode.NOT_FOUND, "t4-int8")

            requested = await api.RequestConversion(cpb.RequestConversionRequest(
                model=model, version=version, target="cpu", requested_by="tester",
                tolerance=common.GateTolerance(max_metric_drop=0.02)))
            assert requested.state in (cpb.REQUESTED, cpb.RUNNING) and requested.id == f"{model}.{version}.cpu"
            watched = [c async for c in api.WatchConversion(cpb.WatchConversionRequest(
                model=model, version=version, target="cpu"))]
            assert watched[-1].state == cpb.SUCCEEDED, watched[-1]
            assert len({c.stage for c in watched}) >= 2                 # progress was visible while it ran
            assert watched[-1].tolerance.max_metric_drop == pytest.approx(0.02)
            assert all(c.gate.max_metric_drop == pytest.approx(0.02) for c in watched[-1].candidates)
            requests = await events.wait_for(f"conversion.requested.{model}.cpu")
            assert requests[0].payload.requested_by == "tester"
            await events.wait_for(f"model.converted.{model}.cpu")

            again = await api.RequestConversion(cpb.RequestConversionRequest(model=model, version=version, target="cpu"))
            assert again.state == cpb.SUCCEEDED                          # converted once: no new request
            assert len(await events.read(f"conversion.requested.{model}.cpu")) == 1

            listed = await api.ListConversions(cpb.ListConversionsRequest(model=model))
            assert [c.id for c in listed.conversions] == [f"{model}.{version}.cpu"] and not listed.next_page_token
            everything = [c.id for c in (await api.ListConversions(cpb.ListConversionsRequest())).conversions]
            paged, token = [], ""
            while True:
                page = await api.ListConversions(cpb.ListConversionsRequest(target="cpu", page_size=1,
                                                                            page_token=token))
                assert len(page.conversions) == 1
                paged.append(page.conversions[0].id)
                token = page.next_page_token
                if not token:
                    break
            assert paged == everything and f"{model}.{version}.cpu" in paged
            await expect(api.ListConversions(cpb.ListConversionsRequest(page_token="garbage")),
                         grpc.StatusCode.INVALID_ARGUMENT, "page_token")


async def expect(call, code: grpc.StatusCode, *words: str) -> None:
    """Await `call`; assert it fails with `code` and a message naming every word."""
    try:
        result = await call
    except grpc.aio.AioRpcError as exc:
        assert exc.code() == code, f"expected {code.name}, got {exc.code().name}: {exc.details()}"
        for word in words:
            assert word in (exc.details() or ""), f"{exc.details()!r} does not name {word!r}"
        return
    raise AssertionError(f"expected {code.name}, got {result}")
