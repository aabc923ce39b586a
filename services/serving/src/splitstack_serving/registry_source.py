"""Model versions from the registry: aliases resolved, the target's serving artifact downloaded.

`RegistryModelSource` is the `ModelSource` of registry mode. A version is served through the
serving choice the registry holds for this server's target (write-once, so once known it is
remembered); a version without one for the target, or whose chosen artifact is neither an ONNX
model nor a TensorRT plan (or is a plan and this replica cannot run TensorRT: refused before the
download), is not servable here (`NotServable`, a ModelLoadError). The artifact is downloaded by digest into
the `ArtifactCache`, which verifies its SHA-256 before the file is visible; the repository then
checks it again before loading. Only gRPC reaches the registry (`splitstack.registry.v1.Registry`).
Every registry call (ResolveAlias, GetVersion, DownloadArtifact) is retried while it fails
transiently (UNAVAILABLE, DEADLINE_EXCEEDED: the registry restarting) within the retry budget
(`splitstack.chassis.retry`); what still fails is UNAVAILABLE to this server's client (INVALID_ARGUMENT
when the registry found the request malformed), never INTERNAL.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TypeVar

import grpc

from splitstack.chassis.errors import DomainError, InvalidArgument, NotFound, Unavailable
from splitstack.chassis.retry import RetryBudget, retry_transient
from splitstack.common.v1 import common_pb2
from splitstack.contracts.names import check_name, parse_version
from splitstack.events.v1 import events_pb2
from splitstack.registry.v1 import registry_pb2 as pb
from splitstack.registry.v1 import registry_pb2_grpc

from splitstack_serving.backend import ModelLoadError
from splitstack_serving.cache import ArtifactCache
from splitstack_serving.source import MODEL_FILE, PLAN_FILE, LocalModel
from splitstack_serving.tensorrt_backend import detect_capability

log = logging.getLogger(__name__)

DEFAULT_ALIAS = "production"
ARTIFACT_FILES = {common_pb2.ONNX: MODEL_FILE, common_pb2.TENSORRT_PLAN: PLAN_FILE}  # kind -> cached file name
SERVABLE_KINDS = tuple(ARTIFACT_FILES)
DEFAULT_RETRY = RetryBudget(total_seconds=20.0, first_pause=0.2, max_pause=5.0)
T = TypeVar("T")


class NotServable(ModelLoadError):
    """A registry version this server cannot serve (no serving choice for its target, an artifact
    kind it has no backend for, an artifact the registry cannot deliver)."""

    def __init__(self, message: str, version: int) -> None:
        super().__init__(message)
        self.version = str(version)


class AliasMissing(NotFound):
    """The registry has no such alias (or no such model): nothing to serve for it."""


@dataclass(frozen=True)
class ServingArtifact:
    """The artifact a model version serves on this server's target."""

    sha256: str
    size_bytes: int
    kind: int


