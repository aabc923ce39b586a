"""Downloaded artifacts on local disk, addressed by their SHA-256.

`ArtifactCache.obtain(sha256, download)` returns `<root>/sha256/<digest>/model.onnx` (`model.plan` when
the caller names that file: a TensorRT engine). A file already
there is reused only when its content still has that digest (a damaged one is downloaded again).
A download goes to a private temporary file beside its final place while it is hashed; only when
the digest (and the size, when known) matches is it renamed into place, so nothing unverified is
ever visible under a digest, and an interrupted download leaves nothing behind. Hashing and
writing run in worker threads: a download never stalls the requests being served meanwhile.

The cache is bounded (`max_bytes`, SPLITSTACK_SERVING_CACHE_MAX_BYTES): after every download or
reuse, and whenever the repository released versions (`evict`), the least recently used artifacts (by the file's modification time, which each use renews)
are removed until the total fits, except those in use (`keep_in_use`: the loaded versions' and
the one being opened) and those being downloaded. An artifact larger than the bound is refused
before its download; a download that grows past its announced size or the bound is stopped.
Partial files left by a process that died are removed.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import BinaryIO

from splitstack_serving import metrics
from splitstack_serving.backend import ModelLoadError
from splitstack_serving.repository import file_sha256

log = logging.getLogger(__name__)

SHA256_RULE = re.compile(r"^[0-9a-f]{64}$")
ARTIFACT_FILE = "model.onnx"
PARTIAL_SUFFIX = ".part"


class ArtifactCache:
    """Verified artifacts under `root`, one directory per digest, at most `max_bytes` of them
    (0: no bound) apart from the ones in use."""

    def __init__(self, root: Path, max_bytes: int = 0) -> None:
        self.root = Path(root)
        self.max_bytes = max_bytes
        self._locks: dict[str, asyncio.Lock] = {}
        self._in_use: Callable[[], set[str]] = set
        self._started = time.time()

    def keep_in_use(self, in_use: Callable[[], set[str]]) -> None:
        """Never evict the digests `in_use()` names (the loaded versions' artifacts)."""
        self._in_use = in_use

    def path_for(self, sha256: str, file_name: str = ARTIFACT_FILE) -> Path:
        """Where the artifact with this digest lives once verified (as `file_name`)."""
        if not SHA256_RULE.match(sha256):
            raise ModelLoadError(f"{sha256!r} is not a SHA-256 digest (64 lowercase hex characters)")
        return self.root / "sha256" / sha256 / file_name

    async def obtain(self, sha256: str, download: Callable[[], AsyncIterator[bytes]], size_bytes: int = -1,
                     file_name: str = ARTIFACT_FILE) -> Path:
        """The verified file with digest `sha256`: the cached one, or the chunks of `download()` written
        and verified (ModelLoadError when their digest or size differs; nothing is kept then)."""
        path = self.path_for(sha256, file_name)
        if self.max_bytes and size_bytes > self.max_bytes:
            raise ModelLoadError(f"artifact {sha256[:12]} is {size_bytes} bytes, more than the artifact cache may "
                                 f"hold ({self.max_bytes}, SPLITSTACK_SERVING_CACHE_MAX_BYTES)")
        async with self._locks.setdefault(sha256, asyncio.Lock()):
            if await asyncio.to_thread(_verified, path, sha256):
                log.info("artifact %s: using the cached copy", sha256[:12])
                os.utime(path)  # most recently used
            else:
                await self._download(path, sha256, download(), size_bytes)
            self.evict(keep=sha256)
            return path

    def evict(self, keep: str = "") -> list[str]:
        """Remove least recently used artifacts until the cache is within `max_bytes`; never `keep`,
        one in use, or one being downloaded. Runs on the event loop without yielding, so a version
        is never evicted between its download and its load. Returns the evicted digests."""
        entries = self._entries()
        total = sum(size for _, size, _ in entries)
        evicted: list[str] = []
        if self.max_bytes and total > self.max_bytes:
            protected = {keep, *self._in_use(), *(d for d, lock in self._locks.items() if lock.locked() and d != keep)}
            for digest, size, _ in entries:
                if total <= self.max_bytes:
                    break
                if digest in protected:
                    continue
                _remove_entry(self.root / "sha256" / digest)
                total -= size
                evicted.append(digest)
                metrics.CACHE_EVICTIONS.inc()
                log.info("artifact %s evicted from the cache (least recently used; %d bytes)", digest[:12], size)
            if total > self.max_bytes:
                log.warning("the artifact cache holds %d bytes, over its bound of %d: the rest is in use",
                            total, self.max_bytes)
        metrics.CACHE_BYTES.set(total)
        return evicted

    def _entries(self) -> list[tuple[str, int, float]]:
        """(digest, bytes, last use) of every cached artifact, least recently used first; partial
        files left by a process that died before this one started are removed on the way."""
        entries = []
        base = self.root / "sha256"
        for directory in base.iterdir() if base.is_dir() else ():
            if not directory.is_dir() or not SHA256_RULE.match(directory.name):
                continue  # not an artifact of this cache: left alone
            size, used = 0, 0.0
            for file in directory.iterdir():
                try:
                    stat = file.stat()
                except FileNotFoundError:  # removed meanwhile (someone cleaning the cache by hand)
                    continue
                if file.name.endswith(PARTIAL_SUFFIX):
                    if stat.st_mtime < self._started:
                        file.unlink(missing_ok=True)
                    continue
                size += stat.st_size
                used = max(used, stat.st_mtime)
            if size:
                entries.append((directory.name, size, used))
        return sorted(entries, key=lambda entry: entry[2])

    def _check_growing(self, sha256: str, written: int, size_bytes: int) -> None:
        """Stop a download at once when it exceeds its announced size or the cache's bound."""
        if size_bytes >= 0 and written > size_bytes:
            raise ModelLoadError(f"artifact {sha256[:12]}: more than the {size_bytes} bytes announced arrived")
        if self.max_bytes and written > self.max_bytes:
            raise ModelLoadError(f"artifact {sha256[:12]}: more than the artifact cache may hold "
                                 f"({self.max_bytes} bytes) arrived")

    async def _download(self, path: Path, sha256: str, chunks: AsyncIterator[bytes], size_bytes: int) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{uuid.uuid4().hex}{PARTIAL_SUFFIX}")
        digest = hashlib.sha256()
        written = 0
        try:
            with partial.open("wb") as stream:
                async for chunk in chunks:
                    written += len(chunk)
                    self._check_growing(sha256, written, size_bytes)
                    await asyncio.to_thread(_write_hashed, stream, digest, chunk)
                await asyncio.to_thread(_flush, stream)
            if size_bytes >= 0 and written != size_bytes:
                raise ModelLoadError(f"artifact {sha256[:12]}: downloaded {written} bytes, expected {size_bytes}")
            if digest.hexdigest() != sha256:
                raise ModelLoadError(f"artifact {sha256[:12]}: the downloaded content has sha256 "
                                     f"{digest.hexdigest()}; refusing it")
            os.replace(partial, path)
        finally:
            partial.unlink(missing_ok=True)
        log.info("artifact %s: downloaded and verified (%d bytes)", sha256[:12], written)


def _remove_entry(directory: Path) -> None:
    """Remove a cached artifact's files and its directory (a partial of a download in progress stays)."""
    for file in directory.iterdir():
        if not file.name.endswith(PARTIAL_SUFFIX):
            file.unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        directory.rmdir()


def _verified(path: Path, sha256: str) -> bool:
    """True when `path` exists with digest `sha256`; a damaged copy is removed."""
    if not path.is_file():
        return False
    if file_sha256(path) == sha256:
        return True
    log.warning("cached artifact %s is damaged; downloading it again", path)
    path.unlink(missing_ok=True)
    return False


def _write_hashed(stream: BinaryIO, digest: hashlib._Hash, chunk: bytes) -> None:
    digest.update(chunk)
    stream.write(chunk)


def _flush(stream: BinaryIO) -> None:
    stream.flush()
    os.fsync(stream.fileno())
