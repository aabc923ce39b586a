"""The converter's only way to the registry: its gRPC API (RegistryStub), with deadlines and retries.

Downloads are streamed to a file while hashed and rejected when the digest or size differs from
the record; uploads stream a header, then the file in chunks. A call that fails transiently
(UNAVAILABLE, DEADLINE_EXCEEDED: the registry restarting) is made again with back-off
(`splitstack.chassis.retry`) for the configured budget; a download or upload starts over. Errors
that retrying cannot fix (NOT_FOUND, FAILED_PRECONDITION, INVALID_ARGUMENT, ALREADY_EXISTS) become
`RegistryRejected`; any other gRPC error, and a transient one that outlasted the budget, propagates
as it is, so the work message is redelivered.
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import grpc

from splitstack.chassis.retry import RetryBudget, retry_transient
from splitstack.registry.v1 import registry_pb2 as pb
from splitstack.registry.v1 import registry_pb2_grpc

T = TypeVar("T")

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
    """Calls to the registry with a per-call deadline, retried while the registry is unavailable."""

    def __init__(self, channel: grpc.aio.Channel, timeout: float, budget: RetryBudget | None = None) -> None:
        self._stub = registry_pb2_grpc.RegistryStub(channel)
        self._timeout = timeout
        self._budget = budget if budget is not None else RetryBudget()

    async def _call(self, what: str, call: Callable[[], Awaitable[T]]) -> T:
        try:
            return await retry_transient(call, what=f"registry {what}", budget=self._budget)
        except grpc.aio.AioRpcError as exc:
            raise _rejected(exc) from None

    async def get_version(self, model: str, version: int) -> pb.ModelVersion:
        request = pb.GetVersionRequest(model=model, version=version)
        return await self._call("GetVersion", lambda: self._stub.GetVersion(request, timeout=self._timeout))

    async def get_model(self, name: str) -> pb.Model:
        request = pb.GetModelRequest(name=name)
        return await self._call("GetModel", lambda: self._stub.GetModel(request, timeout=self._timeout))

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
        return await self._call("DownloadArtifact", lambda: self._download_once(sha256, dest))

    async def _download_once(self, sha256: str, dest: Path) -> pb.Artifact:
        record: pb.Artifact | None = None
        digest, size = hashlib.sha256(), 0
        with open(dest, "wb") as out:
            async for part in self._stub.DownloadArtifact(pb.DownloadArtifactRequest(sha256=sha256),
                                                          timeout=self._timeout):
                if part.WhichOneof("part") == "artifact":
                    record = part.artifact
                    continue
                digest.update(part.chunk)
                size += len(part.chunk)
                out.write(part.chunk)
        if record is None:
            raise DigestMismatch(f"the registry sent no artifact record for {sha256}")
        if digest.hexdigest() != sha256 or size != record.size_bytes:
            raise DigestMismatch(f"artifact {sha256} arrived as {size} bytes with sha256 {digest.hexdigest()} "
                                 f"(recorded: {record.size_bytes} bytes)")
        return record

    async def upload(self, header: pb.ArtifactHeader, path: Path) -> pb.Artifact:
        """Upload the file at `path` under `header` (idempotent: same key and digest return the record)."""
        return await self._call("UploadArtifact", lambda: self._stub.UploadArtifact(_upload_stream(header, path),
                                                                                    timeout=self._timeout))

    async def set_serving_choice(self, request: pb.SetServingChoiceRequest) -> pb.ServingChoice:
        return await self._call("SetServingChoice",
                                lambda: self._stub.SetServingChoice(request, timeout=self._timeout))


async def _upload_stream(header: pb.ArtifactHeader, path: Path) -> AsyncIterator[pb.UploadArtifactRequest]:
    yield pb.UploadArtifactRequest(header=header)
    with open(path, "rb") as source:
        while chunk := source.read(CHUNK_BYTES):
            yield pb.UploadArtifactRequest(chunk=chunk)
