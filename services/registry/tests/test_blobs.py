"""The content-addressed blob store on a local directory and on a real S3 server (SeaweedFS).

Every test runs on both backends: a round trip of a multi-MB blob (multipart on S3), rejected
uploads (digest, size, limit, malformed digest) that leave nothing behind, 8 concurrent uploads
of one content stored once, uploads interrupted by an error, a cancellation and a real SIGKILL,
and a second store over the same spool directory that must not sweep a live upload.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import boto3
import pytest

from splitstack.chassis.errors import InvalidArgument, NotFound, ResourceExhausted
from splitstack.chassis.faults import crash_env, crash_point_hit
from splitstack_registry import blobs
from splitstack_registry.blobs import BlobInfo, LocalBlobStore, S3BlobStore, open_blob_store

MiB = 1024 * 1024
REGISTRY_SRC = Path(blobs.__file__).resolve().parents[1]


@dataclass(frozen=True)
class BlobSettings:
    """The RegistrySettings fields the blob store reads."""

    artifact_dir: str
    spool_dir: str
    spool_min_free_bytes: int = 0
    s3_bucket: str = ""
    s3_endpoint_url: str = ""
    s3_region: str = "us-east-1"
    s3_prefix: str = "blobs"
    s3_access_key_id: str = ""
    s3_secret_access_key: str = ""


class Backend:
    """One store location (a local dir or a fresh bucket) and a view of what it really holds."""

    def __init__(self, settings: BlobSettings) -> None:
        self.settings = settings
        self.s3 = blobs.s3_client(settings) if settings.s3_bucket else None
        self.stores: list[LocalBlobStore | S3BlobStore] = []

    def open_store(self) -> LocalBlobStore | S3BlobStore:
        store = open_blob_store(self.settings)
        self.stores.append(store)
        return store

    def stored(self) -> list[str]:
        """Every stored object or file, whatever its name."""
        if self.s3 is not None:
            listing = self.s3.list_objects_v2(Bucket=self.settings.s3_bucket)
            return [o["Key"] for o in listing.get("Contents", [])]
        root = Path(self.settings.artifact_dir)
        return [str(p) for p in root.rglob("*") if p.is_file() and Path(self.settings.spool_dir) not in p.parents]

    def spool_files(self) -> list[Path]:
        return list(Path(self.settings.spool_dir).rglob("*.part"))

    def close(self) -> None:
        for store in self.stores:
            store.close()


@pytest.fixture(params=["local", "s3"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    settings = BlobSettings(artifact_dir=str(tmp_path / "artifacts"), spool_dir=str(tmp_path / "spool"))
    if request.param == "s3":
        server = request.getfixturevalue("s3_server")
        settings = BlobSettings(artifact_dir="", spool_dir=settings.spool_dir,
                                s3_bucket=f"blobs-{uuid.uuid4().hex[:12]}", s3_endpoint_url=server.endpoint,
                                s3_access_key_id=server.extra["access_key"],
                                s3_secret_access_key=server.extra["secret_key"])
        blobs.s3_client(settings).create_bucket(Bucket=settings.s3_bucket)
    backend = Backend(settings)
    yield backend
    backend.close()


class ChunkSource:
    """An async chunk iterator that counts what was taken from it."""

    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = chunks
        self.taken = 0

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for chunk in self.chunks:
            self.taken += 1
            yield chunk


def split(data: bytes, size: int) -> list[bytes]:
    return [data[i:i + size] for i in range(0, len(data), size)]


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


async def read_all(store: LocalBlobStore | S3BlobStore, sha256: str, chunk_bytes: int) -> list[bytes]:
    return [chunk async for chunk in await store.open(sha256, chunk_bytes)]


async def assert_nothing_visible(backend: Backend, store: LocalBlobStore | S3BlobStore, sha256: str) -> None:
    assert not await store.exists(sha256)
    assert backend.stored() == []
    assert backend.spool_files() == []


async def test_multi_mb_round_trip_streams_back_the_same_bytes(backend: Backend) -> None:
    store = backend.open_store()
    data = os.urandom(12 * MiB + 12345)
    source = ChunkSource(split(data, 700_000))

    info = await store.put_verified(source.__aiter__(), sha256=digest(data), size=len(data), max_bytes=64 * MiB)

    assert info == BlobInfo(digest(data), len(data))
    assert await store.exists(info.sha256) and await store.size(info.sha256) == len(data)
    chunks = await read_all(store, info.sha256, MiB)
    assert len(chunks) == 13 and max(len(c) for c in chunks) == MiB
    assert digest(b"".join(chunks)) == info.sha256
    assert len(backend.stored()) == 1 and backend.spool_files() == []
    if backend.s3 is not None:
        head = backend.s3.head_object(Bucket=backend.settings.s3_bucket, Key=store.key_for(info.sha256))
        assert "-" in head["ETag"], "a 12 MB blob should have gone up as a multipart upload"
    else:
        assert backend.stored() == [str(store.path_for(info.sha256))]


async def test_empty_blob_round_trip(backend: Backend) -> None:
    store = backend.open_store()
    info = await store.put_verified(ChunkSource([]).__aiter__(), sha256=digest(b""), size=0, max_bytes=1)
    assert await store.exists(info.sha256) and await store.size(info.sha256) == 0
    assert await read_all(store, info.sha256, 10) == []


async def test_digest_mismatch_is_rejected_and_leaves_nothing(backend: Backend) -> None:
    store = backend.open_store()
    data, claimed = os.urandom(3 * MiB), digest(b"something else")

    with pytest.raises(InvalidArgument, match=rf"sha256: declared {claimed}, content hashes to {digest(data)}"):
        await store.put_verified(ChunkSource(split(data, MiB)).__aiter__(), sha256=claimed, size=len(data),
                                 max_bytes=8 * MiB)

    await assert_nothing_visible(backend, store, claimed)
    assert not await store.exists(digest(data))


@pytest.mark.parametrize("extra", [-1, +1], ids=["fewer-bytes", "more-bytes"])
async def test_size_mismatch_is_rejected_and_leaves_nothing(backend: Backend, extra: int) -> None:
    store = backend.open_store()
    data = os.urandom(2 * MiB)
    declared = len(data) + (-1000 if extra < 0 else 0)
    sent = data if extra < 0 else data + os.urandom(20 * MiB)
    source = ChunkSource(split(sent, 256 * 1024))

    with pytest.raises(InvalidArgument, match=rf"size_bytes: declared {declared} bytes, received"):
        await store.put_verified(source.__aiter__(), sha256=digest(data), size=declared, max_bytes=64 * MiB)

    if extra > 0:
        assert source.taken == 9, "reading must stop at the chunk that passes the declared size"
    await assert_nothing_visible(backend, store, digest(data))


async def test_upload_over_the_limit_is_rejected_before_reading(backend: Backend) -> None:
    store = backend.open_store()
    data = os.urandom(4 * MiB)
    source = ChunkSource(split(data, 64 * 1024))

    with pytest.raises(InvalidArgument, match=r"max_upload_bytes: declared size_bytes 4194304 exceeds the "
                                              r"limit of 1048576 bytes"):
        await store.put_verified(source.__aiter__(), sha256=digest(data), size=len(data), max_bytes=MiB)

    assert source.taken == 0
    await assert_nothing_visible(backend, store, digest(data))


@pytest.mark.parametrize("bad", ["A" * 64, "a" * 63, "g" * 64, "", "sha256:" + "a" * 64])
async def test_malformed_sha256_is_rejected_naming_the_field(backend: Backend, bad: str) -> None:
    store = backend.open_store()
    source = ChunkSource([b"x"])
    with pytest.raises(InvalidArgument, match=r"^sha256: expected 64 lowercase hex characters, got"):
        await store.put_verified(source.__aiter__(), sha256=bad, size=1, max_bytes=10)
    for call in (store.exists(bad), store.size(bad), store.open(bad, 10)):
        with pytest.raises(InvalidArgument, match=r"^sha256:"):
            await call
    assert source.taken == 0 and backend.stored() == []


async def test_eight_concurrent_puts_of_one_content_store_it_once(backend: Backend) -> None:
    store = backend.open_store()
    uploads = _count_uploads(backend, store)
    data = os.urandom(MiB + 7)
    sha = digest(data)

    infos = await asyncio.gather(*(
        store.put_verified(ChunkSource(split(data, 128 * 1024)).__aiter__(), sha256=sha, size=len(data),
                           max_bytes=2 * MiB)
        for _ in range(8)))

    assert infos == [BlobInfo(sha, len(data))] * 8
    assert len(backend.stored()) == 1 and backend.spool_files() == []
    first_write = _fingerprint(backend, store, sha)
    assert await store.put_verified(ChunkSource([data]).__aiter__(), sha256=sha, size=len(data),
                                    max_bytes=2 * MiB) == infos[0]
    assert _fingerprint(backend, store, sha) == first_write, "a second put of stored content must not write"
    if uploads is not None:
        assert uploads == ["PutObject"], "8 concurrent puts and one later put should upload once"
    assert digest(b"".join(await read_all(store, sha, MiB))) == sha


def _count_uploads(backend: Backend, store: LocalBlobStore | S3BlobStore) -> list[str] | None:
    """On S3, record every object-writing call the store's real client makes."""
    if not isinstance(store, S3BlobStore):
        return None
    calls: list[str] = []
    for op in ("PutObject", "CreateMultipartUpload"):
        store.client.meta.events.register(f"before-call.s3.{op}", lambda op=op, **_: calls.append(op))
    return calls


