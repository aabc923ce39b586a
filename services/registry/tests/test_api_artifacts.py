"""Artifacts and serving choices through the Registry API: multi-MB round trips, content addressing
(identical content stored once), verification of declared digest and size, the upload limit,
write-once keys and serving choices — on both backends."""

from __future__ import annotations

import asyncio
import contextlib
import os

import grpc

from splitstack.common.v1 import common_pb2 as common
from splitstack.registry.v1 import registry_pb2 as pb

NOT_FOUND = grpc.StatusCode.NOT_FOUND
INVALID = grpc.StatusCode.INVALID_ARGUMENT
EXISTS = grpc.StatusCode.ALREADY_EXISTS
PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION
LIMIT_CODES = (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.INVALID_ARGUMENT)
MIB = 1024 * 1024
SHARED_MAX_UPLOAD_BYTES = 12 * MIB       # what conftest gives the shared registry


async def _pending_version(api) -> tuple[str, int]:
    model = (await api.create_model()).name
    return model, (await api.create_version(model)).version


async def test_multi_mb_artifact_round_trip_by_digest_and_by_key(api) -> None:
    model, version = await _pending_version(api)
    data = os.urandom(8 * MIB + 12345)
    digest = api.sha256(data)
    artifact = await api.upload(model, version, data, common.EXPORTED_PROGRAM, filename="model.pt2",
                                metadata={"exporter": "torch.export"}, chunk=MIB - 7)
    assert (artifact.model, artifact.version, artifact.kind) == (model, version, common.EXPORTED_PROGRAM)
    assert (artifact.sha256, artifact.size_bytes, artifact.filename) == (digest, len(data), "model.pt2")
    assert artifact.precision == common.PRECISION_FP32 and dict(artifact.metadata) == {"exporter": "torch.export"}
    assert artifact.created_at.seconds > 0

    record, content = await api.download(sha256=digest)
    assert (record.sha256, record.size_bytes) == (digest, len(data))
    assert len(content) == len(data) and api.sha256(content) == digest
    record, content = await api.download(model=model, version=version, kind=common.EXPORTED_PROGRAM,
                                         precision=common.PRECISION_FP32)
    assert record == artifact
    assert api.sha256(content) == digest

    sizes = [len(part.chunk) async for part in api.stub.DownloadArtifact(pb.DownloadArtifactRequest(sha256=digest))
             if part.WhichOneof("part") == "chunk"]
    assert sum(sizes) == len(data) and len(sizes) >= 9 and max(sizes) <= MIB, "chunks of at most chunk_bytes (1 MiB)"

    assert await api.artifacts(model, version) == [artifact]
    assert list((await api.get_version(model, version)).artifacts) == [artifact]
    stored = api.state.blobs_named(digest)
    assert list(stored.values()) == [len(data)], f"expected one complete blob for {digest}: {stored}"


async def test_same_content_from_8_concurrent_clients_is_stored_once(api, new_client) -> None:
    model = (await api.create_model()).name
    versions = [(await api.create_version(model)).version for _ in range(8)]
    data = os.urandom(2 * MIB + 99)
    digest = api.sha256(data)
    async with contextlib.AsyncExitStack() as stack:
        clients = [await stack.enter_async_context(new_client()) for _ in versions]
        uploaded = await asyncio.gather(*(client.upload(model, v, data, common.CHECKPOINT, chunk=256 * 1024)
                                          for client, v in zip(clients, versions)))
    assert [a.version for a in uploaded] == versions
    assert {a.sha256 for a in uploaded} == {digest}
    stored = api.state.blobs_named(digest)
    assert list(stored.values()) == [len(data)], f"identical content must be stored once: {stored}"
    for version in versions:
        assert [a.sha256 for a in await api.artifacts(model, version)] == [digest]
    _, content = await api.download(model=model, version=versions[-1], kind=common.CHECKPOINT,
                                    precision=common.PRECISION_FP32)
    assert api.sha256(content) == digest


async def test_reuploading_an_artifact_key_is_idempotent_and_another_digest_already_exists(api) -> None:
    model, version = await _pending_version(api)
    data = os.urandom(300_000)
    first = await api.upload(model, version, data, common.CHECKPOINT, filename="last.ckpt")
    assert await api.upload(model, version, data, common.CHECKPOINT, filename="last.ckpt") == first
    await api.fails(api.upload(model, version, os.urandom(1000), common.CHECKPOINT, filename="last.ckpt"), EXISTS)
    assert await api.artifacts(model, version) == [first]
    _, content = await api.download(model=model, version=version, kind=common.CHECKPOINT,
                                    precision=common.PRECISION_FP32)
    assert content == data


