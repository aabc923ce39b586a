"""Downloaded artifacts on local disk, addressed by their SHA-256.

`ArtifactCache.obtain(sha256, download)` returns `<root>/sha256/<digest>/model.onnx` (`model.plan` when
the caller names that file: a TensorRT engine). A file already
there is reused only when its content still has that digest (a damaged one is downloaded again).
A download goes to a private temporary file beside its final place while it is hashed; only when
the digest (and the size, when known) matches is it renamed into place, so nothing unverified is
ever visible under a digest, and an interrupted download leaves nothing behind. Hashing and
writing run in worker threads: a download never stalls the requests being served meanwhile.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import re
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import BinaryIO

from splitstack_serving.backend import ModelLoadError
from splitstack_serving.repository import file_sha256

log = logging.getLogger(__name__)

SHA256_RULE = re.compile(r"^[0-9a-f]{64}$")
ARTIFACT_FILE = "model.onnx"
PARTIAL_SUFFIX = ".part"


class ArtifactCache:
    """Verified artifacts under `root`, one directory per digest."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._locks: dict[str, asyncio.Lock] = {}

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
        async with self._locks.setdefault(sha256, asyncio.Lock()):
            if await asyncio.to_thread(_verified, path, sha256):
                log.info("artifact %s: using the cached copy", sha256[:12])
                return path
            await self._download(path, sha256, download(), size_bytes)
            return path

    async def _download(self, path: Path, sha256: str, chunks: AsyncIterator[bytes], size_bytes: int) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{uuid.uuid4().hex}{PARTIAL_SUFFIX}")
        digest = hashlib.sha256()
        written = 0
        try:
            with partial.open("wb") as stream:
                async for chunk in chunks:
                    written += len(chunk)
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