def _fingerprint(backend: Backend, store: LocalBlobStore | S3BlobStore, sha: str) -> tuple[object, ...]:
    if isinstance(store, S3BlobStore):
        head = backend.s3.head_object(Bucket=backend.settings.s3_bucket, Key=store.key_for(sha))
        return head["ETag"], head["LastModified"]
    stat = store.path_for(sha).stat()
    return stat.st_ino, stat.st_mtime_ns, stat.st_mode & 0o777


async def test_stream_that_fails_midway_leaves_nothing(backend: Backend) -> None:
    store = backend.open_store()
    data = os.urandom(MiB)

    async def failing() -> AsyncIterator[bytes]:
        yield data[:300_000]
        yield data[300_000:600_000]
        raise ConnectionResetError("client went away")

    with pytest.raises(ConnectionResetError):
        await store.put_verified(failing(), sha256=digest(data), size=len(data), max_bytes=MiB)
    await assert_nothing_visible(backend, store, digest(data))


async def test_cancelled_upload_leaves_nothing(backend: Backend) -> None:
    store = backend.open_store()
    data = os.urandom(MiB)
    first_chunk_sent, never = asyncio.Event(), asyncio.Event()

    async def stalled() -> AsyncIterator[bytes]:
        yield data[:400_000]
        first_chunk_sent.set()
        await never.wait()
        yield data[400_000:]

    upload = asyncio.create_task(store.put_verified(stalled(), sha256=digest(data), size=len(data), max_bytes=MiB))
    await asyncio.wait_for(first_chunk_sent.wait(), 10)
    assert len(backend.spool_files()) == 1, "the first chunk should be spooled by now"
    upload.cancel()
    with pytest.raises(asyncio.CancelledError):
        await upload
    await assert_nothing_visible(backend, store, digest(data))


