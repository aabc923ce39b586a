"""The registry through its gRPC API: datasets, models, versions, artifacts, aliases and policies.

Reads page through list RPCs; `publish_dataset` creates the dataset when missing and streams the
`.npz` (the registry then announces `data.updated.<dataset>`); `promote` moves an alias and
`rollback` moves it back to where its latest move started.
"""

from __future__ import annotations

import getpass
import hashlib
import io
import logging
import os
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from google.protobuf import json_format
from google.protobuf.message import Message

from splitstack.client.sdk.errors import PlatformError, call
from splitstack.registry.v1 import registry_pb2 as rpb
from splitstack.registry.v1 import registry_pb2_grpc

log = logging.getLogger(__name__)

SERVICE = "registry"
CHUNK_BYTES = 1024 * 1024


def default_actor() -> str:
    """Who the SDK says moved an alias when the caller does not say: `<user>@sdk`."""
    try:
        return f"{getpass.getuser()}@sdk"
    except (KeyError, OSError):
        return "sdk"


def to_message(value: Message | Mapping[str, Any], cls: type[Message], what: str) -> Message:
    """`value` as a `cls` message: as is, or parsed from a mapping in protobuf JSON form."""
    if isinstance(value, cls):
        return value
    if not isinstance(value, Mapping):
        raise ValueError(f"{what} must be a {cls.DESCRIPTOR.name} or a mapping, got {type(value).__name__}")
    fields = cls.DESCRIPTOR.fields
    unknown = sorted(str(k) for k in value if k not in {f.name for f in fields} | {f.json_name for f in fields})
    if unknown:
        raise ValueError(f"{what}: unknown field(s) {', '.join(unknown)} (known: {', '.join(f.name for f in fields)})")
    try:
        return json_format.ParseDict(dict(value), cls())
    except json_format.ParseError as exc:
        raise ValueError(f"{what}: {' '.join(str(exc).split())}") from None


