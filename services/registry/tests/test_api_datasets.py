"""Datasets through the Registry API: idempotent creates, immutable numbered .npz versions with row
counts, idempotency keys, bad uploads that store nothing, NOT_FOUND — on both backends."""

from __future__ import annotations

import os

import grpc
import numpy as np

from splitstack.common.v1 import common_pb2 as common
from splitstack.registry.v1 import registry_pb2 as pb

NOT_FOUND = grpc.StatusCode.NOT_FOUND
INVALID = grpc.StatusCode.INVALID_ARGUMENT
EXISTS = grpc.StatusCode.ALREADY_EXISTS
LIMIT_CODES = (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.INVALID_ARGUMENT)
MIB = 1024 * 1024
SHARED_MAX_UPLOAD_BYTES = 12 * MIB       # what conftest gives the shared registry


def _table(api, rows: int) -> bytes:
    rng = np.random.default_rng()
    return api.npz(inputs=rng.random((rows, 4), dtype=np.float32), labels=rng.integers(0, 3, rows))


async def test_create_dataset_is_idempotent_and_listed(api) -> None:
    name = api.name("d")
    created = await api.create_dataset(name, description="digits")
    assert (created.name, created.description, created.latest_version) == (name, "digits", 0)
    assert created.created_at.seconds > 0
    assert await api.create_dataset(name, description="digits") == created
    await api.fails(api.create_dataset(name, description="other"), EXISTS, name)
    assert await api.stub.GetDataset(pb.GetDatasetRequest(name=name)) == created
    listed = [d.name for d in await api.all_datasets(page_size=2)]
    assert listed.count(name) == 1


async def test_dataset_versions_are_numbered_with_digest_size_and_rows(api) -> None:
    name = (await api.create_dataset()).name
    first_data, second_data = _table(api, 100), _table(api, 150)
    first = await api.upload_dataset(name, first_data, metadata={"source": "sklearn"}, chunk=4096)
    assert (first.dataset, first.version, first.row_count) == (name, 1, 100)
    assert (first.sha256, first.size_bytes) == (api.sha256(first_data), len(first_data))
    assert dict(first.metadata) == {"source": "sklearn"} and first.created_at.seconds > 0
    second = await api.upload_dataset(name, second_data)
    assert (second.version, second.row_count) == (2, 150)
    assert (await api.stub.GetDataset(pb.GetDatasetRequest(name=name))).latest_version == 2
    get = api.stub.GetDatasetVersion
    assert await get(pb.GetDatasetVersionRequest(dataset=name, version=0)) == second
    assert await get(pb.GetDatasetVersionRequest(dataset=name, version=1)) == first
    assert await api.download_dataset(name, 1) == (first, first_data)
    assert await api.download_dataset(name, 0) == (second, second_data)
    assert await api.all_dataset_versions(name, page_size=1) == [first, second]


async def test_row_count_reads_inputs_then_x_then_the_first_array(api) -> None:
    name = (await api.create_dataset()).name
    cases = [(api.npz(labels=np.arange(7), inputs=np.zeros((5, 3))), 5),
             (api.npz(y=np.arange(4), x=np.zeros((6, 2))), 6),
             (api.npz(a=np.zeros((9, 2)), b=np.zeros(3)), 9)]
    for data, rows in cases:
        assert (await api.upload_dataset(name, data)).row_count == rows


async def test_dataset_version_idempotency_key(api) -> None:
    name = (await api.create_dataset()).name
    data = _table(api, 20)
    first = await api.upload_dataset(name, data, key="snapshot-1")
    assert first.idempotency_key == "snapshot-1"
    assert await api.upload_dataset(name, data, key="snapshot-1") == first
    await api.fails(api.upload_dataset(name, _table(api, 21), key="snapshot-1"), EXISTS, "snapshot-1")
    unkeyed = await api.upload_dataset(name, data)
    assert (unkeyed.version, unkeyed.sha256) == (2, first.sha256), "no key: a new immutable version"
    assert [v.version for v in await api.all_dataset_versions(name)] == [1, 2]
    assert len(api.state.blobs_named(first.sha256)) == 1


