"""The artifact cache: verified before visible, reused only while intact, nothing left of a bad download."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from splitstack_serving.backend import ModelLoadError
from splitstack_serving.cache import ArtifactCache

CONTENT = b"an onnx model, in three chunks" * 1000
DIGEST = hashlib.sha256(CONTENT).hexdigest()


def source_of(content: bytes, calls: list[int]) -> Callable[[], AsyncIterator[bytes]]:
    """A download of `content` in three chunks, counting how often it is started."""
    async def chunks() -> AsyncIterator[bytes]:
        calls.append(1)
        third = len(content) // 3
        for start in (0, third, 2 * third):
            yield content[start:start + third] if start < 2 * third else content[start:]

    return chunks


def files_under(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


async def test_a_download_is_verified_then_reused(tmp_path: Path) -> None:
    cache, calls = ArtifactCache(tmp_path), []
    path = await cache.obtain(DIGEST, source_of(CONTENT, calls), len(CONTENT))
    assert path == tmp_path / "sha256" / DIGEST / "model.onnx" and path.read_bytes() == CONTENT
    assert await cache.obtain(DIGEST, source_of(CONTENT, calls), len(CONTENT)) == path
    assert len(calls) == 1, "a verified cached file is reused without downloading"
    assert files_under(tmp_path) == [f"sha256/{DIGEST}/model.onnx"]


async def test_content_with_another_digest_is_refused_and_nothing_is_kept(tmp_path: Path) -> None:
    cache, calls = ArtifactCache(tmp_path), []
    tampered = CONTENT[:-1] + b"!"
    with pytest.raises(ModelLoadError, match="refusing it"):
        await cache.obtain(DIGEST, source_of(tampered, calls), len(tampered))
    with pytest.raises(ModelLoadError, match="expected"):
        await cache.obtain(DIGEST, source_of(CONTENT, calls), len(CONTENT) + 1)
    assert files_under(tmp_path) == [], "no partial or unverified file stays behind"


async def test_a_damaged_cached_file_is_downloaded_again(tmp_path: Path) -> None:
    cache, calls = ArtifactCache(tmp_path), []
    path = await cache.obtain(DIGEST, source_of(CONTENT, calls))
    path.write_bytes(b"bit rot")
    assert (await cache.obtain(DIGEST, source_of(CONTENT, calls))).read_bytes() == CONTENT
    assert len(calls) == 2


async def test_a_digest_that_is_not_one_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="not a SHA-256"):
        await ArtifactCache(tmp_path).obtain("../../etc/passwd", source_of(CONTENT, []))
