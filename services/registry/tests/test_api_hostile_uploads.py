"""Hostile and broken uploads through the Registry API (issue 12), on both backends.

- Dataset content that is no plain, intact .npz (not a zip, truncated, corrupt, encrypted, a zip
  bomb, declared sizes that lie, pickled objects, foreign members) is INVALID_ARGUMENT naming what
  is wrong, and stores nothing: no dataset version, no blob, no spool file, no data.updated.
- A stream that sends more than the upload limit is cut off mid-stream and its spool file removed.
- A client that stops sending is cut off with DEADLINE_EXCEEDED after the idle limit.
- Without room in the spool an upload is RESOURCE_EXHAUSTED before anything is written.
- A blob whose row was never written (the process killed in between; or planted) is swept once
  older than the grace period; referenced blobs never are.
"""

from __future__ import annotations

import asyncio
import io
import struct
import zipfile

import grpc
import numpy as np
import pytest

from splitstack.common.v1 import common_pb2 as common
from splitstack.registry.v1 import registry_pb2 as pb

INVALID = grpc.StatusCode.INVALID_ARGUMENT
MIB = 1024 * 1024
SHARED_MAX_UPLOAD_BYTES = 12 * MIB            # what conftest gives the shared registry
SHARED_MAX_DATASET_ARRAY_BYTES = 64 * MIB
BEFORE_RECORD = "registry.upload.before_record"
SWEEP_QUICKLY = {"SPLITSTACK_REGISTRY_ORPHAN_GRACE_SECONDS": "3", "SPLITSTACK_REGISTRY_ORPHAN_SWEEP_SECONDS": "0.5"}
WAIT_SECONDS = 60.0


def _zip(members: dict[str, bytes], method: int = zipfile.ZIP_STORED) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", method) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=True)
    return buffer.getvalue()


def _flag_encrypted(data: bytes) -> bytes:
    """Set the 'encrypted' bit (bit 0 of the general purpose flags) in every local and central header."""
    patched = bytearray(data)
    for signature, offset in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
        start = 0
        while (found := patched.find(signature, start)) != -1:
            flags = struct.unpack_from("<H", patched, found + offset)[0]
            struct.pack_into("<H", patched, found + offset, flags | 0x1)
            start = found + 4
    return bytes(patched)


def _declare_size(data: bytes, size: int) -> bytes:
    """Rewrite every member's declared uncompressed size (local and central headers)."""
    patched = bytearray(data)
    for signature, offset in ((b"PK\x03\x04", 22), (b"PK\x01\x02", 24)):
        start = 0
        while (found := patched.find(signature, start)) != -1:
            struct.pack_into("<I", patched, found + offset, size)
            start = found + 4
    return bytes(patched)


