"""The artifact cache: verified before visible, reused only while intact, nothing left of a bad download."""

from __future__ import annotations

import hashlib
import os
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


# ---- the size bound: least recently used first, never what is in use ---------------------------------

def artifact(seed: int, size: int = 10_000) -> tuple[bytes, str]:
    content = bytes([seed]) * size
    return content, hashlib.sha256(content).hexdigest()


def cached(root: Path) -> set[str]:
    base = root / "sha256"
    return {d.name for d in base.iterdir() if any(d.iterdir())} if base.is_dir() else set()


async def test_the_least_recently_used_artifact_goes_first(tmp_path: Path) -> None:
    cache = ArtifactCache(tmp_path, max_bytes=25_000)  # room for two artifacts of 10 kB
    (a, da), (b, db), (c, dc) = artifact(1), artifact(2), artifact(3)
    await cache.obtain(da, source_of(a, []), len(a))
    await cache.obtain(db, source_of(b, []), len(b))
    calls: list[int] = []
    await cache.obtain(da, source_of(a, calls), len(a))  # a is used again: b is now the least recent
    assert calls == []
    await cache.obtain(dc, source_of(c, []), len(c))
    assert cached(tmp_path) == {da, dc}


async def test_artifacts_in_use_are_never_evicted(tmp_path: Path) -> None:
    cache = ArtifactCache(tmp_path, max_bytes=25_000)
    in_use: set[str] = set()
    cache.keep_in_use(lambda: in_use)
    (a, da), (b, db), (c, dc), (d, dd) = artifact(1), artifact(2), artifact(3), artifact(4)
    await cache.obtain(da, source_of(a, []), len(a))
    await cache.obtain(db, source_of(b, []), len(b))
    in_use.update({da, db})  # both loaded: the cache goes over its bound rather than evict them
    await cache.obtain(dc, source_of(c, []), len(c))
    assert cached(tmp_path) == {da, db, dc}
    in_use.discard(da)  # a was released: the next download makes room by evicting it (and c, older than d)
    await cache.obtain(dd, source_of(d, []), len(d))
    assert cached(tmp_path) == {db, dd}


async def test_an_artifact_larger_than_the_cache_is_refused_before_downloading(tmp_path: Path) -> None:
    cache, calls = ArtifactCache(tmp_path, max_bytes=1_000), []
    with pytest.raises(ModelLoadError, match="more than the artifact cache may hold"):
        await cache.obtain(DIGEST, source_of(CONTENT, calls), len(CONTENT))
    assert calls == [] and files_under(tmp_path) == []
    with pytest.raises(ModelLoadError, match="more than the artifact cache may hold"):
        await cache.obtain(DIGEST, source_of(CONTENT, calls))  # size unknown: stopped while it grows
    assert files_under(tmp_path) == []


async def test_a_download_longer_than_announced_is_stopped(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="more than the 100 bytes announced"):
        await ArtifactCache(tmp_path).obtain(DIGEST, source_of(CONTENT, []), 100)
    assert files_under(tmp_path) == []


async def test_partial_files_of_a_dead_process_are_removed(tmp_path: Path) -> None:
    leftover = tmp_path / "sha256" / DIGEST / ".0123.part"
    leftover.parent.mkdir(parents=True)
    leftover.write_bytes(b"half a model")
    os.utime(leftover, (1_000_000, 1_000_000))  # written long before this process started
    cache = ArtifactCache(tmp_path, max_bytes=10**9)
    await cache.obtain(DIGEST, source_of(CONTENT, []), len(CONTENT))
    assert files_under(tmp_path) == [f"sha256/{DIGEST}/model.onnx"]
