"""The registry's rules at the core level, in process, on SQLite and on PostgreSQL.

Every rule of the registry design is exercised against core.Registry with a real database and a
local blob store: error codes and the field they name, idempotent retries, immutability, version
numbering, and the outbox rows that announce each change (subject, payload, exactly once). Bad
input must leave no row, no event and no blob behind.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from sqlalchemy import Engine, select

from splitstack.chassis.bus import connect_bus
from splitstack.chassis.config import ChassisSettings
from splitstack.chassis.errors import status_for
from splitstack.chassis.outbox import Outbox, OutboxRelay
from splitstack.common.v1 import common_pb2 as c
from splitstack.contracts.envelope import unwrap
from splitstack.events.v1 import events_pb2
from splitstack.registry.v1 import registry_pb2 as pb
from splitstack_registry import tables
from splitstack_registry.blobs import LocalBlobStore
from splitstack_registry.core import Registry
from splitstack_registry.migrations import upgrade_to_head
from splitstack_registry.store import Store, open_engine

LIMIT = 1 << 20


class Harness:
    """A Registry over a migrated database and a local blob directory, plus views of what they hold."""

    def __init__(self, url: str, root: Path) -> None:
        self.engine: Engine = open_engine(url)
        upgrade_to_head(self.engine)
        self.root = root
        self.blobs = LocalBlobStore(root / "artifacts")
        self.wakes = 0
        self.registry = Registry(Store(self.engine, Outbox(tables.outbox, "registry/test")), self.blobs,
                                 max_upload_bytes=LIMIT, chunk_bytes=1000, on_events=self._woken)

    def _woken(self) -> None:
        self.wakes += 1

    def events(self, prefix: str = "") -> list[tuple[str, str, object]]:
        """(subject, event id, payload) of every outbox row, oldest first."""
        o = tables.outbox
        with self.engine.connect() as conn:
            rows = conn.execute(select(o.c.subject, o.c.event_id, o.c.data).order_by(o.c.id)).all()
        return [(r.subject, r.event_id, unwrap(bytes(r.data)).payload) for r in rows if r.subject.startswith(prefix)]

    def count(self, table: object) -> int:
        return self.registry.store.read(lambda tx: tx.count(table))

    def stored_blobs(self) -> list[Path]:
        return sorted(p for p in (self.root / "artifacts" / "sha256").rglob("*") if p.is_file())

    def close(self) -> None:
        self.registry.close()
        self.blobs.close()
        self.engine.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def harness(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Harness]:
    url = f"sqlite:///{tmp_path}/registry.db" if request.param == "sqlite" else request.getfixturevalue("postgres_url")
    h = Harness(url, tmp_path)
    yield h
    h.close()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


async def stream(data: bytes, chunk: int = 1000) -> AsyncIterator[bytes]:
    for i in range(0, len(data), chunk):
        yield data[i:i + chunk]


async def untouched() -> AsyncIterator[bytes]:
    """A stream that fails the test if anything reads it."""
    raise AssertionError("the upload stream was read although the request had to be answered first")
    yield b""  # pragma: no cover


def npz(**arrays: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def code_of(exc: BaseException) -> grpc.StatusCode | None:
    return status_for(exc)  # type: ignore[arg-type]


async def expect(code: grpc.StatusCode, awaitable: object, *words: str) -> str:
    """Await and require a domain error with `code` whose message holds every word."""
    with pytest.raises(Exception) as failure:
        await awaitable  # type: ignore[misc]
    assert code_of(failure.value) == code, f"{failure.value!r}"
    message = str(failure.value)
    for word in words:
        assert word in message, f"{word!r} not in {message!r}"
    return message


async def upload(r: Registry, model: str, version: int, kind: int, content: bytes, *, target: str = "",
                 precision: int = c.PRECISION_UNSPECIFIED, **fields: object) -> pb.Artifact:
    header = pb.ArtifactHeader(model=model, version=version, kind=kind, target=target, precision=precision,
                               sha256=sha(content), size_bytes=len(content), **fields)
    return await r.upload_artifact(header, stream(content))


async def ready_version(r: Registry, model: str = "digits", **request: object) -> pb.ModelVersion:
    """A model (created if needed) with a new version holding the hand-off artifacts, finalized."""
    await r.create_model(pb.Model(name=model, required_targets=["cpu"]))
    version = await r.create_version(pb.CreateVersionRequest(model=model, **request))
    await upload(r, model, version.version, c.EXPORTED_PROGRAM, b"program %d" % version.version)
    await upload(r, model, version.version, c.SAMPLE, b"sample %d" % version.version)
    return await r.finalize_version(model, version.version)


# ---- models -------------------------------------------------------------------------------------

async def test_create_model_is_idempotent_and_immutable(harness: Harness) -> None:
    r = harness.registry
    wanted = pb.Model(name="digits", description="d", required_targets=["cpu", "t4"], labels={"team": "a"},
                      primary_metric=c.PrimaryMetric(name="accuracy", direction=c.MAXIMIZE))
    first = await r.create_model(wanted)
    assert first.promotion_policy.mode == pb.PromotionPolicy.MANUAL
    assert first.created_at.seconds > 0 and list(first.required_targets) == ["cpu", "t4"]
    assert await r.create_model(wanted) == first
    changed = pb.Model()
    changed.CopyFrom(wanted)
    changed.labels["team"] = "b"
    await expect(grpc.StatusCode.ALREADY_EXISTS, r.create_model(changed), "digits", "labels")
    assert await r.get_model("digits") == first
    assert harness.count(tables.models) == 1


@pytest.mark.parametrize("model, field", [
    (pb.Model(name="Digits"), "model.name"),
    (pb.Model(name=""), "model.name"),
    (pb.Model(name="m", required_targets=["CPU"]), "model.required_targets"),
    (pb.Model(name="m", required_targets=["cpu", "cpu"]), "model.required_targets"),
    (pb.Model(name="m", promotion_policy=pb.PromotionPolicy(mode=pb.PromotionPolicy.AUTO)), "metric"),
    (pb.Model(name="m", primary_metric=c.PrimaryMetric(direction=c.MINIMIZE)), "model.primary_metric.name"),
])
async def test_create_model_rejects_bad_input(harness: Harness, model: pb.Model, field: str) -> None:
    await expect(grpc.StatusCode.INVALID_ARGUMENT, harness.registry.create_model(model), field)
    assert harness.count(tables.models) == 0


async def test_list_models_pages(harness: Harness) -> None:
    r = harness.registry
    for name in ("c", "a", "b"):
        await r.create_model(pb.Model(name=name))
    first, token = await r.list_models(2, "")
    assert [m.name for m in first] == ["a", "b"] and token
    rest, end = await r.list_models(2, token)
    assert [m.name for m in rest] == ["c"] and end == ""
    await expect(grpc.StatusCode.INVALID_ARGUMENT, r.list_models(2, "garbage!"), "page_token")
    await expect(grpc.StatusCode.INVALID_ARGUMENT, r.list_models(-1, ""), "page_size")
    await expect(grpc.StatusCode.NOT_FOUND, r.get_model("nope"), "model 'nope'")


async def test_promotion_policy_is_the_mutable_part_of_a_model(harness: Harness) -> None:
    r = harness.registry
    spec = pb.Model(name="digits")
    await r.create_model(spec)
    auto = pb.PromotionPolicy(mode=pb.PromotionPolicy.AUTO, metric="accuracy", direction=c.MAXIMIZE, margin=0.01)
    assert (await r.set_promotion_policy("digits", auto, "alice")).promotion_policy == auto
    assert (await r.get_model("digits")).promotion_policy == auto
    assert (await r.create_model(spec)).promotion_policy == auto   # a retried create does not reset it
    for bad, field in [(pb.PromotionPolicy(), "policy.mode"),
                       (pb.PromotionPolicy(mode=pb.PromotionPolicy.AUTO, metric="accuracy"), "policy.direction"),
                       (pb.PromotionPolicy(mode=pb.PromotionPolicy.MANUAL, margin=-1), "policy.margin"),
                       (pb.PromotionPolicy(mode=pb.PromotionPolicy.MANUAL, margin=float("nan")), "policy.margin")]:
        await expect(grpc.StatusCode.INVALID_ARGUMENT, r.set_promotion_policy("digits", bad, "bob"), field)
    assert (await r.get_model("digits")).promotion_policy == auto
    manual = pb.PromotionPolicy(mode=pb.PromotionPolicy.MANUAL)
    await expect(grpc.StatusCode.NOT_FOUND, r.set_promotion_policy("other", manual, "bob"), "model 'other'")
    assert harness.events() == []


# ---- versions -----------------------------------------------------------------------------------

async def test_versions_are_numbered_without_gaps_and_keys_make_retries_idempotent(harness: Harness) -> None:
    r = harness.registry
    await r.create_model(pb.Model(name="digits"))
    lineage = pb.Lineage(training_job="job-1", hyperparameters={"lr": "0.1"})
    first = await r.create_version(pb.CreateVersionRequest(model="digits", idempotency_key="job-1", lineage=lineage))
    assert (first.version, first.state, first.idempotency_key) == (1, pb.PENDING, "job-1")
    retry = await r.create_version(pb.CreateVersionRequest(model="digits", idempotency_key="job-1", lineage=lineage))
    assert retry == first
    other = pb.Lineage(training_job="job-1", hyperparameters={"lr": "0.2"})
    await expect(grpc.StatusCode.ALREADY_EXISTS,
                 r.create_version(pb.CreateVersionRequest(model="digits", idempotency_key="job-1", lineage=other)),
                 "job-1", "lineage")
    unkeyed = [await r.create_version(pb.CreateVersionRequest(model="digits")) for _ in range(2)]
    assert [v.version for v in unkeyed] == [2, 3]
    listed, token = await r.list_versions("digits", 2, "")
    assert [v.version for v in listed] == [1, 2] and token
    assert [v.version for v in (await r.list_versions("digits", 2, token))[0]] == [3]
    assert harness.count(tables.versions) == 3 and harness.events() == []


async def test_create_version_checks_model_lineage_and_stores_nothing_on_bad_input(harness: Harness) -> None:
    r = harness.registry
    await expect(grpc.StatusCode.NOT_FOUND, r.create_version(pb.CreateVersionRequest(model="nope")), "model 'nope'")
    await r.create_model(pb.Model(name="digits"))
    await r.create_dataset(pb.Dataset(name="mnist"))
    data = npz(inputs=np.zeros((5, 2)))
    await r.upload_dataset_version(pb.DatasetVersionHeader(dataset="mnist", sha256=sha(data), size_bytes=len(data)),
                                   stream(data))
    bad = [
        (pb.CreateVersionRequest(model="Digits"), grpc.StatusCode.INVALID_ARGUMENT, "model"),
        (pb.CreateVersionRequest(model="digits", lineage=pb.Lineage(dataset="mnist")),
         grpc.StatusCode.INVALID_ARGUMENT, "lineage.dataset_version"),
        (pb.CreateVersionRequest(model="digits", lineage=pb.Lineage(dataset="other", dataset_version=1)),
         grpc.StatusCode.NOT_FOUND, "dataset 'other'"),
        (pb.CreateVersionRequest(model="digits", lineage=pb.Lineage(dataset="mnist", dataset_version=2)),
         grpc.StatusCode.NOT_FOUND, "no version 2"),
        (pb.CreateVersionRequest(model="digits", lineage=pb.Lineage(dataset="mnist", dataset_version=1,
                                                                     dataset_digest="0" * 64)),
         grpc.StatusCode.INVALID_ARGUMENT, "lineage.dataset_digest"),
        (pb.CreateVersionRequest(model="digits", lineage=pb.Lineage(parent_version=7)),
         grpc.StatusCode.NOT_FOUND, "lineage.parent_version"),
        (pb.CreateVersionRequest(model="digits", idempotency_key="k" * 256), grpc.StatusCode.INVALID_ARGUMENT,
         "idempotency_key"),
    ]
    for request, code, word in bad:
        await expect(code, r.create_version(request), word)
    assert harness.count(tables.versions) == 0
    version = await r.create_version(pb.CreateVersionRequest(
        model="digits", lineage=pb.Lineage(dataset="mnist", dataset_version=1)))
    assert version.version == 1 and version.lineage.dataset_digest == sha(data)


async def test_finalize_needs_program_and_sample_and_announces_once(harness: Harness) -> None:
    r = harness.registry
    await r.create_model(pb.Model(name="digits", required_targets=["cpu", "t4"]))
    signature = c.Signature(inputs=[c.TensorSpec(name="x", dtype=c.FP32, shape=[-1, 64])])
    lineage = pb.Lineage(training_job="j", metrics={"accuracy": 0.97})
    v = await r.create_version(pb.CreateVersionRequest(model="digits", lineage=lineage, signature=signature))
    await expect(grpc.StatusCode.FAILED_PRECONDITION, r.finalize_version("digits", 1), "EXPORTED_PROGRAM", "SAMPLE")
    program = await upload(r, "digits", v.version, c.EXPORTED_PROGRAM, b"program", precision=c.PRECISION_FP32)
    message = await expect(grpc.StatusCode.FAILED_PRECONDITION, r.finalize_version("digits", 1), "SAMPLE")
    assert "EXPORTED_PROGRAM" not in message
    sample = await upload(r, "digits", v.version, c.SAMPLE, b"sample")
    assert harness.events() == [] and harness.wakes == 0
    ready = await r.finalize_version("digits", 1)
    assert ready.state == pb.READY and ready.finalized_at.seconds > 0
    assert await r.finalize_version("digits", 1) == ready
    [(subject, event_id, payload)] = harness.events()
    assert subject == "model.registered.digits" and event_id.startswith("model.registered:digits:")
    assert isinstance(payload, events_pb2.ModelRegistered)
    assert (payload.model, payload.version, list(payload.required_targets)) == ("digits", 1, ["cpu", "t4"])
    assert payload.lineage == lineage and payload.signature == signature
    assert [(a.kind, a.sha256, a.size_bytes) for a in payload.artifacts] == [
        (c.EXPORTED_PROGRAM, program.sha256, 7), (c.SAMPLE, sample.sha256, 6)]
    assert harness.wakes == 1
    await expect(grpc.StatusCode.NOT_FOUND, r.finalize_version("digits", 2), "no version 2")
    await expect(grpc.StatusCode.NOT_FOUND, r.get_version("other", 1), "model 'other'")
    await expect(grpc.StatusCode.INVALID_ARGUMENT, r.get_version("digits", 0), "version")


# ---- artifacts ----------------------------------------------------------------------------------

async def test_artifact_round_trip_and_immutability(harness: Harness) -> None:
    r = harness.registry
    await r.create_model(pb.Model(name="digits"))
    await r.create_version(pb.CreateVersionRequest(model="digits"))
    content = np.random.default_rng(1).bytes(300_000)
    profile = c.MeasuredProfile(target="cpu", accuracy=0.9)
    stored = await upload(r, "digits", 1, c.CHECKPOINT, content, filename="last.ckpt", metadata={"epoch": "3"},
                          profile=profile)
    assert (stored.model, stored.version, stored.sha256, stored.size_bytes) == ("digits", 1, sha(content), len(content))
    assert stored.filename == "last.ckpt" and dict(stored.metadata) == {"epoch": "3"} and stored.profile == profile
    header = pb.ArtifactHeader(model="digits", version=1, kind=c.CHECKPOINT, sha256=sha(content),
                               size_bytes=len(content))
    assert await r.upload_artifact(header, untouched()) == stored          # same key, same digest
    other = pb.ArtifactHeader(model="digits", version=1, kind=c.CHECKPOINT, sha256=sha(b"x"), size_bytes=1)
    await expect(grpc.StatusCode.ALREADY_EXISTS, r.upload_artifact(other, untouched()), "CHECKPOINT", sha(content))
    for request in (pb.DownloadArtifactRequest(sha256=sha(content)),
                    pb.DownloadArtifactRequest(model="digits", version=1, kind=c.CHECKPOINT)):
        record, chunks = await r.download_artifact(request)
        assert record == stored
        received = [chunk async for chunk in chunks]
        assert b"".join(received) == content and max(len(x) for x in received) <= 1000
    assert await r.list_artifacts("digits", 1) == [stored]
    await expect(grpc.StatusCode.NOT_FOUND, r.download_artifact(pb.DownloadArtifactRequest(sha256=sha(b"none"))),
                 sha(b"none"))
    await expect(grpc.StatusCode.NOT_FOUND,
                 r.download_artifact(pb.DownloadArtifactRequest(model="digits", version=1, kind=c.SAMPLE)), "SAMPLE")


async def test_training_artifacts_close_at_finalize_conversion_artifacts_do_not(harness: Harness) -> None:
    r = harness.registry
    v = await ready_version(r)
    await expect(grpc.StatusCode.FAILED_PRECONDITION, upload(r, "digits", v.version, c.CHECKPOINT, b"late"),
                 "READY", "CHECKPOINT")
    onnx = await upload(r, "digits", v.version, c.ONNX, b"onnx", target="cpu", precision=c.PRECISION_INT8,
                        format=c.ONNX_INT8)
    assert onnx.target == "cpu" and onnx.format == c.ONNX_INT8
    # the retried upload of a training artifact after finalize answers with the stored record
    again = pb.ArtifactHeader(model="digits", version=v.version, kind=c.SAMPLE, sha256=sha(b"sample 1"),
                              size_bytes=8)
    assert (await r.upload_artifact(again, untouched())).sha256 == sha(b"sample 1")


@pytest.mark.parametrize("fields, code, word", [
    (dict(kind=c.ARTIFACT_KIND_UNSPECIFIED), grpc.StatusCode.INVALID_ARGUMENT, "kind"),
    (dict(kind=c.ONNX), grpc.StatusCode.INVALID_ARGUMENT, "target"),
    (dict(kind=c.ONNX, target="Bad Target"), grpc.StatusCode.INVALID_ARGUMENT, "target"),
    (dict(kind=c.CHECKPOINT, target="cpu"), grpc.StatusCode.INVALID_ARGUMENT, "target"),
    (dict(sha256="ABC"), grpc.StatusCode.INVALID_ARGUMENT, "sha256"),
    (dict(size_bytes=LIMIT + 1), grpc.StatusCode.INVALID_ARGUMENT, "max_upload_bytes"),
    (dict(size_bytes=-1), grpc.StatusCode.INVALID_ARGUMENT, "size_bytes"),
    (dict(model="nope"), grpc.StatusCode.NOT_FOUND, "model 'nope'"),
    (dict(version=9), grpc.StatusCode.NOT_FOUND, "no version 9"),
    (dict(version=0), grpc.StatusCode.INVALID_ARGUMENT, "version"),
    (dict(precision=99), grpc.StatusCode.INVALID_ARGUMENT, "precision"),
])
async def test_bad_artifact_headers_are_answered_before_the_content(harness: Harness, fields: dict,
                                                                    code: grpc.StatusCode, word: str) -> None:
    r = harness.registry
    await r.create_model(pb.Model(name="digits"))
    await r.create_version(pb.CreateVersionRequest(model="digits"))
    header = pb.ArtifactHeader(model="digits", version=1, kind=c.CHECKPOINT, sha256=sha(b"abc"), size_bytes=3)
    for name, value in fields.items():
        setattr(header, name, value)
    await expect(code, r.upload_artifact(header, untouched()), word)
    assert harness.count(tables.artifacts) == 0 and harness.stored_blobs() == []


@pytest.mark.parametrize("declared, sent, word", [
    (b"abc", b"abd", "sha256"),
    (b"abc", b"abcd", "size_bytes"),
    (b"abc", b"ab", "size_bytes"),
])
async def test_content_that_is_not_what_the_header_declared_stores_nothing(harness: Harness, declared: bytes,
                                                                         sent: bytes, word: str) -> None:
    r = harness.registry
    await r.create_model(pb.Model(name="digits"))
    await r.create_version(pb.CreateVersionRequest(model="digits"))
    header = pb.ArtifactHeader(model="digits", version=1, kind=c.CHECKPOINT, sha256=sha(declared),
                               size_bytes=len(declared))
    await expect(grpc.StatusCode.INVALID_ARGUMENT, r.upload_artifact(header, stream(sent, 1)), word)
    assert await r.list_artifacts("digits", 1) == [] and harness.stored_blobs() == []


# ---- serving choices ----------------------------------------------------------------------------

async def test_serving_choice_is_write_once_and_announced_once(harness: Harness) -> None:
    r = harness.registry
    await r.create_model(pb.Model(name="digits", required_targets=["cpu"]))
    pending = await r.create_version(pb.CreateVersionRequest(model="digits"))
    onnx_pending = await upload(r, "digits", pending.version, c.ONNX, b"early", target="cpu")
    choice = pb.SetServingChoiceRequest(model="digits", version=1, target="cpu", artifact_sha256=onnx_pending.sha256)
    await expect(grpc.StatusCode.FAILED_PRECONDITION, r.set_serving_choice(choice), "PENDING")
    v = await ready_version(r)
    onnx = await upload(r, "digits", v.version, c.ONNX, b"onnx int8", target="cpu", precision=c.PRECISION_INT8,
                        format=c.ONNX_INT8)
    candidates = [pb.Candidate(format=c.ONNX_INT8, artifact_sha256=onnx.sha256, accepted=True),
                  pb.Candidate(format=c.ONNX_FP32, accepted=False, reason="slower")]
    request = pb.SetServingChoiceRequest(model="digits", version=v.version, target="cpu",
                                         artifact_sha256=onnx.sha256, candidates=candidates, reason="fastest")
    await expect(grpc.StatusCode.NOT_FOUND, r.set_serving_choice(pb.SetServingChoiceRequest(
        model="digits", version=v.version, target="cpu", artifact_sha256=sha(b"absent"))), "artifact_sha256")
    written = await r.set_serving_choice(request)
    assert written.artifact == onnx and list(written.candidates) == candidates and written.reason == "fastest"
    assert await r.set_serving_choice(request) == written
    different = pb.SetServingChoiceRequest()
    different.CopyFrom(request)
    different.reason = "changed my mind"
    await expect(grpc.StatusCode.ALREADY_EXISTS, r.set_serving_choice(different), "write-once")
    assert await r.get_serving_choice("digits", v.version, "cpu") == written
    await expect(grpc.StatusCode.NOT_FOUND, r.get_serving_choice("digits", v.version, "t4"), "'t4'")
    assert (await r.get_version("digits", v.version)).serving_choices == [written]
    [(subject, event_id, payload)] = harness.events("model.converted")
    assert subject == "model.converted.digits.cpu" and event_id.endswith(f":{v.version}:cpu")
    assert payload.serving_choice == written


# ---- datasets -----------------------------------------------------------------------------------

async def test_dataset_versions_are_immutable_numbered_counted_and_announced(harness: Harness) -> None:
    r = harness.registry
    created = await r.create_dataset(pb.Dataset(name="digits", description="8x8 digits"))
    assert await r.create_dataset(pb.Dataset(name="digits", description="8x8 digits")) == created
    await expect(grpc.StatusCode.ALREADY_EXISTS, r.create_dataset(pb.Dataset(name="digits", description="x")),
                 "description")
    contents = [npz(labels=np.zeros(3), inputs=np.zeros((7, 64))), npz(a=np.zeros((4, 2)), x=np.zeros((9, 1))),
                npz(first=np.zeros((11, 2)), second=np.zeros(2))]
    made = []
    for i, data in enumerate(contents):
        header = pb.DatasetVersionHeader(dataset="digits", sha256=sha(data), size_bytes=len(data),
                                         metadata={"n": str(i)}, idempotency_key=f"k{i}")
        made.append(await r.upload_dataset_version(header, stream(data)))
    assert [(v.version, v.row_count) for v in made] == [(1, 7), (2, 9), (3, 11)]
    retry = pb.DatasetVersionHeader(dataset="digits", sha256=sha(contents[0]), size_bytes=len(contents[0]),
                                    metadata={"n": "0"}, idempotency_key="k0")
    assert await r.upload_dataset_version(retry, untouched()) == made[0]
    retry.metadata["n"] = "changed"
    await expect(grpc.StatusCode.ALREADY_EXISTS, r.upload_dataset_version(retry, untouched()), "k0", "metadata")
    assert await r.get_dataset_version("digits", 0) == made[2]
    assert await r.get_dataset_version("digits", 2) == made[1]
    assert (await r.get_dataset("digits")).latest_version == 3
    record, chunks = await r.download_dataset_version("digits", 1)
    assert record == made[0] and b"".join([x async for x in chunks]) == contents[0]
    listed, token = await r.list_dataset_versions("digits", 2, "")
    assert listed == made[:2] and (await r.list_dataset_versions("digits", 2, token))[0] == made[2:]
    announced = harness.events()
    assert [s for s, _, _ in announced] == ["data.updated.digits"] * 3
    assert [p.dataset_version for _, _, p in announced] == made
    assert len({event_id for _, event_id, _ in announced}) == 3


async def test_bad_dataset_uploads_store_nothing(harness: Harness) -> None:
    r = harness.registry
    good = npz(inputs=np.zeros((3, 1)))
    header = pb.DatasetVersionHeader(dataset="digits", sha256=sha(good), size_bytes=len(good))
    await expect(grpc.StatusCode.NOT_FOUND, r.upload_dataset_version(header, untouched()), "dataset 'digits'")
    await r.create_dataset(pb.Dataset(name="digits"))
    await expect(grpc.StatusCode.NOT_FOUND, r.get_dataset_version("digits", 0), "no versions")
    for content, word in [(b"not a zip at all", "not an .npz"), (npz(scalar=np.float32(1.0)), "scalar")]:
        bad = pb.DatasetVersionHeader(dataset="digits", sha256=sha(content), size_bytes=len(content))
        await expect(grpc.StatusCode.INVALID_ARGUMENT, r.upload_dataset_version(bad, stream(content)), word)
    wrong = pb.DatasetVersionHeader(dataset="digits", sha256=sha(b"other"), size_bytes=len(good))
    await expect(grpc.StatusCode.INVALID_ARGUMENT, r.upload_dataset_version(wrong, stream(good)), "sha256")
    await expect(grpc.StatusCode.INVALID_ARGUMENT, r.upload_dataset_version(
        pb.DatasetVersionHeader(dataset="Digits", sha256=sha(good), size_bytes=len(good)), untouched()), "dataset")
    assert harness.count(tables.dataset_versions) == 0 and harness.events() == []
    assert harness.stored_blobs() == []
    assert (await r.get_dataset("digits")).latest_version == 0
    await expect(grpc.StatusCode.NOT_FOUND, r.get_dataset_version("digits", 1), "no version 1")
    await expect(grpc.StatusCode.INVALID_ARGUMENT, r.get_dataset_version("digits", -1), "version")


# ---- aliases and lineage ------------------------------------------------------------------------

async def test_alias_moves_are_recorded_and_announced_with_serving_artifacts(harness: Harness) -> None:
    r = harness.registry
    v1 = await ready_version(r)
    onnx = await upload(r, "digits", 1, c.ONNX, b"onnx", target="cpu", format=c.ONNX_FP32)
    await r.set_serving_choice(pb.SetServingChoiceRequest(model="digits", version=1, target="cpu",
                                                          artifact_sha256=onnx.sha256))
    v2 = await ready_version(r)
    await r.create_version(pb.CreateVersionRequest(model="digits"))  # 3, PENDING
    await expect(grpc.StatusCode.FAILED_PRECONDITION,
                 r.set_alias(pb.SetAliasRequest(model="digits", alias="production", version=3)), "PENDING")
    await expect(grpc.StatusCode.NOT_FOUND,
                 r.set_alias(pb.SetAliasRequest(model="digits", alias="production", version=9)), "no version 9")
    await expect(grpc.StatusCode.INVALID_ARGUMENT,
                 r.set_alias(pb.SetAliasRequest(model="digits", alias="Prod", version=1)), "alias")
    before = len(harness.events())
    first = await r.set_alias(pb.SetAliasRequest(model="digits", alias="production", version=v1.version,
                                                 actor="alice", reason="first"))
    assert (first.version, first.actor, first.reason) == (1, "alice", "first")
    same = await r.set_alias(pb.SetAliasRequest(model="digits", alias="production", version=1, actor="bob"))
    assert same == first                                                  # no move, no event
    await r.set_alias(pb.SetAliasRequest(model="digits", alias="production", version=v2.version, actor="bob"))
    move = await r.delete_alias(pb.DeleteAliasRequest(model="digits", alias="production", actor="carol",
                                                      reason="retired"))
    assert (move.from_version, move.to_version, move.actor, move.reason) == (2, 0, "carol", "retired")
    await expect(grpc.StatusCode.NOT_FOUND, r.delete_alias(pb.DeleteAliasRequest(model="digits", alias="production")),
                 "'production'")
    promoted = harness.events()[before:]
    assert [s for s, _, _ in promoted] == ["model.promoted.digits.production"] * 3
    assert [(p.version, p.previous_version, p.actor) for _, _, p in promoted] == [
        (1, 0, "alice"), (2, 1, "bob"), (0, 2, "carol")]
    serving = promoted[0][2].serving_artifacts
    assert [(t.target, t.artifact.sha256, t.artifact.format) for t in serving] == [("cpu", onnx.sha256, c.ONNX_FP32)]
    assert list(promoted[1][2].serving_artifacts) == [] and len({e for _, e, _ in promoted}) == 3
    history = await r.get_alias_history("digits", "production")
    assert [(m.from_version, m.to_version, m.actor) for m in history] == [(0, 1, "alice"), (1, 2, "bob"),
                                                                          (2, 0, "carol")]
    assert all(m.at.seconds > 0 for m in history)
    await expect(grpc.StatusCode.NOT_FOUND, r.get_alias_history("digits", "staging"), "staging")
    await expect(grpc.StatusCode.NOT_FOUND, r.resolve_alias("digits", "production"), "production")


async def test_resolve_list_and_lineage(harness: Harness) -> None:
    r = harness.registry
    await r.create_dataset(pb.Dataset(name="digits"))
    data = npz(inputs=np.zeros((4, 2)))
    dv = await r.upload_dataset_version(pb.DatasetVersionHeader(dataset="digits", sha256=sha(data),
                                                                size_bytes=len(data)), stream(data))
    v1 = await ready_version(r, lineage=pb.Lineage(dataset="digits", dataset_version=1))
    v2 = await ready_version(r, lineage=pb.Lineage(dataset="digits", dataset_version=1, parent_version=1))
    v3 = await ready_version(r, lineage=pb.Lineage(parent_version=2))
    for alias in ("staging", "production"):
        await r.set_alias(pb.SetAliasRequest(model="digits", alias=alias, version=v3.version))
    alias, version = await r.resolve_alias("digits", "staging")
    assert alias.version == 3 and version == v3
    assert [a.alias for a in await r.list_aliases("digits")] == ["production", "staging"]
    lineage = await r.get_lineage("digits", 3)
    assert lineage.version == v3 and [a.version for a in lineage.ancestors] == [2, 1]
    assert lineage.ancestors[1] == v1 and not lineage.HasField("dataset_version")
    assert sorted(a.alias for a in lineage.aliases) == ["production", "staging"]
    of_two = await r.get_lineage("digits", 2)
    assert of_two.dataset_version == dv and of_two.version == v2 and list(of_two.aliases) == []
    await expect(grpc.StatusCode.NOT_FOUND, r.list_aliases("nope"), "model 'nope'")
    await expect(grpc.StatusCode.NOT_FOUND, r.get_lineage("digits", 4), "no version 4")


async def test_every_event_reaches_jetstream_exactly_once(harness: Harness, nats_server: object) -> None:
    """The outbox rows relay to their streams; a second relay pass (as after a crash) adds nothing."""
    r = harness.registry
    v = await ready_version(r)
    await r.set_alias(pb.SetAliasRequest(model="digits", alias="production", version=v.version))
    await r.create_dataset(pb.Dataset(name="digits"))
    data = npz(x=np.zeros((2, 2)))
    await r.upload_dataset_version(pb.DatasetVersionHeader(dataset="digits", sha256=sha(data), size_bytes=len(data)),
                                   stream(data))
    settings = ChassisSettings(nats_url=nats_server.url, nats_connect_timeout_seconds=10)  # type: ignore[attr-defined]
    bus = await connect_bus(settings, producer="registry/test")
    try:
        await bus.ensure_streams()
        relay = OutboxRelay(harness.engine, tables.outbox, bus)
        assert await relay.relay_once() == 3
        with harness.engine.begin() as conn:   # as if the marks were lost in a crash: publish everything again
            conn.execute(tables.outbox.update().values(published_at=None))
        assert await relay.relay_once() == 3
        models = await bus.js.stream_info("SPLITSTACK_MODELS")
        data_stream = await bus.js.stream_info("SPLITSTACK_DATA")
        assert (models.state.messages, data_stream.state.messages) == (2, 1)
    finally:
        await bus.close()

