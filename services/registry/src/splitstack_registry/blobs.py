"""Content-addressed blob store: artifacts and dataset files, named by the SHA-256 of their bytes.

An upload is spooled to a private temp file while it is hashed and counted. It stops as soon as
more bytes arrive than declared; its digest and size are checked when the stream ends, and only a
verified file is made visible, in one atomic step:

- `LocalBlobStore`: the fsync'd spool file is hard-linked to `<artifact_dir>/sha256/ab/<digest>`
  (link never overwrites: the first writer wins, identical content is stored once).
- `S3BlobStore`: the verified spool file is uploaded to `<prefix>/sha256/<digest>` unless that key
  exists; a PUT and a CompleteMultipartUpload are atomic, so a reader never sees part of an object.
  Within a process concurrent uploads of one digest upload once; two replicas racing may both PUT
  the same bytes to the same key, which leaves one, correct object.

A crash mid-upload leaves only a spool file, which the next store opening the spool removes
(spool.py: private flock'd spool directories, room reserved and checked before and while writing).
A crash or a failed transaction after publishing leaves a blob that nothing references; the orphan
sweeper (sweeper.py) lists old blobs (`stored_before`), and deletes those no row references
(`delete_sync`), together with S3 multipart uploads a killed process abandoned.
Reading streams chunks; nothing holds a whole blob in memory. Blocking file and boto3 calls run
in `asyncio.to_thread` (the `*_sync` methods are for callers already in a worker thread).
"""

from __future__ import annotations

import abc
import asyncio
import errno
import hashlib
import logging
import os
import re
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Protocol

from splitstack.chassis.errors import InvalidArgument, NotFound
from splitstack.chassis.faults import crash_point
from splitstack_registry.spool import SpoolDir, SpoolReservation

log = logging.getLogger(__name__)

SHA256_PATTERN = re.compile(r"[0-9a-f]{64}")
UPLOAD_CRASH_POINT = "registry.upload.mid_stream"
MULTIPART_BYTES = 8 * 1024 * 1024
S3_DEFAULT_SPOOL = Path(tempfile.gettempdir()) / "splitstack-registry-spool"
_NO_HARD_LINKS = {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK}
_S3_MISSING = {"404", "NoSuchKey", "NotFound"}


@dataclass(frozen=True)
class BlobInfo:
    """A stored blob: its lowercase hex SHA-256 and its size in bytes."""

    sha256: str
    size: int


class BlobStore(Protocol):
    """Where verified, immutable blobs live, addressed by their SHA-256."""

    async def put_verified(self, chunks: AsyncIterator[bytes], *, sha256: str, size: int,
                           max_bytes: int, inspect: Callable[[Path], None] | None = None) -> BlobInfo: ...

    def exists_sync(self, sha256: str) -> bool: ...

    def stored_before(self, cutoff: float) -> Iterator[list[str]]: ...

    def delete_sync(self, sha256: str) -> None: ...

    def abandoned_parts_before(self, cutoff: float) -> int: ...

    async def exists(self, sha256: str) -> bool: ...

    async def open(self, sha256: str, chunk_bytes: int) -> AsyncIterator[bytes]: ...

    async def size(self, sha256: str) -> int: ...


def check_sha256(value: object) -> str:
    """`value` if it is a SHA-256 in 64 lowercase hex characters, else InvalidArgument naming `sha256`."""
    if not isinstance(value, str) or not SHA256_PATTERN.fullmatch(value):
        raise InvalidArgument(f"sha256: expected 64 lowercase hex characters, got {value!r}")
    return value


def check_declared_size(size: object, max_bytes: int) -> int:
    """`size` if it is a byte count within `max_bytes`, else InvalidArgument naming the field."""
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise InvalidArgument(f"size_bytes: expected a byte count >= 0, got {size!r}")
    if size > max_bytes:
        raise InvalidArgument(f"max_upload_bytes: declared size_bytes {size} exceeds the limit of "
                              f"{max_bytes} bytes")
    return size