async def test_concurrent_uploads_to_one_key_of_one_content_all_return_the_record(api, new_client) -> None:
    model, version = await _pending_version(api)
    data = os.urandom(500_000)
    async with contextlib.AsyncExitStack() as stack:
        clients = [await stack.enter_async_context(new_client()) for _ in range(6)]
        uploaded = await asyncio.gather(*(c.upload(model, version, data, common.CHECKPOINT, chunk=64 * 1024)
                                          for c in clients))
    assert all(a == uploaded[0] for a in uploaded)
    assert await api.artifacts(model, version) == [uploaded[0]]


async def test_artifacts_need_a_kind_and_conversion_artifacts_a_target(api) -> None:
    model, version = await _pending_version(api)
    await api.fails(api.upload(model, version, os.urandom(100), common.ARTIFACT_KIND_UNSPECIFIED), INVALID, "kind")
    ready = (await api.ready_version(model)).version
    for kind in (common.ONNX, common.TENSORRT_PLAN):
        await api.fails(api.upload(model, ready, os.urandom(100), kind), INVALID, "target")
    assert await api.artifacts(model, version) == []
    assert {a.kind for a in await api.artifacts(model, ready)} == {common.EXPORTED_PROGRAM, common.SAMPLE}


async def test_artifact_keys_differ_by_kind_precision_and_target(api) -> None:
    model = (await api.create_model()).name
    version = (await api.ready_version(model)).version
    data = os.urandom(5000)
    keys = [(common.ONNX, common.PRECISION_FP32, "cpu"), (common.ONNX, common.PRECISION_INT8, "cpu"),
            (common.ONNX, common.PRECISION_FP32, "gpu-t4"), (common.TENSORRT_PLAN, common.PRECISION_FP16, "gpu-t4")]
    for kind, precision, target in keys:
        artifact = await api.upload(model, version, data, kind, precision=precision, target=target)
        assert (artifact.kind, artifact.precision, artifact.target, artifact.sha256) == (
            kind, precision, target, api.sha256(data))
    stored = {(a.kind, a.precision, a.target) for a in await api.artifacts(model, version)}
    assert set(keys) <= stored
    assert len(api.state.blobs_named(api.sha256(data))) == 1


async def test_digest_and_size_mismatches_are_invalid_and_store_nothing(api) -> None:
    model, version = await _pending_version(api)
    data = os.urandom(300_000)
    before = api.state.stored_files()
    await api.fails(api.upload(model, version, data, sha256=api.sha256(b"something else")), INVALID, "sha256")
    await api.fails(api.upload(model, version, data, size=len(data) + 1), INVALID, "size_bytes")
    await api.fails(api.upload(model, version, data, size=len(data) - 1), INVALID, "size_bytes")
    await api.fails(api.upload(model, version, data, sha256="not-a-digest"), INVALID, "sha256")
    await api.fails(api.upload(model, version, data, size=-5), INVALID, "size_bytes")
    assert await api.artifacts(model, version) == []
    assert api.state.stored_files() == before, "a rejected upload left something in the blob store"
    await api.fails(api.download(sha256=api.sha256(data)), NOT_FOUND)


async def test_uploads_over_the_limit_are_refused_and_store_nothing(api) -> None:
    model, version = await _pending_version(api)
    data = os.urandom(SHARED_MAX_UPLOAD_BYTES + MIB)
    before = api.state.stored_files()
    header = pb.ArtifactHeader(model=model, version=version, kind=common.CHECKPOINT, precision=common.PRECISION_FP32,
                               sha256=api.sha256(data), size_bytes=len(data))
    refused = await api.refused_upload(header, data, invalid_after=SHARED_MAX_UPLOAD_BYTES)
    assert refused.code() in LIMIT_CODES and "max_upload_bytes" in refused.details(), refused
    assert await api.artifacts(model, version) == []
    assert api.state.stored_files() == before


async def test_a_stream_longer_than_declared_is_refused_early_and_stores_nothing(api) -> None:
    model, version = await _pending_version(api)
    data = os.urandom(SHARED_MAX_UPLOAD_BYTES + MIB)
    before = api.state.stored_files()
    header = pb.ArtifactHeader(model=model, version=version, kind=common.CHECKPOINT, precision=common.PRECISION_FP32,
                               sha256=api.sha256(data), size_bytes=1024)
    refused = await api.refused_upload(header, data, invalid_after=1024)
    assert refused.code() in LIMIT_CODES and "size_bytes" in refused.details(), refused
    await api.fails(api.upload(model, version, b"x" * 1025, size=1024), INVALID, "size_bytes")
    assert await api.artifacts(model, version) == []
    assert api.state.stored_files() == before


