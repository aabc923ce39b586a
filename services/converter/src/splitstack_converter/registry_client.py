"""The converter's only way to the registry: its gRPC API (RegistryStub), with deadlines.

Downloads are streamed to a file while hashed and rejected when the digest or size differs from
the record; uploads stream a header, then the file in chunks. Errors that retrying cannot fix
(NOT_FOUND, FAILED_PRECONDITION, INVALID_ARGUMENT, ALREADY_EXISTS) become `RegistryRejected`;
any other gRPC error propagates as it is, so the work message is redelivered.
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from pathlib import Path

import grpc

from splitstack.registry.v1 import registry_pb2 as pb
from splitstack.registry.v1 import registry_pb2_grpc

CHUNK_BYTES = 1024 * 1024
PERMANENT = (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.INVALID_ARGUMENT,
             grpc.StatusCode.ALREADY_EXISTS)


class RegistryRejected(Exception):
    """The registry refused a request for a reason a retry cannot change."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(f"registry: {code.name}: {message}")
        self.code = code


class DigestMismatch(Exception):
    """Downloaded content does not match the artifact's recorded digest or size."""


def _rejected(exc: grpc.aio.AioRpcError) -> Exception:
    if exc.code() in PERMANENT:
        return RegistryRejected(exc.code(), exc.details() or "")
    return exc


class RegistryClient:
    """Calls to the registry with a per-call deadline."""

    def __init__(self, channel: grpc.aio.Channel, timeout: float) -> None:
        self._stub = registry_pb2_grpc.RegistryStub(channel)
        self._timeout = timeout

    async def get_version(self, model: str, version: int) -> pb.ModelVersion:
        try:
            return await self._stub.GetVersion(pb.GetVersionRequest(model=model, version=version),
                                               timeout=self._timeout)
        except grpc.aio.AioRpcError as exc:
            raise _rejected(exc) from None

    async def get_model(self, name: str) -> pb.Model:
        try:
            return await self._stub.GetModel(pb.GetModelRequest(name=name), timeout=self._timeout)
        except grpc.aio.AioRpcError as exc:
            raise _rejected(exc) from None

    async def serving_choice(self, model: str, version: int, target: str) -> pb.ServingChoice | None:
        """The version's serving choice for `target`; None when it has none (or the registry refuses the
        question: the conversion's fetch stage then reports why)."""
        try:
            found = await self.get_version(model, version)
        except RegistryRejected:
            return None
        return next((c for c in found.serving_choices if c.target == target), None)

    async def download(self, sha256: str, dest: Path) -> pb.Artifact:
        """Stream the artifact with digest `sha256` into `dest`; DigestMismatch unless it verifies."""
        record: pb.Artifact | None = None
        digest, size = hashlib.sha256(), 0
        try:
            with open(dest, "wb") as out:
                async for part in self._stub.DownloadArtifact(pb.DownloadArtifactRequest(sha256=sha256),
                                                              timeout=self._timeout):
                    if part.WhichOneof("part") == "artifact":
                        record = part.artifact
                        continue
                    digest.update(part.chunk)
                    size += len(part.chunk)
                    out.write(part.chunk)
        except grpc.aio.AioRpcError as exc:
            raise _rejected(exc) from None
        if record is None:
            raise DigestMismatch(f"the registry sent no artifact record for {sha256}")
        if digest.hexdigest() != sha256 or size != record.size_bytes:
            raise DigestMismatch(f"artifact {sha256} arrived as {size} bytes with sha256 {digest.hexdigest()} "
                                 f"(recorded: {record.size_bytes} bytes)")
        return record

    async def upload(self, header: pb.ArtifactHeader, path: Path) -> pb.Artifact:
        """Upload the file at `path` under `header` (idempotent: same key and digest return the record)."""
        try:
            return await self._stub.UploadArtifact(_upload_stream(header, path), timeout=self._timeout)
        except grpc.aio.AioRpcError as exc:
            raise _rejected(exc) from None

    async def set_serving_choice(self, request: pb.SetServingChoiceRequest) -> pb.ServingChoice:
        try:
            return await self._stub.SetServingChoice(request, timeout=self._timeout)
        except grpc.aio.AioRpcError as exc:
            raise _rejected(exc) from None


async def _upload_stream(header: pb.ArtifactHeader, path: Path) -> AsyncIterator[pb.UploadArtifactRequest]:
    yield pb.UploadArtifactRequest(header=header)
    with open(path, "rb") as source:
        while chunk := source.read(CHUNK_BYTES):
            yield pb.UploadArtifactRequest(chunk=chunk)
