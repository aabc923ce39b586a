"""Datasets: named collections of immutable .npz versions, each announced as data.updated.

A dataset version is numbered n+1 under the dataset row's lock, carries the digest, size and
row count of its blob, and commits together with its event. Its blob is checked before it is
published: once the stream is verified, npz.py inspects the spool file (a plain, intact .npz of
bounded size, see there) and counts the rows of `inputs`, `x` or its first array, so content that
is no such .npz is rejected without anything being stored.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

from splitstack.chassis.errors import AlreadyExists, InvalidArgument
from splitstack.registry.v1 import registry_pb2 as pb
from splitstack_registry import events, npz, records
from splitstack_registry.blobs import BlobStore
from splitstack_registry.lookups import require_dataset, require_dataset_version
from splitstack_registry.store import Tx
from splitstack_registry.validation import check_long, check_metadata, check_name, check_sha256, check_short
from splitstack_registry.versions import differing_fields


def check_dataset(dataset: pb.Dataset) -> None:
    """Stateless checks of a CreateDataset request: the name and a bounded description."""
    check_name("dataset.name", dataset.name)
    check_long("dataset.description", dataset.description)


def check_header(header: pb.DatasetVersionHeader) -> None:
    """Stateless checks of a dataset version upload's header (the size limit is the caller's)."""
    check_name("dataset", header.dataset)
    check_sha256("sha256", header.sha256)
    check_short("idempotency_key", header.idempotency_key)
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

async def store_and_count_rows(blobs: BlobStore, header: pb.DatasetVersionHeader, chunks: AsyncIterator[bytes],
                               max_bytes: int, max_array_bytes: int) -> int:
    """Hand the chunks to the blob store, which lets npz.py inspect the verified content (and count its
    rows) before the blob may be published: content that is no plain, intact .npz is never stored."""
    rows: list[int] = []

    def inspect(path: Path) -> None:
        rows.append(npz.count_rows(path, max_array_bytes))

    await blobs.put_verified(chunks, sha256=header.sha256, size=header.size_bytes, max_bytes=max_bytes,
                             inspect=inspect)
    return rows[0]