class IncomingBlob:
    """One upload being received: counted and hashed as it arrives, spooled unless already stored."""

    def __init__(self, expected: BlobInfo, spool: SpoolDir | None) -> None:
        self.expected = expected
        self.path: Path | None = None
        self._file: BinaryIO | None = None
        self._room: SpoolReservation | None = spool.reserve(expected.size) if spool else None
        self._hasher = hashlib.sha256()
        self.received = 0
        if spool is not None:
            try:
                self.path, self._file = spool.new_file(expected.sha256)
            except BaseException:
                self.discard()
                raise

    async def receive(self, chunks: AsyncIterator[bytes], *, durable: bool) -> None:
        """Consume `chunks`, stopping at the first byte past the declared size; then verify."""
        first = True
        async for chunk in chunks:
            self.received += len(chunk)
            if self.received > self.expected.size:
                raise InvalidArgument(f"size_bytes: declared {self.expected.size} bytes, received more "
                                      f"(at least {self.received})")
            await asyncio.to_thread(self._absorb, chunk)
            if first:
                crash_point(UPLOAD_CRASH_POINT)
                first = False
        self._verify()
        await asyncio.to_thread(self._seal, durable)

    def _absorb(self, chunk: bytes) -> None:
        self._hasher.update(chunk)
        if self._file is not None:
            self._file.write(chunk)
        if self._room is not None:
            self._room.written(len(chunk))   # and checks that the spool's filesystem still has room

    def _verify(self) -> None:
        if self.received != self.expected.size:
            raise InvalidArgument(f"size_bytes: declared {self.expected.size} bytes, received "
                                  f"{self.received}")
        got = self._hasher.hexdigest()
        if got != self.expected.sha256:
            raise InvalidArgument(f"sha256: declared {self.expected.sha256}, content hashes to {got}")

    def _seal(self, durable: bool) -> None:
        """Flush the spool file (and fsync it when `durable`) and make it read-only."""
        if self._file is None:
            return
        self._file.flush()
        os.fchmod(self._file.fileno(), 0o444)
        if durable:
            os.fsync(self._file.fileno())
        self._file.close()

    def discard(self) -> None:
        """Close and delete the spool file and give back its room, whatever happened."""
        if self._file is not None:
            self._file.close()
        if self.path is not None:
            self.path.unlink(missing_ok=True)
        if self._room is not None:
            self._room.release()


Inspection = Callable[[Path], None]


class _SpoolingBlobStore(abc.ABC):
    """The upload path both stores share; subclasses say how a verified file is published and swept."""

    durable_spool = False

    def __init__(self, spool: SpoolDir) -> None:
        self.spool = spool

    @abc.abstractmethod
    async def exists(self, sha256: str) -> bool:
        """True when the blob `sha256` is stored (and so complete and verified)."""

    @abc.abstractmethod
    def exists_sync(self, sha256: str) -> bool:
        """`exists`, blocking (for a database thread that checks a blob inside its transaction)."""

    @abc.abstractmethod
    def stored_before(self, cutoff: float) -> Iterator[list[str]]:
        """Digests of the blobs last written before `cutoff` (epoch seconds), in pages (blocking)."""

    @abc.abstractmethod
    def delete_sync(self, sha256: str) -> None:
        """Remove the blob `sha256` if it is there (blocking; only the orphan sweeper calls this)."""

    def abandoned_parts_before(self, cutoff: float) -> int:
        """Remove half-written publications begun before `cutoff`; how many (blocking)."""
        return 0

    @abc.abstractmethod
    async def _publish(self, spool_path: Path, sha256: str) -> None:
        """Make the verified file at `spool_path` visible as blob `sha256`, unless it is already."""

    async def put_verified(self, chunks: AsyncIterator[bytes], *, sha256: str, size: int,
                           max_bytes: int, inspect: Inspection | None = None) -> BlobInfo:
        """Receive, verify and store `chunks`; see the module docstring for the guarantees.

        `inspect(path)` (blocking, run in a thread) sees the verified content before it is published
        and refuses it by raising; with it the content is spooled even when the blob is stored already.
        """
        expected = BlobInfo(check_sha256(sha256), check_declared_size(size, max_bytes))
        already_stored = inspect is None and await self.exists(expected.sha256)
        incoming = IncomingBlob(expected, None if already_stored else self.spool)
        try:
            await incoming.receive(chunks, durable=self.durable_spool)
            if incoming.path is not None:
                if inspect is not None:
                    await asyncio.to_thread(inspect, incoming.path)
                await self._publish(incoming.path, expected.sha256)
        finally:
            incoming.discard()
        return expected

    def close(self) -> None:
        """Release this store's spool directory (in-flight uploads must have ended)."""
        self.spool.close()