class RegistryModelSource:
    """Resolves versions in the registry and puts their serving artifacts on local disk."""

    def __init__(self, stub: registry_pb2_grpc.RegistryStub, cache: ArtifactCache, target: str,
                 aliases: Mapping[str, str], *, timeout: float = 30.0, download_timeout: float = 600.0,
                 retry: RetryBudget = DEFAULT_RETRY) -> None:
        self.stub = stub
        self.cache = cache
        self.target = target
        self.aliases = dict(aliases)  # model -> the alias this server follows
        self.timeout = timeout
        self.download_timeout = download_timeout
        self.retry = retry
        self._artifacts: dict[tuple[str, int], ServingArtifact] = {}

    def alias_for(self, name: str) -> str:
        """The alias an empty version means for `name`."""
        return self.aliases.get(name, DEFAULT_ALIAS)

    async def fetch(self, name: str, version: str = "") -> LocalModel:
        """The serving artifact of `name` at `version` ("" = where its alias points), verified on disk."""
        check_name("model name", name)
        number = _version_number(version) if version else await self.resolve_alias(name, self.alias_for(name))
        artifact = self._artifacts.get((name, number)) or await self._serving_artifact_of(name, number)
        return await self.download(name, number, artifact)

    async def available(self) -> dict[str, list[str]]:
        """The models this server follows (the registry is the catalogue of their versions)."""
        return {name: [] for name in sorted(self.aliases)}

    async def resolve_alias(self, name: str, alias: str) -> int:
        """The version `alias` of `name` points at (AliasMissing when there is none); its serving
        artifact for this target, if any, is remembered."""
        request = pb.ResolveAliasRequest(model=name, alias=alias)
        try:
            response = await self._call(lambda: self.stub.ResolveAlias(request, timeout=self.timeout),
                                        f"resolving alias '{alias}' of model '{name}'")
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                raise AliasMissing(f"the registry has no alias '{alias}' of model '{name}': {exc.details()}") from None
            raise registry_error(exc, f"resolving alias '{alias}' of model '{name}'") from None
        self._remember_choice(response.version)
        return response.alias.version

    def remember(self, name: str, version: int, artifacts: list[events_pb2.TargetArtifact]) -> None:
        """Remember this target's artifact among a promotion's serving artifacts (they are write-once)."""
        for entry in artifacts:
            if entry.target == self.target:
                ref = entry.artifact
                self._artifacts[(name, version)] = ServingArtifact(ref.sha256, ref.size_bytes, ref.kind)

    def _remember_choice(self, version: pb.ModelVersion) -> ServingArtifact | None:
        for choice in version.serving_choices:
            if choice.target == self.target:
                artifact = choice.artifact
                found = ServingArtifact(artifact.sha256, artifact.size_bytes, artifact.kind)
                self._artifacts[(version.model, version.version)] = found
                return found
        return None

    async def _serving_artifact_of(self, name: str, version: int) -> ServingArtifact:
        request = pb.GetVersionRequest(model=name, version=version)
        try:
            record = await self._call(lambda: self.stub.GetVersion(request, timeout=self.timeout),
                                      f"reading version {version} of model '{name}'")
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                raise NotFound(f"the registry has no version {version} of model '{name}': {exc.details()}") from None
            raise registry_error(exc, f"reading version {version} of model '{name}'") from None
        found = self._remember_choice(record)
        if found is None:
            targets = ", ".join(sorted(c.target for c in record.serving_choices)) or "none"
            raise NotServable(f"model '{name}' version {version} has no serving choice for target "
                              f"'{self.target}' (serving choices: {targets}); not servable here", version)
        return found

    async def download(self, name: str, version: int, artifact: ServingArtifact) -> LocalModel:
        """Put `artifact` on local disk (cached by digest, verified) as version `version` of `name`."""
        if artifact.kind not in SERVABLE_KINDS:
            raise NotServable(f"model '{name}' version {version}: the serving choice for target '{self.target}' is "
                              f"a {common_pb2.ArtifactKind.Name(artifact.kind)} artifact; this server loads "
                              "ONNX models and TensorRT plans only", version)
        if artifact.kind == common_pb2.TENSORRT_PLAN:
            _check_tensorrt(name, version)

        def chunks() -> AsyncIterator[bytes]:
            call = self.stub.DownloadArtifact(pb.DownloadArtifactRequest(sha256=artifact.sha256),
                                              timeout=self.download_timeout)
            return _artifact_chunks(call, name, version, artifact.sha256)

        what = f"downloading artifact {artifact.sha256[:12]} of model '{name}' version {version}"
        try:
            path = await self._call(lambda: self.cache.obtain(artifact.sha256, chunks, artifact.size_bytes,
                                                              ARTIFACT_FILES[artifact.kind]), what)
        except grpc.aio.AioRpcError as exc:
            raise registry_error(exc, what) from None
        return LocalModel(name, str(version), path, artifact.sha256)

    async def _call(self, call: Callable[[], Awaitable[T]], what: str) -> T:
        """A registry call, retried while it fails transiently (within `self.retry`)."""
        return await retry_transient(call, what=what, budget=self.retry)


def registry_error(exc: grpc.aio.AioRpcError, what: str) -> DomainError:
    """A registry call's failure as this server's client sees it: still unreachable after the retries,
    or refused, is UNAVAILABLE (retry later); a request the registry finds malformed is INVALID_ARGUMENT."""
    if exc.code() == grpc.StatusCode.INVALID_ARGUMENT:
        return InvalidArgument(f"{what}: the registry refused the request: {exc.details()}")
    return Unavailable(f"{what}: the registry answered {exc.code().name} ({exc.details()}); retry later")


def _check_tensorrt(name: str, version: int) -> None:
    """Refuse a plan before downloading it where TensorRT cannot run it."""
    capability = detect_capability()
    if not capability.available:
        raise NotServable(f"model '{name}' version {version}: the serving choice is a TensorRT plan and this "
                          f"replica cannot serve TensorRT plans: {capability.reason}; not servable here", version)


async def _artifact_chunks(call: grpc.aio.UnaryStreamCall, name: str, version: int,
                           sha256: str) -> AsyncIterator[bytes]:
    """The content chunks of a DownloadArtifact stream (its first message is the record)."""
    try:
        async for message in call:
            if message.WhichOneof("part") == "chunk":
                yield message.chunk
            elif message.artifact.sha256 != sha256:
                raise ModelLoadError(f"the registry answered artifact {message.artifact.sha256[:12]} "
                                     f"for {sha256[:12]}")
    except grpc.aio.AioRpcError as exc:
        if exc.code() == grpc.StatusCode.NOT_FOUND:
            raise NotServable(f"model '{name}' version {version}: the registry cannot deliver artifact "
                              f"{sha256[:12]}: {exc.details()}", version) from None
        raise
    finally:
        call.cancel()


def _version_number(version: str) -> int:
    try:
        return parse_version(version)
    except ValueError as exc:
        raise InvalidArgument(str(exc)) from None
