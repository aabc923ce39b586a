"""The converter's domain logic, free of transport: the Converter API and the work of a pool.

API: request a conversion (announced as conversion.requested through the outbox, for any
target's pool), read, list and watch conversions of this pool's target, list the targets.
Work (`convert`): a version is converted once per target even with redeliveries and several
replicas: (1) a serving choice already in the registry means done; (2) the conversion row is
claimed atomically (a live claim of another replica is waited out: it either finishes or its
lease expires and the claim is taken over); (3) the claim is renewed while the pipeline runs;
(4) the result is stored: SUCCEEDED with the serving choice, or FAILED with a
conversion.failed event committed in the same transaction.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import json
import logging
import shutil
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import Executor
from pathlib import Path
from typing import TypeVar

import grpc

from splitstack.chassis import errors
from splitstack.common.v1 import common_pb2
from splitstack.contracts.events import subject
from splitstack.contracts.names import check_name
from splitstack.converter.v1 import converter_pb2 as pb
from splitstack.events.v1 import events_pb2
from splitstack.registry.v1 import registry_pb2
from splitstack_converter.config import ConverterSettings
from splitstack_converter.conversion import ConversionJob, ConversionRun, Policy
from splitstack_converter.pipeline import PipelineError
from splitstack_converter.pipeline.gate import Tolerance
from splitstack_converter.registry_client import RegistryClient, RegistryRejected
from splitstack_converter.store import TERMINAL, Claim, ConversionStore, Stored, conversion_id, utcnow

log = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000
BUSY_POLL_SECONDS = 1.0
DOMAIN_ERROR_OF = {grpc.StatusCode.NOT_FOUND: errors.NotFound,
                   grpc.StatusCode.FAILED_PRECONDITION: errors.FailedPrecondition,
                   grpc.StatusCode.INVALID_ARGUMENT: errors.InvalidArgument,
                   grpc.StatusCode.ALREADY_EXISTS: errors.AlreadyExists}


class ClaimLost(Exception):
    """Another replica took this conversion over (our lease had expired); stop and let it finish."""


class Converter:
    """One pool's converter: its target, its store, the registry, and how it converts."""

    def __init__(self, settings: ConverterSettings, targets: dict[str, common_pb2.InferenceTarget],
                 store: ConversionStore, registry: RegistryClient, policy: Policy, executor: Executor,
                 wake_relay: Callable[[], None]) -> None:
        self.settings = settings
        self.targets = targets
        self.target = targets[settings.target]
        self.store = store
        self.registry = registry
        self.policy = policy
        self._executor = executor
        self._wake_relay = wake_relay
        self._lease = dt.timedelta(seconds=settings.lease_seconds)

    # ---- API ---------------------------------------------------------------------------------------
    def list_targets(self) -> list[common_pb2.InferenceTarget]:
        return [self.targets[name] for name in sorted(self.targets)]

    async def request(self, model: str, version: int, target: str, tolerance: common_pb2.GateTolerance,
                      requested_by: str) -> pb.Conversion:
        """Announce conversion.requested for (model, version, target); the target's pool converts."""
        self._check_key(model, version, target)
        if target not in self.targets:
            raise errors.NotFound(f"unknown inference target {target!r} (known: {', '.join(sorted(self.targets))})")
        _check_tolerance(tolerance)
        found = await self._registry_call(self.registry.get_version(model, version))
        if found.state != registry_pb2.READY:
            raise errors.FailedPrecondition(f"model {model!r} version {version} is not READY (finalize it first)")
        event = events_pb2.ConversionRequested(model=model, version=version, target=target, tolerance=tolerance,
                                               requested_by=requested_by)
        adder = self.store.event_adder(subject("conversion_requested", model=model, target=target), event)
        now = utcnow()
        record = pb.Conversion(id=conversion_id(model, version, target), model=model, version=version, target=target,
                               state=pb.REQUESTED, tolerance=tolerance)
        record.requested_at.FromDatetime(now)
        if target == self.target.id:
            record = await asyncio.to_thread(self.store.request, record, now, adder)
        else:
            await asyncio.to_thread(self.store.add_event, adder)
        self._wake_relay()
        return record

    async def get(self, model: str, version: int, target: str) -> pb.Conversion:
        return (await self._stored(model, version, target)).record

    async def list(self, model: str, target: str, page_size: int, page_token: str) -> tuple[list[pb.Conversion], str]:
        if model:
            check_name("model", model)
        if target:
            check_name("target", target)
        if not 0 <= page_size <= MAX_PAGE_SIZE:
            raise errors.InvalidArgument(f"page_size must be in 0..{MAX_PAGE_SIZE}, got {page_size}")
        limit = page_size or DEFAULT_PAGE_SIZE
        rows = await asyncio.to_thread(self.store.page, model, target, _decode_token(page_token), limit + 1)
        more = len(rows) > limit
        rows = rows[:limit]
        return rows, _encode_token(rows[-1]) if more else ""

    async def watch(self, model: str, version: int, target: str) -> AsyncIterator[pb.Conversion]:
        """The conversion now, then each change, until it is SUCCEEDED or FAILED."""
        stored = await self._stored(model, version, target)
        revision = None
        while True:
            if stored.revision != revision:
                revision = stored.revision
                yield stored.record
            if stored.record.state in TERMINAL:
                return
            await asyncio.sleep(self.settings.watch_poll_seconds)
            stored = await self._stored(model, version, target)

    # ---- work --------------------------------------------------------------------------------------
    async def convert(self, job: ConversionJob, last_delivery: bool) -> pb.Conversion:
        """Convert `job` once; the final record (FAILED means conversion.failed was committed)."""
        existing = await self.registry.serving_choice(job.model, job.version, job.target)
        if existing is not None:
            log.info("%s already has a serving choice; nothing to do", job.id)
            return await self._record_choice(job, existing)
        claim = await self._claim(job)
        if claim.outcome == "done":
            log.info("%s is %s already; nothing to do", job.id, pb.ConversionState.Name(claim.stored.record.state))
            return claim.stored.record
        return await self._run(job, claim.attempt, last_delivery)

    async def _claim(self, job: ConversionJob) -> Claim:
        base = pb.Conversion(id=job.id, model=job.model, version=job.version, target=job.target,
                             tolerance=job.tolerance)
        while True:
            now = utcnow()
            claim = await asyncio.to_thread(self.store.claim, base, self.settings.instance, job.trigger_event_id,
                                            job.explicit, now, self._lease)
            if claim.outcome != "busy":
                return claim
            left = (claim.stored.lease_until - now).total_seconds()
            log.info("%s is being converted by %s; waiting (lease ends in %.1fs)", job.id, claim.stored.owner, left)
            await asyncio.sleep(min(max(left, 0.05), BUSY_POLL_SECONDS))

    async def _run(self, job: ConversionJob, attempt: int, last_delivery: bool) -> pb.Conversion:
        owner = self.settings.instance
        workdir = Path(self.settings.work_dir) / f"{job.id}-{attempt}"

        async def progress(mutate: Callable[[pb.Conversion], None]) -> None:
            if not await asyncio.to_thread(self.store.progress, job.id, owner, attempt, mutate):
                raise ClaimLost(f"{job.id}: attempt {attempt} was taken over")

        run = ConversionRun(job, self.policy, self.registry, workdir, self._executor, progress)
        heartbeat = asyncio.create_task(self._heartbeat(job.id, attempt), name=f"lease-{job.id}")
        log.info("starting conversion %s (attempt %d, trigger %s)", job.id, attempt, job.trigger_event_id)
        try:
            choice = await run.execute()
        except PipelineError as exc:
            return await self._fail(job, attempt, exc.stage, exc.reason, run)
        except ClaimLost:
            raise
        except asyncio.CancelledError:
            await asyncio.shield(asyncio.to_thread(self.store.release, job.id, owner, attempt, utcnow()))
            raise
        except Exception as exc:  # noqa: BLE001  transient: the registry or database is unavailable
            if last_delivery:
                return await self._fail(job, attempt, run.stage, f"gave up after repeated errors: {exc}", run)
            await asyncio.to_thread(self.store.release, job.id, owner, attempt, utcnow())
            raise
        finally:
            heartbeat.cancel()
            await asyncio.gather(heartbeat, return_exceptions=True)
            await asyncio.to_thread(shutil.rmtree, workdir, True)
        return await self._succeed(job, attempt, choice)

    async def _heartbeat(self, cid: str, attempt: int) -> None:
        while True:
            await asyncio.sleep(self.settings.lease_seconds / 3)
            if not await asyncio.to_thread(self.store.renew, cid, self.settings.instance, attempt,
                                           utcnow() + self._lease):
                log.warning("%s: lost the claim of attempt %d", cid, attempt)
                return

    async def _base_record(self, job: ConversionJob) -> pb.Conversion:
        stored = await asyncio.to_thread(self.store.get, job.id)
        record = pb.Conversion(id=job.id, model=job.model, version=job.version, target=job.target)
        if stored is not None:
            record.CopyFrom(stored.record)
        return record

    async def _succeed(self, job: ConversionJob, attempt: int,
                       choice: registry_pb2.ServingChoice) -> pb.Conversion:
        record = await self._base_record(job)
        _fill_choice(record, choice)
        final = await asyncio.to_thread(self.store.finish, record, utcnow(), None, self.settings.instance, attempt)
        log.info("conversion %s succeeded: serving %s (%s)", job.id,
                 common_pb2.ModelFormat.Name(choice.artifact.format), choice.reason)
        return final

    async def _record_choice(self, job: ConversionJob, choice: registry_pb2.ServingChoice) -> pb.Conversion:
        record = await self._base_record(job)
        if record.state == pb.SUCCEEDED:
            return record
        _fill_choice(record, choice)
        return await asyncio.to_thread(self.store.finish, record, utcnow())

    async def _fail(self, job: ConversionJob, attempt: int, stage: str, reason: str,
                    run: ConversionRun) -> pb.Conversion:
        record = await self._base_record(job)
        candidates = [c.to_pb() for c in run.candidates]
        record.state, record.stage, record.error = pb.FAILED, stage, reason
        del record.candidates[:]
        record.candidates.extend(candidates)
        event = events_pb2.ConversionFailed(model=job.model, version=job.version, target=job.target, stage=stage,
                                            reason=reason, candidates=candidates)
        adder = self.store.event_adder(subject("conversion_failed", model=job.model, target=job.target), event,
                                       event_id=f"conversion.failed:{job.id}:{attempt}")
        final = await asyncio.to_thread(self.store.finish, record, utcnow(), adder, self.settings.instance, attempt)
        self._wake_relay()
        log.warning("conversion %s failed at %s: %s", job.id, stage, reason)
        return final

    # ---- helpers -----------------------------------------------------------------------------------
    def _check_key(self, model: str, version: int, target: str) -> None:
        check_name("model", model)
        check_name("target", target)
        if version <= 0:
            raise errors.InvalidArgument(f"version must be a positive integer, got {version}")

    async def _stored(self, model: str, version: int, target: str) -> Stored:
        self._check_key(model, version, target)
        if target != self.target.id:
            raise errors.NotFound(f"this converter pool serves target {self.target.id!r}; conversions for "
                                  f"{target!r} are kept by that target's pool")
        stored = await asyncio.to_thread(self.store.get, conversion_id(model, version, target))
        if stored is None:
            raise errors.NotFound(f"no conversion of model {model!r} version {version} for target {target!r}")
        return stored

    @staticmethod
    async def _registry_call(call: Awaitable[T]) -> T:
        """Await a registry call; its refusals become the matching domain errors."""
        try:
            return await call
        except RegistryRejected as exc:
            raise DOMAIN_ERROR_OF.get(exc.code, errors.FailedPrecondition)(str(exc)) from None


def _fill_choice(record: pb.Conversion, choice: registry_pb2.ServingChoice) -> None:
    record.state, record.stage, record.error = pb.SUCCEEDED, "register", ""
    record.serving_choice.CopyFrom(choice)
    del record.candidates[:]
    record.candidates.extend(choice.candidates)


def _check_tolerance(tolerance: common_pb2.GateTolerance) -> None:
    try:
        Tolerance(max_metric_drop=tolerance.max_metric_drop or 0.0,
                  min_top1_agreement=tolerance.min_top1_agreement or 0.0)
    except ValueError as exc:
        raise errors.InvalidArgument(f"tolerance: {exc}") from None


def _encode_token(last: pb.Conversion) -> str:
    return base64.urlsafe_b64encode(json.dumps([last.target, last.model, last.version]).encode()).decode()


def _decode_token(token: str) -> tuple[str, str, int] | None:
    if not token:
        return None
    try:
        target, model, version = json.loads(base64.urlsafe_b64decode(token.encode()))
        return str(target), str(model), int(version)
    except (ValueError, TypeError) as exc:
        raise errors.InvalidArgument(f"page_token is not a token this service issued ({exc})") from None