async def test_open_and_size_of_an_absent_blob_are_not_found(backend: Backend) -> None:
    store = backend.open_store()
    absent = digest(b"never stored")
    assert not await store.exists(absent)
    with pytest.raises(NotFound, match=rf"blob sha256:{absent} not found"):
        await store.open(absent, MiB)
    with pytest.raises(NotFound, match=rf"blob sha256:{absent} not found"):
        await store.size(absent)


async def test_opening_a_second_store_keeps_a_live_upload(backend: Backend) -> None:
    store = backend.open_store()
    data = os.urandom(MiB)
    first_chunk_sent, go_on = asyncio.Event(), asyncio.Event()

    async def paused() -> AsyncIterator[bytes]:
        yield data[:500_000]
        first_chunk_sent.set()
        await go_on.wait()
        yield data[500_000:]

    upload = asyncio.create_task(store.put_verified(paused(), sha256=digest(data), size=len(data), max_bytes=MiB))
    await asyncio.wait_for(first_chunk_sent.wait(), 10)
    replica = backend.open_store()  # sweeps stale spools at open: must leave the live one alone
    assert len(backend.spool_files()) == 1
    go_on.set()
    assert await asyncio.wait_for(upload, 30) == BlobInfo(digest(data), len(data))
    assert await replica.exists(digest(data))


