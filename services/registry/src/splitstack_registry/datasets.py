"""Datasets: named collections of immutable .npz versions, each announced as data.updated.

A dataset version is numbered n+1 under the dataset row's lock, carries the digest, size and
row count of its blob, and commits together with its event. Its blob is checked while it streams
in: the registry keeps a scratch copy and, when the stream ends, opens it as an .npz and counts
the rows of its first array (or of `inputs` / `x` when present) before the blob store may publish
the blob, so content that is no .npz is rejected without anything being stored.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
import zipfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from splitstack.chassis.errors import AlreadyExists, InvalidArgument
from splitstack.contracts.names import check_name
from splitstack.registry.v1 import registry_pb2 as pb
from splitstack_registry import events, records
from splitstack_registry.lookups import require_dataset, require_dataset_version
from splitstack_registry.store import Tx
from splitstack_registry.validation import check_metadata, check_sha256, check_text
from splitstack_registry.versions import differing_fields

ROW_ARRAYS = ("inputs", "x")        # counted in preference to the first array


def check_dataset(dataset: pb.Dataset) -> None:
    """Stateless checks of a CreateDataset request."""
    check_name("dataset.name", dataset.name)


def check_header(header: pb.DatasetVersionHeader) -> None:
    """Stateless checks of a dataset version upload's header (the size limit is the caller's)."""
    check_name("dataset", header.dataset)
    check_sha256("sha256", header.sha256)
    check_text("idempotency_key", header.idempotency_key)
    check_metadata("metadata", header.metadata)


def check_version_ref(dataset: str, version: int) -> None:
    """A dataset name and a version number, where 0 means the latest."""
    check_name("dataset", dataset)
    if version < 0:
        raise InvalidArgument(f"version must be >= 0 (0 = the latest), got {version}")


def create_dataset(tx: Tx, dataset: pb.Dataset, uid: str) -> pb.Dataset:
    """Create the dataset; the same description again returns it, another is ALREADY_EXISTS."""
    row = tx.dataset_row(dataset.name)
    if row is not None:
        if row.description != dataset.description:
            raise AlreadyExists(f"dataset {dataset.name!r} exists with a different description")
        return records.dataset_record(row)
    tx.insert_dataset(name=dataset.name, uid=uid, description=dataset.description, last_version=0,
                      created_at=records.utcnow())
    return records.dataset_record(require_dataset(tx, dataset.name))


def get_dataset(tx: Tx, name: str) -> pb.Dataset:
    return records.dataset_record(require_dataset(tx, name))


def list_datasets(tx: Tx, after: str, limit: int) -> list[pb.Dataset]:
    return [records.dataset_record(r) for r in tx.dataset_rows(after, limit)]


def existing_version(tx: Tx, header: pb.DatasetVersionHeader) -> pb.DatasetVersion | None:
    """The version this idempotency key created (same payload), or None; the dataset must exist."""
    require_dataset(tx, header.dataset)
    if not header.idempotency_key:
        return None
    row = tx.dataset_version_row_by_key(header.dataset, header.idempotency_key)
    if row is None:
        return None
    stored = records.dataset_version_record(row)
    wanted = pb.DatasetVersion()
    wanted.CopyFrom(stored)
    wanted.sha256, wanted.size_bytes = header.sha256, header.size_bytes
    wanted.metadata.clear()
    wanted.metadata.update(header.metadata)
    differs = differing_fields(stored, wanted)
    if differs:
        raise AlreadyExists(f"idempotency_key {header.idempotency_key!r} already created dataset "
                            f"{header.dataset!r} version {row.version} with a different {', '.join(differs)}")
    return stored


def add_version(tx: Tx, header: pb.DatasetVersionHeader, row_count: int) -> pb.DatasetVersion:
    """Register the verified blob as version n+1 and announce data.updated (same transaction)."""
    dataset = require_dataset(tx, header.dataset, lock=True)
    existing = existing_version(tx, header)
    if existing is not None:
        return existing
    number = tx.take_dataset_version(header.dataset)
    tx.insert_dataset_version(dataset=header.dataset, version=number, sha256=header.sha256,
                              size_bytes=header.size_bytes, row_count=row_count,
                              metadata=records.to_json(header.metadata),
                              idempotency_key=header.idempotency_key or None, created_at=records.utcnow())
    record = records.dataset_version_record(require_dataset_version(tx, header.dataset, number))
    events.data_updated(tx, dataset.uid, record)
    return record


def get_version(tx: Tx, dataset: str, version: int) -> pb.DatasetVersion:
    return records.dataset_version_record(require_dataset_version(tx, dataset, version))


def list_versions(tx: Tx, dataset: str, after: int, limit: int) -> list[pb.DatasetVersion]:
    require_dataset(tx, dataset)
    return [records.dataset_version_record(r) for r in tx.dataset_version_rows(dataset, after, limit)]


# ---- the blob: stored only when it is an .npz ---------------------------------------------------

async def store_and_count_rows(blobs: Any, header: pb.DatasetVersionHeader, chunks: AsyncIterator[bytes],
                               max_bytes: int) -> int:
    """Hand the chunks to the blob store, counting the .npz rows before it may publish the blob."""
    path, scratch = _scratch_file(blobs, header.sha256)
    rows: list[int] = []

    async def checked_chunks() -> AsyncIterator[bytes]:
        received = 0
        async for chunk in chunks:
            received += len(chunk)
            if received <= header.size_bytes:
                await asyncio.to_thread(scratch.write, chunk)
            yield chunk
        if received == header.size_bytes:  # otherwise the blob store rejects the size
            await asyncio.to_thread(scratch.close)
            rows.append(await asyncio.to_thread(count_rows, path))

    try:
        await blobs.put_verified(checked_chunks(), sha256=header.sha256, size=header.size_bytes,
                                 max_bytes=max_bytes)
    finally:
        scratch.close()
        path.unlink(missing_ok=True)
    if not rows:
        raise InvalidArgument(f"size_bytes: the upload did not deliver the declared {header.size_bytes} bytes")
    return rows[0]


def _scratch_file(blobs: Any, sha256: str) -> tuple[Path, BinaryIO]:
    """A private scratch file: in the blob store's spool (swept after a crash) when it has one."""
    spool = getattr(blobs, "spool", None)
    if spool is not None:
        path, handle = spool.new_file(f"rows-{sha256}")
        return path, handle
    fd, name = tempfile.mkstemp(prefix="splitstack-registry-rows-", suffix=".npz")
    return Path(name), os.fdopen(fd, "wb")


def count_rows(path: Path) -> int:
    """Rows of the .npz at `path`: the length of `inputs`, `x`, or else its first array."""
    try:
        with zipfile.ZipFile(path) as archive:
            arrays = [n for n in archive.namelist() if n.endswith(".npy")]
            if not arrays:
                raise InvalidArgument("dataset content is a zip archive without .npy arrays, not an .npz")
            name = next((f"{k}.npy" for k in ROW_ARRAYS if f"{k}.npy" in arrays), arrays[0])
            with archive.open(name) as member:
                shape = _npy_shape(member, name)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError) as exc:
        raise InvalidArgument(f"dataset content is not an .npz archive ({exc})") from None
    if not shape:
        raise InvalidArgument(f"array {name[:-4]!r} of the .npz is a scalar: it has no rows to count")
    return int(shape[0])


def _npy_shape(member: BinaryIO, name: str) -> tuple[int, ...]:
    """The shape in an .npy header, read without loading the array."""
    try:
        version = np.lib.format.read_magic(member)
        reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _fortran, _dtype = reader(member)
    except (ValueError, OSError) as exc:
        raise InvalidArgument(f"member {name!r} of the .npz is not a valid .npy array ({exc})") from None
    return tuple(shape)
