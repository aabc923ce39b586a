"""The registry's domain logic: what may be stored, what is returned, and which events announce it.

`Registry` is transport-free and async. Database work runs in its own bounded thread pool as
one transaction per call (store.Store), blobs go through the BlobStore, and errors are chassis
DomainErrors that the server maps to gRPC statuses. Bad input never stores anything: requests are
checked before any write, and a write transaction checks the stored state again under its locks.
After a commit that added events, `crash_point("registry.after_commit")` is passed and the outbox
relay is woken (`on_events`); a crash in between leaves the events pending for the next relay.

The Registry checks what a request carries on its own (names, digests, enums, sizes, and the
bounds of every text, map and repeated field: validation.py) and runs the rest as one transaction
whose body lives beside its kind of record: versions.py (models, versions, lineage), artifacts.py
(artifacts, serving choices), datasets.py and aliases.py; promotion.py evaluates the promotion
policy inside the transaction that completes a version. An upload stores its blob first, then
writes the row referencing it with `write_referencing`, under the blob's lock that the orphan
sweeper (sweeper.py) also takes, so a referenced blob is never swept.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import TypeVar

from sqlalchemy.exc import OperationalError

from splitstack.chassis.errors import Aborted, InvalidArgument, Unavailable
from splitstack.chassis.faults import crash_point
from splitstack.common.v1 import common_pb2
from splitstack.registry.v1 import registry_pb2 as pb
from splitstack_registry import aliases, artifacts, datasets, records, versions
from splitstack_registry.artifacts import CONVERSION_KINDS
from splitstack_registry.blobs import BlobStore, check_declared_size
from splitstack_registry.lookups import require_model, require_version
from splitstack_registry.store import Store, Tx
from splitstack_registry.validation import (
    check_artifact_texts, check_candidates, check_create_version, check_enum, check_long, check_model,
    check_name, check_policy, check_sha256, check_short, check_version, decode_page_token, encode_page_token,
    page_size,
)
from splitstack_registry.versions import kind_name, new_uid

T = TypeVar("T")
AFTER_COMMIT = "registry.after_commit"
BEFORE_RECORD = "registry.upload.before_record"   # a blob is stored, the row referencing it not yet written
DATABASE_THREADS = 8
DEFAULT_POLICY = pb.PromotionPolicy(mode=pb.PromotionPolicy.MANUAL)


def page(items: Sequence[T], limit: int, key: Callable[[T], str | int]) -> tuple[list[T], str]:
    """The first `limit` items and the token of the next page ("" when this is the last)."""
    if len(items) <= limit:
        return list(items), ""
    return list(items[:limit]), encode_page_token(key(items[limit - 1]))


class Registry:
    """Every operation of the registry API, independent of gRPC."""

    def __init__(self, store: Store, blobs: BlobStore, *, max_upload_bytes: int, chunk_bytes: int,
                 max_dataset_array_bytes: int | None = None, on_events: Callable[[], None] = lambda: None,
                 database_threads: int = DATABASE_THREADS) -> None:
        self.store = store
        self.blobs = blobs
        self.max_upload_bytes = max_upload_bytes
        self.max_dataset_array_bytes = max_dataset_array_bytes or 4 * max_upload_bytes
        self.chunk_bytes = chunk_bytes
        self._on_events = on_events
        # Transactions run in threads of their own: a writer waiting for SQLite's lock must never
        # take the last thread of the default pool from the outbox relay that holds the lock
        # and needs a thread to commit. The pool also bounds concurrent transactions.
        self._database = ThreadPoolExecutor(database_threads, thread_name_prefix="registry-db")

    def close(self) -> None:
        """Let the database threads end (transactions in flight finish first)."""
        self._database.shutdown(wait=False, cancel_futures=True)

    # ---- transactions -------------------------------------------------------------------------

    async def _in_database_thread(self, call: Callable[[], T]) -> T:
        try:
            return await asyncio.get_running_loop().run_in_executor(self._database, call)
        except OperationalError as exc:
            raise Unavailable(f"registry database unavailable: {exc.orig}") from exc

    async def read(self, fn: Callable[[Tx], T]) -> T:
        """Run `fn` in a read transaction in a database thread."""
        return await self._in_database_thread(partial(self.store.read, fn))

    async def write(self, fn: Callable[[Tx], T]) -> T:
        """Run `fn` in a write transaction; after a commit that added events, wake the relay."""
        def attempt(tx: Tx) -> tuple[T, bool]:
            return fn(tx), bool(tx.events)

        result, announced = await self._in_database_thread(partial(self.store.write, attempt))
        if announced:
            crash_point(AFTER_COMMIT)
            self._on_events()
        return result

    async def write_referencing(self, sha256: str, fn: Callable[[Tx], T]) -> T:
        """`write` a row that references blob `sha256`: under the blob's lock, and only while it is stored,
        so the orphan sweeper (which takes the same lock) never deletes a blob that a row refers to."""
        crash_point(BEFORE_RECORD)

        def referencing(tx: Tx) -> T:
            tx.lock_blob(sha256)
            if not self.blobs.exists_sync(sha256):
                raise Aborted(f"sha256: the content {sha256} was removed as unreferenced (orphan sweep) while "
                              "this upload was in flight; upload it again")
            return fn(tx)

        return await self.write(referencing)

    # ---- models -------------------------------------------------------------------------------

    async def create_model(self, model: pb.Model) -> pb.Model:
        """Create a model; the same model again returns it, a different one is ALREADY_EXISTS."""
        check_model("model", model)
        policy = model.promotion_policy
        if policy == pb.PromotionPolicy():
            policy = DEFAULT_POLICY
        check_policy("model.promotion_policy", policy)
        return await self.write(partial(versions.create_model, spec=records.model_spec(model), policy=policy))

    async def get_model(self, name: str) -> pb.Model:
        check_name("name", name)
        return await self.read(lambda tx: records.model_record(require_model(tx, name)))

    async def list_models(self, size: int, token: str) -> tuple[list[pb.Model], str]:
        limit, after = page_size(size), decode_page_token(token, str)
        models = await self.read(lambda tx: [records.model_record(r) for r in tx.model_rows(after, limit + 1)])
        return page(models, limit, lambda m: m.name)

    async def set_promotion_policy(self, model: str, policy: pb.PromotionPolicy, actor: str) -> pb.Model:
        """Replace a model's promotion policy (the one mutable part of a model)."""
        check_name("model", model)
        check_policy("policy", policy)
        check_short("actor", actor)
        return await self.write(partial(versions.set_policy, model=model, policy=policy, actor=actor))

    # ---- versions -----------------------------------------------------------------------------

    async def create_version(self, request: pb.CreateVersionRequest) -> pb.ModelVersion:
        """A new PENDING version numbered n+1; a retry with the same idempotency key returns it."""
        check_create_version(request)
        return await self.write(partial(versions.create_version, request=request))

    async def get_version(self, model: str, version: int) -> pb.ModelVersion:
        _check_version_ref(model, version)
        return await self.read(lambda tx: tx.version_record(require_version(tx, model, version)))

    async def list_versions(self, model: str, size: int, token: str) -> tuple[list[pb.ModelVersion], str]:
        check_name("model", model)
        limit, after = page_size(size), decode_page_token(token, int)

        def fetch(tx: Tx) -> list[pb.ModelVersion]:
            require_model(tx, model)
            return [tx.version_record(r) for r in tx.version_rows(model, after, limit + 1)]

        return page(await self.read(fetch), limit, lambda v: v.version)

    async def finalize_version(self, model: str, version: int) -> pb.ModelVersion:
        """PENDING -> READY once it has an exported program and a sample; announce model.registered."""
        _check_version_ref(model, version)
        return await self.write(partial(versions.finalize_version, model=model, version=version))

    async def get_lineage(self, model: str, version: int) -> pb.GetLineageResponse:
        """The version, its dataset version, its ancestors and the aliases pointing at it."""
        _check_version_ref(model, version)
        return await self.read(partial(versions.lineage, model=model, version=version))

    # ---- artifacts ----------------------------------------------------------------------------

    async def upload_artifact(self, header: pb.ArtifactHeader, chunks: AsyncIterator[bytes]) -> pb.Artifact:
        """Store a verified blob and record it as an artifact of a version (immutable per key)."""
        self._check_artifact_header(header)
        existing = await self.read(partial(artifacts.artifact_upload_allowed, header=header, lock=False))
        if existing is not None:
            return existing
        await self.blobs.put_verified(chunks, sha256=header.sha256, size=header.size_bytes,
                                      max_bytes=self.max_upload_bytes)
        return await self.write_referencing(header.sha256, partial(artifacts.add_artifact, header=header))

    def _check_artifact_header(self, header: pb.ArtifactHeader) -> None:
        _check_version_ref(header.model, header.version)
        check_enum("kind", common_pb2.ArtifactKind, header.kind, allow_unspecified=False)
        check_enum("precision", common_pb2.Precision, header.precision)
        check_enum("format", common_pb2.ModelFormat, header.format)
        if header.kind in CONVERSION_KINDS:
            check_name("target", header.target)
        elif header.target:
            raise InvalidArgument(f"target must be empty for a {kind_name(header.kind)} artifact "
                                  f"(only ONNX and TENSORRT_PLAN artifacts belong to a target)")
        check_sha256("sha256", header.sha256)
        check_declared_size(header.size_bytes, self.max_upload_bytes)
        check_artifact_texts(header)

    async def list_artifacts(self, model: str, version: int) -> list[pb.Artifact]:
        _check_version_ref(model, version)
        return await self.read(lambda tx: tx.artifacts(require_version(tx, model, version)))

    async def download_artifact(self, request: pb.DownloadArtifactRequest
                                ) -> tuple[pb.Artifact, AsyncIterator[bytes]]:
        """The artifact (by digest, or by model, version, kind, precision, target) and its content."""
        if request.sha256:
            check_sha256("sha256", request.sha256)
            artifact = await self.read(partial(artifacts.artifact_by_digest, sha256=request.sha256))
        else:
            _check_version_ref(request.model, request.version)
            check_enum("kind", common_pb2.ArtifactKind, request.kind, allow_unspecified=False)
            if request.target:
                check_name("target", request.target)
            artifact = await self.read(partial(artifacts.artifact_by_key, request=request))
        return artifact, await self.blobs.open(artifact.sha256, self.chunk_bytes)

    # ---- serving choices ----------------------------------------------------------------------

    async def set_serving_choice(self, request: pb.SetServingChoiceRequest) -> pb.ServingChoice:
        """Write-once: the artifact of a READY version that `target` serves; announce model.converted."""
        _check_version_ref(request.model, request.version)
        check_name("target", request.target)
        check_sha256("artifact_sha256", request.artifact_sha256)
        check_candidates("candidates", request.candidates)
        check_long("reason", request.reason)
        return await self.write(partial(artifacts.set_serving_choice, request=request))

    async def get_serving_choice(self, model: str, version: int, target: str) -> pb.ServingChoice:
        _check_version_ref(model, version)
        check_name("target", target)
        return await self.read(partial(artifacts.serving_choice, model=model, version=version, target=target))

    # ---- datasets (datasets.py) ---------------------------------------------------------------

    async def create_dataset(self, dataset: pb.Dataset) -> pb.Dataset:
        datasets.check_dataset(dataset)
        return await self.write(partial(datasets.create_dataset, dataset=dataset, uid=new_uid()))

    async def get_dataset(self, name: str) -> pb.Dataset:
        check_name("name", name)
        return await self.read(partial(datasets.get_dataset, name=name))

    async def list_datasets(self, size: int, token: str) -> tuple[list[pb.Dataset], str]:
        limit, after = page_size(size), decode_page_token(token, str)
        found = await self.read(partial(datasets.list_datasets, after=after, limit=limit + 1))
        return page(found, limit, lambda d: d.name)

    async def upload_dataset_version(self, header: pb.DatasetVersionHeader,
                                     chunks: AsyncIterator[bytes]) -> pb.DatasetVersion:
        """Store a verified .npz and register it as the dataset's next immutable version."""
        datasets.check_header(header)
        check_declared_size(header.size_bytes, self.max_upload_bytes)
        existing = await self.read(partial(datasets.existing_version, header=header))
        if existing is not None:
            return existing
        rows = await datasets.store_and_count_rows(self.blobs, header, chunks, self.max_upload_bytes,
                                                   self.max_dataset_array_bytes)
        return await self.write_referencing(header.sha256, partial(datasets.add_version, header=header,
                                                                   row_count=rows))

    async def get_dataset_version(self, dataset: str, version: int) -> pb.DatasetVersion:
        datasets.check_version_ref(dataset, version)
        return await self.read(partial(datasets.get_version, dataset=dataset, version=version))

    async def list_dataset_versions(self, dataset: str, size: int, token: str
                                    ) -> tuple[list[pb.DatasetVersion], str]:
        check_name("dataset", dataset)
        limit, after = page_size(size), decode_page_token(token, int)
        found = await self.read(partial(datasets.list_versions, dataset=dataset, after=after, limit=limit + 1))
        return page(found, limit, lambda v: v.version)

    async def download_dataset_version(self, dataset: str, version: int
                                       ) -> tuple[pb.DatasetVersion, AsyncIterator[bytes]]:
        record = await self.get_dataset_version(dataset, version)
        return record, await self.blobs.open(record.sha256, self.chunk_bytes)

    # ---- aliases (aliases.py) -----------------------------------------------------------------

    async def set_alias(self, request: pb.SetAliasRequest) -> pb.Alias:
        aliases.check_set(request)
        return await self.write(partial(aliases.set_alias, request=request))

    async def delete_alias(self, request: pb.DeleteAliasRequest) -> pb.AliasMove:
        aliases.check_delete(request)
        return await self.write(partial(aliases.delete_alias, request=request))

    async def resolve_alias(self, model: str, alias: str) -> tuple[pb.Alias, pb.ModelVersion]:
        check_name("model", model)
        check_name("alias", alias)
        return await self.read(partial(aliases.resolve_alias, model=model, alias=alias))

    async def list_aliases(self, model: str) -> list[pb.Alias]:
        check_name("model", model)
        return await self.read(partial(aliases.list_aliases, model=model))

    async def get_alias_history(self, model: str, alias: str) -> list[pb.AliasMove]:
        check_name("model", model)
        if alias:
            check_name("alias", alias)
        return await self.read(partial(aliases.alias_history, model=model, alias=alias))


def _check_version_ref(model: str, version: int) -> None:
    check_name("model", model)
    check_version("version", version)