async def test_a_cancelled_upload_stores_nothing_and_the_registry_carries_on(api) -> None:
    model, version = await _pending_version(api)
    data = os.urandom(3 * MIB)
    before = api.state.stored_files()
    first_chunk_sent = asyncio.Event()

    async def requests():
        yield pb.UploadArtifactRequest(header=pb.ArtifactHeader(
            model=model, version=version, kind=common.CHECKPOINT, precision=common.PRECISION_FP32,
            sha256=api.sha256(data), size_bytes=len(data)))
        yield pb.UploadArtifactRequest(chunk=data[:MIB])
        first_chunk_sent.set()
        await asyncio.Event().wait()          # the client stalls until it gives up

    call = api.stub.UploadArtifact(requests())
    await asyncio.wait_for(first_chunk_sent.wait(), 30)
    call.cancel()
    deadline = asyncio.get_running_loop().time() + 10
    while api.state.stored_files() != before and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.05)
    assert api.state.stored_files() == before, "a cancelled upload left its spool file or a blob"
    assert await api.artifacts(model, version) == []
    assert (await api.upload(model, version, data, common.CHECKPOINT)).sha256 == api.sha256(data)


async def test_an_upload_must_start_with_its_header(api) -> None:
    model, version = await _pending_version(api)
    chunk_only = [pb.UploadArtifactRequest(chunk=b"data")]
    await api.fails(api.stub.UploadArtifact(iter(chunk_only)), INVALID, "header")
    await api.fails(api.stub.UploadArtifact(iter([])), INVALID, "header")
    header = pb.ArtifactHeader(model=model, version=version, kind=common.CHECKPOINT,
                               precision=common.PRECISION_FP32, sha256=api.sha256(b"data"), size_bytes=4)
    two_headers = [pb.UploadArtifactRequest(header=header), pb.UploadArtifactRequest(header=header),
                   pb.UploadArtifactRequest(chunk=b"data")]
    await api.fails(api.stub.UploadArtifact(iter(two_headers)), INVALID)
    assert await api.artifacts(model, version) == []


async def test_uploads_to_unknown_or_misnamed_targets_are_rejected(api) -> None:
    model, version = await _pending_version(api)
    data = b"x" * 1000
    missing = api.name("missing")
    await api.fails(api.upload(missing, 1, data), NOT_FOUND, missing)
    await api.fails(api.upload(model, 99, data), NOT_FOUND, "99")
    await api.fails(api.upload("Bad Model", 1, data), INVALID, "model")
    ready = (await api.ready_version(model)).version
    await api.fails(api.upload(model, ready, data, common.ONNX, target="Bad Target"), INVALID, "target")
    assert await api.artifacts(model, version) == []


async def test_training_artifacts_need_a_pending_version_conversions_may_follow(api) -> None:
    model = (await api.create_model()).name
    ready = await api.ready_version(model)
    for kind in (common.CHECKPOINT, common.EXPORTED_PROGRAM, common.SAMPLE):
        await api.fails(api.upload(model, ready.version, os.urandom(100), kind, precision=common.PRECISION_BF16),
                        PRECONDITION)
    onnx = await api.upload(model, ready.version, os.urandom(1000), common.ONNX, target="cpu",
                            format=common.ONNX_FP32, filename="model.onnx")
    plan = await api.upload(model, ready.version, os.urandom(1000), common.TENSORRT_PLAN, target="gpu-t4",
                            precision=common.PRECISION_FP16, format=common.TENSORRT_FP16)
    after = await api.get_version(model, ready.version)
    assert after.state == pb.READY and after.finalized_at == ready.finalized_at
    assert list(after.artifacts) == list(ready.artifacts) + [onnx, plan]


async def test_downloads_of_unknown_blobs_or_keys_are_not_found(api) -> None:
    model = (await api.create_model()).name
    version = (await api.ready_version(model)).version
    await api.fails(api.download(sha256="0" * 64), NOT_FOUND)
    await api.fails(api.download(model=model, version=version, kind=common.ONNX, precision=common.PRECISION_FP32,
                                 target="cpu"), NOT_FOUND)
    await api.fails(api.download(model=model, version=99, kind=common.SAMPLE,
                                 precision=common.PRECISION_FP32), NOT_FOUND)
    missing = api.name("missing")
    await api.fails(api.download(model=missing, version=1, kind=common.SAMPLE,
                                 precision=common.PRECISION_FP32), NOT_FOUND, missing)