def _hostile_datasets(api) -> list[tuple[str, bytes, tuple[str, ...]]]:
    """(what, content, words the refusal must contain)."""
    good = api.npz(inputs=np.arange(4000, dtype=np.float32).reshape(1000, 4), labels=np.arange(1000))
    corrupt = bytearray(good)
    corrupt[len(good) // 3] ^= 0xFF                                       # inside the first array's data
    lying_header = np.lib.format.header_data_from_array_1_0(np.zeros((10 ** 9,), np.float32))
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, lying_header)
    bomb = api.npz_compressed(x=np.zeros(SHARED_MAX_DATASET_ARRAY_BYTES + MIB, np.uint8))
    return [
        ("not a zip", b"just some text, no archive " * 40, ("not an .npz",)),
        ("truncated", good[: len(good) // 2], ("not an .npz",)),
        ("corrupt", bytes(corrupt), ("not an .npz", "crc")),
        ("encrypted", _flag_encrypted(good), ("encrypted", "inputs.npy")),
        ("zip bomb", bomb, ("declares", "bytes of arrays", "MAX_DATASET_ARRAY_BYTES")),
        ("lying declared size", _declare_size(good, 0xFFFFFFF0), ("declares", "MAX_DATASET_ARRAY_BYTES")),
        ("header larger than data", _zip({"x.npy": header.getvalue() + b"\0" * 64}), ("shape", "holds")),
        ("pickled objects", _zip({"x.npy": _npy(np.array([{"run": "os.system"}], dtype=object))}),
         ("python objects", "pickle")),
        ("foreign member", _zip({"x.npy": _npy(np.zeros(3)), "evil.py": b"import os"}), ("evil.py", "not an .npy")),
        ("bzip2 member", _zip({"x.npy": _npy(np.zeros(3))}, zipfile.ZIP_BZIP2), ("compression",)),
        ("empty archive", _zip({}), ("without .npy",)),
    ]


async def test_corrupt_encrypted_and_bomb_datasets_are_invalid_and_store_nothing(api, events) -> None:
    dataset = (await api.create_dataset()).name
    before = api.state.stored_files()
    for what, content, words in _hostile_datasets(api):
        refused = await api.fails(api.upload_dataset(dataset, content, chunk=256 * 1024), INVALID, *words)
        assert len(refused.details()) < 1000, f"{what}: an unbounded error message: {refused.details()[:200]}..."
        assert api.state.stored_files() == before, f"{what}: the refused upload left a blob or a spool file"
    assert await api.all_dataset_versions(dataset) == []
    assert api.state.outbox_subjects(f"data.updated.{dataset}") == []
    good = api.npz(inputs=np.zeros((7, 2), np.float32))
    assert (await api.upload_dataset(dataset, good)).row_count == 7, "the registry must carry on"
    assert len(await events.exactly(f"data.updated.{dataset}", 1)) == 1


async def test_a_compressed_npz_within_the_bounds_is_accepted(api) -> None:
    dataset = (await api.create_dataset()).name
    content = api.npz_compressed(inputs=np.zeros((5000, 64), np.float32), labels=np.ones(5000, np.int64))
    stored = await api.upload_dataset(dataset, content)
    assert (stored.row_count, stored.size_bytes) == (5000, len(content))


async def test_a_stream_past_the_upload_limit_is_cut_off_mid_stream_and_its_spool_removed(api) -> None:
    model = (await api.create_model()).name
    version = (await api.create_version(model)).version
    data = b"\x01" * (SHARED_MAX_UPLOAD_BYTES + 2 * MIB)
    before = api.state.stored_files()
    header = pb.ArtifactHeader(model=model, version=version, kind=common.CHECKPOINT,
                               sha256=api.sha256(data), size_bytes=SHARED_MAX_UPLOAD_BYTES)
    refused = await api.refused_upload(header, data, invalid_after=SHARED_MAX_UPLOAD_BYTES)
    assert refused.code() == INVALID and "size_bytes" in refused.details(), refused
    assert api.state.stored_files() == before, "the cut-off upload left its spool file"
    assert await api.artifacts(model, version) == []


# ---- limits that need a registry of their own ------------------------------------------------------

async def _wait_until(condition, what: str, timeout: float = WAIT_SECONDS) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not await asyncio.to_thread(condition):
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting until {what}")
        await asyncio.sleep(0.1)


async def test_an_idle_upload_is_cut_off_and_its_spool_removed(registry) -> None:
    process = await registry.start("idle", {"SPLITSTACK_REGISTRY_UPLOAD_IDLE_SECONDS": "1"})
    async with registry.connect(process) as api:
        model = (await api.create_model()).name
        version = (await api.create_version(model)).version
        dataset = (await api.create_dataset()).name
        before = registry.state.stored_files()
        data = b"\x02" * (3 * MIB)
        artifact = pb.ArtifactHeader(model=model, version=version, kind=common.CHECKPOINT,
                                     sha256=api.sha256(data), size_bytes=len(data))
        stalled = asyncio.Event()

        async def stalls_after_a_chunk():
            yield pb.UploadArtifactRequest(header=artifact)
            yield pb.UploadArtifactRequest(chunk=data[:MIB])
            stalled.set()
            await asyncio.Event().wait()              # never sends again, never closes

        async def never_sends_a_header():
            await asyncio.Event().wait()
            yield pb.UploadDatasetVersionRequest()    # pragma: no cover

        started = asyncio.get_running_loop().time()
        cut = await api.fails(api.stub.UploadArtifact(stalls_after_a_chunk(), timeout=120),
                              grpc.StatusCode.DEADLINE_EXCEEDED, "sent nothing", "UPLOAD_IDLE_SECONDS")
        assert stalled.is_set() and asyncio.get_running_loop().time() - started < 60, cut
        await api.fails(api.stub.UploadDatasetVersion(never_sends_a_header(), timeout=120),
                        grpc.StatusCode.DEADLINE_EXCEEDED, "sent nothing")
        await _wait_until(lambda: registry.state.stored_files() == before, "the idle upload's spool is removed")
        assert await api.artifacts(model, version) == []
        assert await api.all_dataset_versions(dataset) == []
        stored = await api.upload(model, version, data, common.CHECKPOINT)    # an active client is unaffected
        assert stored.size_bytes == len(data)


async def test_uploads_without_room_in_the_spool_are_refused_before_writing(registry) -> None:
    process = await registry.start("full-spool", {"SPLITSTACK_REGISTRY_SPOOL_MIN_FREE_BYTES": str(2 ** 60)})
    async with registry.connect(process) as api:
        model = (await api.create_model()).name
        version = (await api.create_version(model)).version
        dataset = (await api.create_dataset()).name
        before = registry.state.stored_files()
        await api.fails(api.upload(model, version, b"\x03" * MIB, common.CHECKPOINT),
                        grpc.StatusCode.RESOURCE_EXHAUSTED, "spool", "SPOOL_MIN_FREE_BYTES")
        await api.fails(api.upload_dataset(dataset, api.sample_npz(5)),
                        grpc.StatusCode.RESOURCE_EXHAUSTED, "spool")
        assert registry.state.stored_files() == before
        assert await api.artifacts(model, version) == []
        assert await api.all_dataset_versions(dataset) == []


async def test_orphaned_blobs_are_swept_and_referenced_blobs_never(registry) -> None:
    setup = await registry.start("setup")
    async with registry.connect(setup) as api:
        model = (await api.create_model()).name
        version = (await api.create_version(model)).version
        referenced = await api.upload(model, version, b"\x04" * (2 * MIB), common.CHECKPOINT)
        dataset = (await api.create_dataset()).name
        table = await api.upload_dataset(dataset, api.sample_npz(9))
    await asyncio.to_thread(setup.stop)

    crashing = await registry.start("crash-before-record", crash_points=[BEFORE_RECORD])
    orphan = b"\x05" * MIB
    async with registry.connect(crashing) as api:
        with pytest.raises(grpc.aio.AioRpcError):
            await api.upload(model, version, orphan, common.EXPORTED_PROGRAM)
    assert await asyncio.to_thread(crashing.wait_exit) == -9 and crashing.crashed_at(BEFORE_RECORD)
    orphan_sha = api.sha256(orphan)
    assert registry.state.blobs_named(orphan_sha), "the killed upload should have left its blob behind"
    planted = registry.state.plant_blob(b"planted behind the registry's back")
    if registry.state.s3 is not None:             # a multipart upload a killed process abandoned
        registry.state.s3.create_multipart_upload(Bucket=registry.state.bucket, Key=f"blobs/sha256/{'e' * 64}")

    sweeping = await registry.start("sweeping", SWEEP_QUICKLY)
    await _wait_until(lambda: not registry.state.blobs_named(orphan_sha) and not registry.state.blobs_named(planted)
                      and not any(k.startswith("multipart:") for k in registry.state.stored_files()),
                      "the orphans are swept")
    async with registry.connect(sweeping) as api:
        for digest in (referenced.sha256, table.sha256):
            assert registry.state.blobs_named(digest), f"a referenced blob {digest} was swept"
        _, content = await api.download(sha256=referenced.sha256)
        assert content == b"\x04" * (2 * MIB)
        assert [a.kind for a in await api.artifacts(model, version)] == [common.CHECKPOINT]
        again = await api.upload(model, version, orphan, common.EXPORTED_PROGRAM)    # the retry stores it anew
        later = registry.state.plant_blob(b"a later orphan")
        await _wait_until(lambda: not registry.state.blobs_named(later), "a later orphan is swept")
        for digest in (referenced.sha256, table.sha256, again.sha256):   # older than the grace period: examined
            assert registry.state.blobs_named(digest), f"a referenced blob {digest} was swept"
        _, content = await api.download(sha256=again.sha256)
        assert content == orphan
    assert "removed unreferenced blob" in sweeping.log()