class LocalBlobStore(_SpoolingBlobStore):
    """Blobs as read-only files under `<root>/sha256/ab/<digest>`."""

    durable_spool = True

    def __init__(self, root: Path, spool_root: Path | None = None, *, spool_min_free_bytes: int = 0) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        spool_root = Path(spool_root) if spool_root else self.root / ".spool"
        super().__init__(SpoolDir(spool_root, spool_min_free_bytes))
        if os.stat(spool_root).st_dev != os.stat(self.root).st_dev:
            self.spool.close()
            raise ValueError(f"spool_dir {spool_root} must be on the same filesystem as artifact_dir "
                             f"{self.root} (blobs are published by an atomic link)")

    def path_for(self, sha256: str) -> Path:
        """Where the blob `sha256` lives once stored."""
        return self.root / "sha256" / sha256[:2] / sha256

    async def exists(self, sha256: str) -> bool:
        return await asyncio.to_thread(self.exists_sync, sha256)

    def exists_sync(self, sha256: str) -> bool:
        return self.path_for(check_sha256(sha256)).is_file()

    def stored_before(self, cutoff: float) -> Iterator[list[str]]:
        """Digests of the files linked into place before `cutoff` (a link sets the file's ctime)."""
        for shard in sorted((self.root / "sha256").glob("??")):
            old = []
            for path in shard.iterdir():
                try:
                    if SHA256_PATTERN.fullmatch(path.name) and path.lstat().st_ctime < cutoff:
                        old.append(path.name)
                except FileNotFoundError:
                    continue
            if old:
                yield old

    def delete_sync(self, sha256: str) -> None:
        self.path_for(check_sha256(sha256)).unlink(missing_ok=True)

    async def size(self, sha256: str) -> int:
        path = self.path_for(check_sha256(sha256))
        try:
            return (await asyncio.to_thread(path.stat)).st_size
        except FileNotFoundError:
            raise NotFound(f"blob sha256:{sha256} not found") from None

    async def open(self, sha256: str, chunk_bytes: int) -> AsyncIterator[bytes]:
        """The blob's bytes in chunks of at most `chunk_bytes`; NotFound (now) if it is absent."""
        _check_chunk_bytes(chunk_bytes)
        if not await self.exists(sha256):
            raise NotFound(f"blob sha256:{sha256} not found")
        return _read_file(self.path_for(sha256), chunk_bytes)

    async def _publish(self, spool_path: Path, sha256: str) -> None:
        if await asyncio.to_thread(self._link_into_place, spool_path, self.path_for(sha256)):
            log.info("stored blob sha256:%s", sha256)

    @staticmethod
    def _link_into_place(spool_path: Path, final: Path) -> bool:
        """Make the verified file visible at `final` unless a blob is there already; True if it was new."""
        final.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(spool_path, final)
        except FileExistsError:
            return False
        except OSError as exc:
            if exc.errno not in _NO_HARD_LINKS:
                raise
            if final.exists():
                return False
            os.replace(spool_path, final)
        _fsync_dir(final.parent)
        _fsync_dir(final.parent.parent)
        return True


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _check_chunk_bytes(chunk_bytes: int) -> None:
    if chunk_bytes < 1:
        raise ValueError(f"chunk_bytes must be >= 1, got {chunk_bytes}")


async def _read_file(path: Path, chunk_bytes: int) -> AsyncIterator[bytes]:
    blob = await asyncio.to_thread(open, path, "rb")
    try:
        while chunk := await asyncio.to_thread(blob.read, chunk_bytes):
            yield chunk
    finally:
        blob.close()