def dataset_bytes(source: Any) -> bytes:
    """The `.npz` content of a dataset source: a file path, bytes, or a mapping of arrays."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source)
    if isinstance(source, Mapping):
        buffer = io.BytesIO()
        np.savez(buffer, **{str(k): np.asarray(v) for k, v in source.items()})
        return buffer.getvalue()
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise ValueError(f"dataset file {path} does not exist (or is not a file)")
        return path.read_bytes()
    raise ValueError(f"a dataset source is a file path, bytes or a mapping of arrays, got {type(source).__name__}")


def paged(fetch: Callable[[str], Any], field: str) -> Iterator[Any]:
    """Every item of a paged list RPC (`fetch(page_token)` returns one page)."""
    token = ""
    while True:
        page = fetch(token)
        yield from getattr(page, field)
        token = page.next_page_token
        if not token:
            return


class RegistryClient:
    """The registry's RPCs with the SDK's conventions (PlatformError, defaults, paging)."""

    def __init__(self, channel: grpc.Channel, timeout: float) -> None:
        self.stub = registry_pb2_grpc.RegistryStub(channel)
        self.timeout = timeout

    def _call(self, method: str, request: Message) -> Any:
        return call(SERVICE, getattr(self.stub, method), request, self.timeout)

    # --- datasets ------------------------------------------------------------------------------

    def ensure_dataset(self, dataset: str, description: str = "") -> rpb.Dataset:
        """The dataset, created when missing."""
        try:
            return self._call("GetDataset", rpb.GetDatasetRequest(name=dataset))
        except PlatformError as exc:
            if exc.code != grpc.StatusCode.NOT_FOUND:
                raise
        try:
            return self._call("CreateDataset", rpb.CreateDatasetRequest(
                dataset=rpb.Dataset(name=dataset, description=description)))
        except PlatformError as exc:   # created meanwhile by someone else
            if exc.code != grpc.StatusCode.ALREADY_EXISTS:
                raise
            return self._call("GetDataset", rpb.GetDatasetRequest(name=dataset))

    def publish_dataset(self, dataset: str, source: Any, *, metadata: Mapping[str, str] | None = None,
                        idempotency_key: str | None = None, description: str = "") -> rpb.DatasetVersion:
        """Upload a new version of `dataset` (created if missing); the registry announces data.updated."""
        data = dataset_bytes(source)
        self.ensure_dataset(dataset, description)
        header = rpb.DatasetVersionHeader(dataset=dataset, sha256=hashlib.sha256(data).hexdigest(),
                                          size_bytes=len(data), metadata={str(k): str(v) for k, v in (metadata or {}).items()},
                                          idempotency_key=idempotency_key or "")

        def parts() -> Iterator[rpb.UploadDatasetVersionRequest]:
            yield rpb.UploadDatasetVersionRequest(header=header)
            for start in range(0, len(data), CHUNK_BYTES):
                yield rpb.UploadDatasetVersionRequest(chunk=data[start:start + CHUNK_BYTES])
        version = call(SERVICE, self.stub.UploadDatasetVersion, parts(), max(self.timeout, 120.0))
        log.info("published %s version %d (%d bytes, %d rows)", dataset, version.version, len(data), version.row_count)
        return version

    def datasets(self) -> list[rpb.Dataset]:
        return list(paged(lambda token: self._call("ListDatasets", rpb.ListDatasetsRequest(page_token=token)),
                          "datasets"))

    def dataset(self, dataset: str) -> rpb.Dataset:
        return self._call("GetDataset", rpb.GetDatasetRequest(name=dataset))

    def dataset_versions(self, dataset: str) -> list[rpb.DatasetVersion]:
        return list(paged(lambda token: self._call("ListDatasetVersions", rpb.ListDatasetVersionsRequest(
            dataset=dataset, page_token=token)), "versions"))

    def dataset_version(self, dataset: str, version: int = 0) -> rpb.DatasetVersion:
        return self._call("GetDatasetVersion", rpb.GetDatasetVersionRequest(dataset=dataset, version=version))

    # --- models, versions, artifacts -----------------------------------------------------------

    def models(self) -> list[rpb.Model]:
        return list(paged(lambda token: self._call("ListModels", rpb.ListModelsRequest(page_token=token)), "models"))

    def model(self, name: str) -> rpb.Model:
        return self._call("GetModel", rpb.GetModelRequest(name=name))

    def versions(self, model: str) -> list[rpb.ModelVersion]:
        return list(paged(lambda token: self._call("ListVersions", rpb.ListVersionsRequest(
            model=model, page_token=token)), "versions"))

    def version(self, model: str, version: int) -> rpb.ModelVersion:
        return self._call("GetVersion", rpb.GetVersionRequest(model=model, version=version))

    def artifacts(self, model: str, version: int) -> list[rpb.Artifact]:
        return list(self._call("ListArtifacts", rpb.ListArtifactsRequest(model=model, version=version)).artifacts)

    def lineage(self, model: str, version: int) -> rpb.GetLineageResponse:
        return self._call("GetLineage", rpb.GetLineageRequest(model=model, version=version))

    def serving_choice(self, model: str, version: int, target: str) -> rpb.ServingChoice:
        return self._call("GetServingChoice", rpb.GetServingChoiceRequest(model=model, version=version, target=target))

    def set_promotion_policy(self, model: str, policy: Any, actor: str | None = None) -> rpb.Model:
        policy = to_message(policy, rpb.PromotionPolicy, "promotion policy")
        return self._call("SetPromotionPolicy", rpb.SetPromotionPolicyRequest(
            model=model, policy=policy, actor=actor or default_actor()))

    # --- aliases -------------------------------------------------------------------------------

    def aliases(self, model: str) -> list[rpb.Alias]:
        return list(self._call("ListAliases", rpb.ListAliasesRequest(model=model)).aliases)

    def alias(self, model: str, alias: str) -> rpb.Alias | None:
        """Where `alias` points now, or None when it does not exist (an unknown model still fails)."""
        return next((a for a in self.aliases(model) if a.alias == alias), None)

    def resolve(self, model: str, alias: str) -> rpb.ResolveAliasResponse:
        return self._call("ResolveAlias", rpb.ResolveAliasRequest(model=model, alias=alias))

    def alias_history(self, model: str, alias: str = "") -> list[rpb.AliasMove]:
        return list(self._call("GetAliasHistory", rpb.GetAliasHistoryRequest(model=model, alias=alias)).moves)

    def promote(self, model: str, version: int, alias: str = "production", *, reason: str = "",
                actor: str | None = None) -> rpb.Alias:
        """Point `alias` at `version` (the registry announces model.promoted when it moves)."""
        return self._call("SetAlias", rpb.SetAliasRequest(model=model, alias=alias, version=version,
                                                          actor=actor or default_actor(), reason=reason))

    def rollback(self, model: str, alias: str = "production", *, reason: str = "",
                 actor: str | None = None) -> rpb.Alias:
        """Move `alias` back to the version it named before its latest move."""
        moves = self.alias_history(model, alias)
        if not moves or moves[-1].from_version == 0:
            created = f" (it was created at version {moves[-1].to_version})" if moves else ""
            raise PlatformError(SERVICE, grpc.StatusCode.FAILED_PRECONDITION,
                                f"alias {alias!r} of model {model!r} has no earlier version to roll back to{created}")
        last = moves[-1]
        log.info("rolling %s@%s back from version %d to %d", model, alias, last.to_version, last.from_version)
        return self.promote(model, last.from_version, alias, actor=actor,
                            reason=reason or f"rollback from version {last.to_version}")
