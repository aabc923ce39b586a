"""The trainer's only way to the registry: its gRPC API, with a deadline on every call.

Used by the service (resolve and verify the dataset version of a submitted job; find the version a
finished job registered) and by the job process (download the dataset, register the result).
Downloads are streamed to a scratch file while hashed and moved into place only when digest and
size match the record. Errors that a retry cannot fix (NOT_FOUND, INVALID_ARGUMENT,
FAILED_PRECONDITION, ALREADY_EXISTS) become `RegistryRejected`; others propagate unchanged.

Transient failures (UNAVAILABLE, DEADLINE_EXCEEDED: the registry restarting) are retried with
back-off for the client's `RetryBudget` (the chassis's `retry_transient`), then propagate. Every
call is safe to repeat: reads, and writes that are idempotent in the registry — CreateModel (the
same model again returns it), CreateVersion (its idempotency key returns the version it made),
UploadArtifact (the same digest under the same key returns the artifact) and FinalizeVersion (a
READY version stays as it is).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import grpc

from splitstack.chassis.retry import RetryBudget, retry_transient
from splitstack.registry.v1 import registry_pb2 as pb
from splitstack.registry.v1 import registry_pb2_grpc

T = TypeVar("T")
CHUNK_BYTES = 1024 * 1024
PERMANENT = (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION,
             grpc.StatusCode.ALREADY_EXISTS)
NO_RETRY = RetryBudget(total_seconds=0.0)


class RegistryRejected(Exception):
    """The registry refused a request for a reason a retry cannot change."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(f"registry: {code.name}: {message}")
        self.code = code
        self.details = message


class DigestMismatch(Exception):
    """Downloaded content does not match its record's digest or size."""


def _rejected(exc: grpc.aio.AioRpcError) -> Exception:
    if exc.code() in PERMANENT:
        return RegistryRejected(exc.code(), exc.details() or "")
    return exc


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as source:
        while chunk := source.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


class RegistryClient:
    """Calls to the registry with a per-call deadline, retried while the registry is unreachable."""

    def __init__(self, channel: grpc.aio.Channel, timeout: float, retry: RetryBudget = NO_RETRY) -> None:
        self._channel = channel
        self._stub = registry_pb2_grpc.RegistryStub(channel)
        self._timeout = timeout
        self._retry = retry

    def retrying(self, budget: RetryBudget) -> RegistryClient:
        """This client on the same channel, riding out transient failures for `budget`."""
        return RegistryClient(self._channel, self._timeout, budget)

    async def _retried(self, what: str, call: Callable[[], Awaitable[T]]) -> T:
        return await retry_transient(call, what=f"registry {what}", budget=self._retry)

    async def _call(self, method: str, request: object) -> object:
        async def once() -> object:
            try:
                return await getattr(self._stub, method)(request, timeout=self._timeout)
            except grpc.aio.AioRpcError as exc:
                raise _rejected(exc) from None

        return await self._retried(method, once)

    # ---- datasets ------------------------------------------------------------------------------

    async def dataset_version(self, dataset: str, version: int) -> pb.DatasetVersion:
        """The record of `dataset` version `version` (0: the latest)."""
        return await self._call("GetDatasetVersion", pb.GetDatasetVersionRequest(dataset=dataset, version=version))

    async def download_dataset(self, record: pb.DatasetVersion, dest: Path) -> None:
        """Stream `record`'s blob to `dest` (atomically); DigestMismatch unless digest and size match."""
        await self._retried("DownloadDatasetVersion", lambda: self._download_once(record, dest))

    async def _download_once(self, record: pb.DatasetVersion, dest: Path) -> None:
        dest.parent.mkdir(parents=True, exist_ok=True)
        scratch = dest.with_name(f".{dest.name}.{os.getpid()}.part")
        digest, size = hashlib.sha256(), 0
        request = pb.DownloadDatasetVersionRequest(dataset=record.dataset, version=record.version)
        try:
            with open(scratch, "wb") as out:
                async for part in self._stub.DownloadDatasetVersion(request, timeout=self._timeout):
                    if part.WhichOneof("part") == "chunk":
                        digest.update(part.chunk)
                        size += len(part.chunk)
                        out.write(part.chunk)
            if digest.hexdigest() != record.sha256 or size != record.size_bytes:
                raise DigestMismatch(
                    f"dataset {record.dataset} version {record.version} arrived as {size} bytes with sha256 "
                    f"{digest.hexdigest()}; the registry records {record.size_bytes} bytes, sha256 {record.sha256}")
            os.replace(scratch, dest)
        except grpc.aio.AioRpcError as exc:
            raise _rejected(exc) from None
        finally:
            scratch.unlink(missing_ok=True)

    # ---- models and versions -------------------------------------------------------------------

    async def ensure_model(self, model: pb.Model) -> pb.Model:
        """Create the model, or return it when it exists (its stored targets and policy stand)."""
        try:
            return await self._call("CreateModel", pb.CreateModelRequest(model=model))
        except RegistryRejected as exc:
            if exc.code != grpc.StatusCode.ALREADY_EXISTS:
                raise
        return await self._call("GetModel", pb.GetModelRequest(name=model.name))

    async def version(self, model: str, version: int) -> pb.ModelVersion:
        return await self._call("GetVersion", pb.GetVersionRequest(model=model, version=version))

    async def create_version(self, request: pb.CreateVersionRequest) -> pb.ModelVersion:
        return await self._call("CreateVersion", request)

    async def finalize(self, model: str, version: int) -> pb.ModelVersion:
        return await self._call("FinalizeVersion", pb.FinalizeVersionRequest(model=model, version=version))

    async def upload(self, header: pb.ArtifactHeader, path: Path) -> pb.Artifact:
        """Upload the file at `path` under `header` (a retry with the same digest returns the record)."""
        async def once() -> pb.Artifact:
            try:
                return await self._stub.UploadArtifact(_upload_stream(header, path), timeout=self._timeout)
            except grpc.aio.AioRpcError as exc:
                raise _rejected(exc) from None

        return await self._retried("UploadArtifact", once)

    async def version_by_key(self, model: str, key: str) -> pb.ModelVersion | None:
        """The version of `model` created with idempotency key `key`, or None (also: no such model)."""
        token = ""
        while True:
            try:
                page = await self._call("ListVersions", pb.ListVersionsRequest(model=model, page_size=1000,
                                                                              page_token=token))
            except RegistryRejected as exc:
                if exc.code == grpc.StatusCode.NOT_FOUND:
                    return None
                raise
            for version in page.versions:
                if version.idempotency_key == key:
                    return version
            if not page.next_page_token:
                return None
            token = page.next_page_token


async def _upload_stream(header: pb.ArtifactHeader, path: Path) -> AsyncIterator[pb.UploadArtifactRequest]:
    yield pb.UploadArtifactRequest(header=header)
    with open(path, "rb") as source:
        while chunk := source.read(CHUNK_BYTES):
            yield pb.UploadArtifactRequest(chunk=chunk)