def _candidates(sha256: str) -> list[pb.Candidate]:
    return [pb.Candidate(format=common.ONNX_FP32, artifact_sha256=sha256, accepted=True, reason="fastest passing",
                         gate=common.GateResult(passed=True, top1_agreement=1.0, metric_name="accuracy")),
            pb.Candidate(format=common.ONNX_INT8, accepted=False, reason="gate failed",
                         gate=common.GateResult(passed=False, top1_agreement=0.8))]


def _choice(model: str, version: int, target: str, sha256: str,
            reason: str = "lowest p50") -> pb.SetServingChoiceRequest:
    return pb.SetServingChoiceRequest(model=model, version=version, target=target, artifact_sha256=sha256,
                                      candidates=_candidates(sha256), reason=reason)


async def test_a_serving_choice_is_written_once(api) -> None:
    model = (await api.create_model()).name
    ready = await api.ready_version(model, onnx_target="cpu")
    onnx = next(a for a in ready.artifacts if a.kind == common.ONNX)
    choice = await api.stub.SetServingChoice(_choice(model, ready.version, "cpu", onnx.sha256))
    assert (choice.model, choice.version, choice.target, choice.reason) == (model, ready.version, "cpu", "lowest p50")
    assert choice.artifact == onnx and list(choice.candidates) == _candidates(onnx.sha256)
    assert choice.created_at.seconds > 0
    assert await api.stub.SetServingChoice(_choice(model, ready.version, "cpu", onnx.sha256)) == choice
    await api.fails(api.stub.SetServingChoice(_choice(model, ready.version, "cpu", onnx.sha256, "other")), EXISTS)
    int8 = await api.upload(model, ready.version, os.urandom(900), common.ONNX, target="cpu",
                            precision=common.PRECISION_INT8, format=common.ONNX_INT8)
    await api.fails(api.stub.SetServingChoice(_choice(model, ready.version, "cpu", int8.sha256)), EXISTS)
    get = pb.GetServingChoiceRequest(model=model, version=ready.version, target="cpu")
    assert await api.stub.GetServingChoice(get) == choice
    assert list((await api.get_version(model, ready.version)).serving_choices) == [choice]


async def test_concurrent_identical_serving_choices_all_return_the_record(api, events) -> None:
    model = (await api.create_model()).name
    ready = await api.ready_version(model, onnx_target="cpu")
    onnx = next(a for a in ready.artifacts if a.kind == common.ONNX)
    choices = await asyncio.gather(*(api.stub.SetServingChoice(_choice(model, ready.version, "cpu", onnx.sha256))
                                     for _ in range(6)))
    assert all(c == choices[0] for c in choices)
    await events.exactly(f"model.converted.{model}.cpu", 1)


async def test_serving_choices_need_a_ready_version_and_an_artifact_of_it(api) -> None:
    model = (await api.create_model()).name
    first = await api.ready_version(model, onnx_target="cpu")
    first_onnx = next(a for a in first.artifacts if a.kind == common.ONNX)
    second = await api.ready_version(model)
    pending = (await api.create_version(model)).version
    checkpoint = await api.upload(model, pending, os.urandom(700), common.CHECKPOINT)
    await api.fails(api.stub.SetServingChoice(_choice(model, pending, "cpu", checkpoint.sha256)), PRECONDITION)
    for sha256 in ("f" * 64, first_onnx.sha256):   # unknown, and an artifact of another version
        try:
            await api.stub.SetServingChoice(_choice(model, second.version, "cpu", sha256))
        except grpc.aio.AioRpcError as exc:
            assert exc.code() in (NOT_FOUND, PRECONDITION, INVALID), exc
        else:
            raise AssertionError(f"a serving choice of {sha256}, not an artifact of version {second.version}, "
                                 "was accepted")
    await api.fails(api.stub.SetServingChoice(_choice(model, first.version, "Bad Target", first_onnx.sha256)),
                    INVALID, "target")
    await api.fails(api.stub.SetServingChoice(_choice(model, 99, "cpu", first_onnx.sha256)), NOT_FOUND, "99")
    for version in (first.version, second.version, pending):
        await api.fails(api.stub.GetServingChoice(pb.GetServingChoiceRequest(model=model, version=version,
                                                                             target="cpu")), NOT_FOUND)
        assert not (await api.get_version(model, version)).serving_choices