class S3BlobStore(_SpoolingBlobStore):
    """Blobs as objects `<prefix>/sha256/<digest>` in an S3 bucket (boto3, run in threads)."""

    def __init__(self, client: Any, bucket: str, *, prefix: str = "blobs", spool_root: Path | None = None,
                 multipart_bytes: int = MULTIPART_BYTES, spool_min_free_bytes: int = 0) -> None:
        from boto3.s3.transfer import TransferConfig

        super().__init__(SpoolDir(Path(spool_root) if spool_root else S3_DEFAULT_SPOOL, spool_min_free_bytes))
        self.client = client
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self._transfer = TransferConfig(multipart_threshold=multipart_bytes, multipart_chunksize=multipart_bytes,
                                        max_concurrency=4)
        self._publish_locks = [asyncio.Lock() for _ in range(32)]

    def key_for(self, sha256: str) -> str:
        """The object key of the blob `sha256`."""
        return f"{self.prefix}/sha256/{sha256}" if self.prefix else f"sha256/{sha256}"

    async def exists(self, sha256: str) -> bool:
        return await self._head(check_sha256(sha256)) is not None

    def exists_sync(self, sha256: str) -> bool:
        return self._head_sync(check_sha256(sha256)) is not None

    @property
    def _blob_prefix(self) -> str:
        return self.key_for("")

    def stored_before(self, cutoff: float) -> Iterator[list[str]]:
        """Digests of the objects last modified before `cutoff`, a listing page at a time."""
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=self._blob_prefix)
        for page in pages:
            old = [name for o in page.get("Contents", [])
                   if SHA256_PATTERN.fullmatch(name := o["Key"][len(self._blob_prefix):])
                   and o["LastModified"].timestamp() < cutoff]
            if old:
                yield old

    def delete_sync(self, sha256: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self.key_for(check_sha256(sha256)))

    def abandoned_parts_before(self, cutoff: float) -> int:
        """Abort the multipart uploads of blobs begun before `cutoff` (left by a killed process)."""
        listing = self.client.list_multipart_uploads(Bucket=self.bucket, Prefix=self._blob_prefix)
        stale = [u for u in listing.get("Uploads", []) if u["Initiated"].timestamp() < cutoff]
        for upload in stale:
            self.client.abort_multipart_upload(Bucket=self.bucket, Key=upload["Key"], UploadId=upload["UploadId"])
        return len(stale)

    async def size(self, sha256: str) -> int:
        head = await self._head(check_sha256(sha256))
        if head is None:
            raise NotFound(f"blob sha256:{sha256} not found")
        return int(head["ContentLength"])

    async def open(self, sha256: str, chunk_bytes: int) -> AsyncIterator[bytes]:
        """The blob's bytes in chunks of at most `chunk_bytes`; NotFound (now) if it is absent."""
        _check_chunk_bytes(chunk_bytes)
        if not await self.exists(sha256):
            raise NotFound(f"blob sha256:{sha256} not found")
        return self._read_object(self.key_for(sha256), chunk_bytes)

    async def _head(self, sha256: str) -> dict[str, Any] | None:
        return await asyncio.to_thread(self._head_sync, sha256)

    def _head_sync(self, sha256: str) -> dict[str, Any] | None:
        from botocore.exceptions import ClientError

        try:
            return self.client.head_object(Bucket=self.bucket, Key=self.key_for(sha256))
        except ClientError as exc:
            if str(exc.response.get("Error", {}).get("Code")) in _S3_MISSING:
                return None
            raise

    async def _read_object(self, key: str, chunk_bytes: int) -> AsyncIterator[bytes]:
        response = await asyncio.to_thread(self.client.get_object, Bucket=self.bucket, Key=key)
        body = response["Body"]
        try:
            while chunk := await asyncio.to_thread(body.read, chunk_bytes):
                yield chunk
        finally:
            body.close()

    async def _publish(self, spool_path: Path, sha256: str) -> None:
        async with self._publish_locks[int(sha256[:8], 16) % len(self._publish_locks)]:
            if await self.exists(sha256):
                return
            await asyncio.to_thread(self.client.upload_file, str(spool_path), self.bucket, self.key_for(sha256),
                                    Config=self._transfer)
        log.info("stored blob sha256:%s in s3://%s/%s", sha256, self.bucket, self.key_for(sha256))


def s3_client(settings: Any) -> Any:
    """A boto3 S3 client for `settings` (endpoint, region, optional static keys; path-style addressing)."""
    import boto3
    from botocore.config import Config

    credentials = {}
    if settings.s3_access_key_id and settings.s3_secret_access_key:
        credentials = {"aws_access_key_id": settings.s3_access_key_id,
                       "aws_secret_access_key": settings.s3_secret_access_key}
    config = Config(retries={"max_attempts": 5, "mode": "standard"},
                    s3={"addressing_style": "path"} if settings.s3_endpoint_url else {})
    return boto3.session.Session().client("s3", endpoint_url=settings.s3_endpoint_url or None,
                                          region_name=settings.s3_region or None, config=config, **credentials)


def open_blob_store(settings: Any) -> LocalBlobStore | S3BlobStore:
    """The store `settings` name: S3 when `s3_bucket` is set, else `artifact_dir`; stale spools removed.

    `settings` is a RegistrySettings or anything with its fields artifact_dir, s3_bucket,
    s3_endpoint_url, s3_region, s3_prefix, s3_access_key_id, s3_secret_access_key, spool_dir,
    spool_min_free_bytes.
    """
    spool_root = Path(settings.spool_dir) if settings.spool_dir else None
    if settings.s3_bucket:
        return S3BlobStore(s3_client(settings), settings.s3_bucket, prefix=settings.s3_prefix,
                           spool_root=spool_root, spool_min_free_bytes=settings.spool_min_free_bytes)
    return LocalBlobStore(Path(settings.artifact_dir), spool_root,
                          spool_min_free_bytes=settings.spool_min_free_bytes)