async def test_a_dataset_and_an_artifact_with_one_content_share_one_blob(api) -> None:
    name = (await api.create_dataset()).name
    data = _table(api, 33)
    dataset_version = await api.upload_dataset(name, data)
    model = (await api.create_model()).name
    version = (await api.create_version(model)).version
    artifact = await api.upload(model, version, data, common.SAMPLE)
    assert artifact.sha256 == dataset_version.sha256
    assert list(api.state.blobs_named(artifact.sha256).values()) == [len(data)]
    _, content = await api.download(sha256=artifact.sha256)
    assert content == data


async def test_a_blob_that_is_not_npz_is_invalid_and_stores_nothing(api) -> None:
    name = (await api.create_dataset()).name
    before = api.state.stored_files()
    await api.fails(api.upload_dataset(name, b"not a zip file " * 100), INVALID)
    await api.fails(api.upload_dataset(name, api.npz()), INVALID)        # an .npz without arrays
    assert (await api.stub.GetDataset(pb.GetDatasetRequest(name=name))).latest_version == 0
    assert await api.all_dataset_versions(name) == []
    assert api.state.stored_files() == before, "a rejected dataset upload left a blob behind"


async def test_dataset_digest_size_header_and_limit_violations_store_nothing(api) -> None:
    name = (await api.create_dataset()).name
    data = _table(api, 50)
    before = api.state.stored_files()
    await api.fails(api.upload_dataset(name, data, sha256=api.sha256(b"other")), INVALID, "sha256")
    await api.fails(api.upload_dataset(name, data, size=len(data) + 10), INVALID, "size_bytes")
    chunk_only = [pb.UploadDatasetVersionRequest(chunk=data)]
    await api.fails(api.stub.UploadDatasetVersion(iter(chunk_only)), INVALID, "header")
    big = os.urandom(SHARED_MAX_UPLOAD_BYTES + MIB)
    header = pb.DatasetVersionHeader(dataset=name, sha256=api.sha256(big), size_bytes=len(big))
    refused = await api.refused_upload(header, big, invalid_after=SHARED_MAX_UPLOAD_BYTES)
    assert refused.code() in LIMIT_CODES and "max_upload_bytes" in refused.details(), refused
    assert await api.all_dataset_versions(name) == []
    assert api.state.stored_files() == before


async def test_unknown_datasets_and_versions_are_not_found(api) -> None:
    missing = api.name("missing")
    await api.fails(api.upload_dataset(missing, _table(api, 3)), NOT_FOUND, missing)
    await api.fails(api.stub.GetDataset(pb.GetDatasetRequest(name=missing)), NOT_FOUND, missing)
    await api.fails(api.stub.GetDatasetVersion(pb.GetDatasetVersionRequest(dataset=missing)), NOT_FOUND, missing)
    await api.fails(api.stub.ListDatasetVersions(pb.ListDatasetVersionsRequest(dataset=missing)), NOT_FOUND, missing)
    await api.fails(api.download_dataset(missing, 0), NOT_FOUND, missing)
    name = (await api.create_dataset()).name
    await api.fails(api.stub.GetDatasetVersion(pb.GetDatasetVersionRequest(dataset=name, version=0)), NOT_FOUND)
    await api.fails(api.stub.GetDatasetVersion(pb.GetDatasetVersionRequest(dataset=name, version=3)), NOT_FOUND, "3")
    await api.fails(api.download_dataset(name, 1), NOT_FOUND)
    assert missing not in {d.name for d in await api.all_datasets()}


async def test_dataset_names_outside_the_naming_rule_are_invalid(api) -> None:
    for bad in ("", "Bad Name", "x" * 64, "dot.name"):
        await api.fails(api.create_dataset(bad), INVALID, "dataset")
        await api.fails(api.upload_dataset(bad, _table(api, 2)), INVALID, "dataset")
    assert not {d.name for d in await api.all_datasets()} & {"", "Bad Name", "x" * 64, "dot.name"}