CRASHING_UPLOAD = """
import asyncio, json, sys
from types import SimpleNamespace
from splitstack_registry.blobs import open_blob_store

settings, sha256 = SimpleNamespace(**json.loads(sys.argv[1])), sys.argv[2]

async def chunks():
    for _ in range(4):
        yield b"z" * 262144

async def main():
    store = open_blob_store(settings)
    await store.put_verified(chunks(), sha256=sha256, size=4 * 262144, max_bytes=4 * 262144)
    print("upload finished")

asyncio.run(main())
"""


async def test_kill_9_mid_upload_leaves_nothing_and_the_next_store_sweeps_the_spool(
        backend: Backend, tmp_path: Path) -> None:
    markers = tmp_path / "markers"
    markers.mkdir()
    sha = digest(b"z" * 4 * 262144)
    env = {**os.environ, **crash_env([blobs.UPLOAD_CRASH_POINT], markers),
           "PYTHONPATH": os.pathsep.join([str(REGISTRY_SRC), os.environ.get("PYTHONPATH", "")])}

    child = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-c", CRASHING_UPLOAD, json.dumps(asdict(backend.settings)), sha],
        env=env, capture_output=True, text=True, timeout=60)

    assert child.returncode == -9, child.stderr
    assert crash_point_hit(markers, blobs.UPLOAD_CRASH_POINT)
    assert "upload finished" not in child.stdout
    assert len(backend.spool_files()) == 1, "the killed upload should have left its spool file"
    store = backend.open_store()
    await assert_nothing_visible(backend, store, sha)
    assert list(Path(backend.settings.spool_dir).glob("*.lock")) == [store.spool.path.with_suffix(".lock")]


async def test_an_upload_stops_when_the_spool_filesystem_fills_up_meanwhile(backend: Backend, tmp_path: Path) -> None:
    store = backend.open_store()
    store.spool.min_free_bytes = store.spool.free_bytes() - 64 * MiB       # room for this upload, not much more
    data = os.urandom(2 * MiB)
    filler = tmp_path / "filler"                                            # same filesystem as the spool

    async def disk_fills_after_the_first_chunk() -> AsyncIterator[bytes]:
        yield data[:MiB]
        with open(filler, "wb") as f:
            os.posix_fallocate(f.fileno(), 0, 256 * MiB)                    # someone else takes the space
        yield data[MiB:]

    try:
        with pytest.raises(ResourceExhausted, match="must stay free.*the upload was stopped"):
            await store.put_verified(disk_fills_after_the_first_chunk(), sha256=digest(data), size=len(data),
                                     max_bytes=4 * MiB)
    finally:
        filler.unlink(missing_ok=True)
    await assert_nothing_visible(backend, store, digest(data))
    store.spool.min_free_bytes = 0
    assert await store.put_verified(ChunkSource([data]).__aiter__(), sha256=digest(data), size=len(data),
                                    max_bytes=4 * MiB) == BlobInfo(digest(data), len(data))


async def test_uploads_in_flight_reserve_their_declared_size(backend: Backend) -> None:
    store = backend.open_store()
    store.spool.min_free_bytes = store.spool.free_bytes() - 48 * MiB       # room for 48 MiB of uploads in all
    first = os.urandom(MiB)
    go_on = asyncio.Event()

    async def paused() -> AsyncIterator[bytes]:
        yield first[:1000]
        await go_on.wait()
        yield first[1000:]

    declared = 32 * MiB                          # declares 32 MiB, sends 1 MiB (refused later as too short)
    upload = asyncio.create_task(store.put_verified(paused(), sha256=digest(first), size=declared,
                                                    max_bytes=64 * MiB))
    while backend.spool_files() == []:
        await asyncio.sleep(0.01)
    second = os.urandom(MiB)
    with pytest.raises(ResourceExhausted, match="promised to uploads in flight"):
        await store.put_verified(ChunkSource([second]).__aiter__(), sha256=digest(second), size=24 * MiB,
                                 max_bytes=64 * MiB)
    go_on.set()
    with pytest.raises(InvalidArgument, match="size_bytes"):
        await upload
    assert await store.put_verified(ChunkSource([second]).__aiter__(), sha256=digest(second), size=len(second),
                                    max_bytes=64 * MiB) == BlobInfo(digest(second), len(second))
