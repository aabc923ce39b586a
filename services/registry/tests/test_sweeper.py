"""The orphan sweeper in process, on SQLite and PostgreSQL with a local blob directory: it removes
blobs that no row references once they are older than the grace period, never a referenced one, and
an upload whose blob is swept before its row is written is ABORTED (retryable) instead of recording
a row that points at nothing."""

from __future__ import annotations

import hashlib
import io
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import numpy as np
import pytest

from splitstack.chassis.errors import Aborted
from splitstack.chassis.outbox import Outbox
from splitstack.common.v1 import common_pb2 as c
from splitstack.registry.v1 import registry_pb2 as pb
from splitstack_registry import tables
from splitstack_registry.blobs import LocalBlobStore
from splitstack_registry.core import Registry
from splitstack_registry.migrations import upgrade_to_head
from splitstack_registry.store import Store, open_engine
from splitstack_registry.sweeper import OrphanSweeper

LIMIT = 1 << 20


@pytest.fixture(params=["sqlite", "postgresql"])
def registry(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Registry]:
    url = f"sqlite:///{tmp_path}/registry.db" if request.param == "sqlite" else request.getfixturevalue("postgres_url")
    engine = open_engine(url)
    upgrade_to_head(engine)
    blobs = LocalBlobStore(tmp_path / "artifacts")
    core = Registry(Store(engine, Outbox(tables.outbox, "registry/test")), blobs, max_upload_bytes=LIMIT,
                    chunk_bytes=1000)
    yield core
    core.close()
    blobs.close()
    engine.dispose()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


async def stream(*chunks: bytes) -> AsyncIterator[bytes]:
    for chunk in chunks:
        yield chunk


def sweeper(core: Registry, grace_seconds: float) -> OrphanSweeper:
    return OrphanSweeper(core.store, core.blobs, grace_seconds=grace_seconds, interval_seconds=60)


async def _version(core: Registry) -> int:
    await core.create_model(pb.Model(name="digits"))
    return (await core.create_version(pb.CreateVersionRequest(model="digits"))).version


async def _upload(core: Registry, version: int, content: bytes, chunks: AsyncIterator[bytes] | None = None) -> object:
    header = pb.ArtifactHeader(model="digits", version=version, kind=c.CHECKPOINT, sha256=sha(content),
                               size_bytes=len(content))
    return await core.upload_artifact(header, chunks or stream(content))


async def test_only_unreferenced_blobs_older_than_the_grace_period_are_swept(registry: Registry) -> None:
    version = await _version(registry)
    artifact = await _upload(registry, version, b"referenced checkpoint")
    await registry.create_dataset(pb.Dataset(name="digits"))
    buffer = io.BytesIO()
    np.savez(buffer, inputs=np.zeros((3, 2)))
    table = buffer.getvalue()
    dataset_version = await registry.upload_dataset_version(
        pb.DatasetVersionHeader(dataset="digits", sha256=sha(table), size_bytes=len(table)), stream(table))
    orphan = b"published, then its transaction failed"
    await registry.blobs.put_verified(stream(orphan), sha256=sha(orphan), size=len(orphan), max_bytes=LIMIT)

    young = sweeper(registry, grace_seconds=3600).sweep()
    assert (young.examined, young.removed) == (0, 0), "a blob younger than the grace period was examined"
    assert await registry.blobs.exists(sha(orphan))

    swept = sweeper(registry, grace_seconds=0).sweep()
    assert (swept.examined, swept.removed) == (3, 1)
    assert not await registry.blobs.exists(sha(orphan))
    for digest in (artifact.sha256, dataset_version.sha256):
        assert await registry.blobs.exists(digest)
    assert sweeper(registry, grace_seconds=0).sweep().removed == 0


async def test_an_upload_whose_blob_is_swept_before_its_row_is_written_is_aborted(registry: Registry) -> None:
    version = await _version(registry)
    content = b"an old orphan, uploaded again"
    await registry.blobs.put_verified(stream(content), sha256=sha(content), size=len(content), max_bytes=LIMIT)

    async def swept_while_streaming() -> AsyncIterator[bytes]:
        yield content[:5]                       # the registry found the blob stored and does not spool it
        assert sweeper(registry, grace_seconds=0).sweep().removed == 1
        yield content[5:]

    with pytest.raises(Aborted, match="upload it again"):
        await _upload(registry, version, content, swept_while_streaming())
    assert (await registry.get_version("digits", version)).artifacts == []
    stored = await _upload(registry, version, content)              # the retry spools and records it
    assert stored.sha256 == sha(content) and await registry.blobs.exists(sha(content))
    assert sweeper(registry, grace_seconds=0).sweep().removed == 0
