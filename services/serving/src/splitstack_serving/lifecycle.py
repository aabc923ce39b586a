"""Registry mode: serve the version each followed alias points at, and announce every swap.

Each configured model follows one alias (`name@alias`, default `production`). `sync` asks the
registry where the alias points *now* and, unless that version is already current, loads it
through the repository (download, digest check, warm-up, atomic swap). Promotion events are
triggers, not orders: the alias is read back from the registry, so a redelivered or out-of-order
`model.promoted` can never roll a replica back, and a repeated promotion (or one to the version
already current) reloads nothing. A failed load keeps the last good version; the repository
reports it (log, `splitstack_serving_model_loads_total{outcome="failed"}`, RepositoryIndex). An
alias that is deleted (or missing) keeps whatever serves now: serving nothing would turn a registry
edit into an outage, and the next promotion of that alias is followed as usual.

Reconciliation (`sync` of every followed model) runs at start and again after every reconnect to
NATS or to the registry, when events may have been missed; transient failures (registry or bus
unreachable) are retried with back-off. Readiness: once every followed model has a current
version, `on_ready` is called (once). Every swap, whoever caused it, is announced on
`model.deployed.<model>.<target>` with an id unique to that swap, so a retried publish is stored once.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import grpc
from google.protobuf.message import Message

from splitstack.chassis.config import ConfigError
from splitstack.chassis.consumers import ReconnectSignal
from splitstack.chassis.retry import RetryBudget
from splitstack.contracts.events import subject
from splitstack.contracts.names import InvalidName, check_name
from splitstack.events.v1 import events_pb2

from splitstack_serving.backend import ModelLoadError
from splitstack_serving.registry_source import DEFAULT_ALIAS, AliasMissing, RegistryModelSource
from splitstack_serving.repository import ModelRepository, ModelVersion

log = logging.getLogger(__name__)

Publish = Callable[..., Awaitable[object]]   # Bus.publish(subject, payload, event_id=...)
# Pauses between failed reconciliations (0.5 s doubling to 10 s); the reconciler never gives up, so
# only the pacing comes from the budget. Each registry call inside also retries transient failures
# (RegistryModelSource, SPLITSTACK_SERVING_REGISTRY_RETRY_SECONDS) before a reconciliation fails.
RECONCILE_PACE = RetryBudget(total_seconds=0.0, first_pause=0.5, max_pause=10.0)
PUBLISH_PAUSES = (0.5, 1.0, 2.0, 4.0, 8.0)    # between attempts to announce one deployment


@dataclass(frozen=True)
class FollowedModel:
    """A model this server serves, and the alias whose version it serves."""

    name: str
    alias: str = DEFAULT_ALIAS


def parse_followed(specs: Sequence[str]) -> list[FollowedModel]:
    """'name' or 'name@alias' entries -> FollowedModel (ConfigError naming a bad entry)."""
    followed: dict[str, FollowedModel] = {}
    for spec in specs:
        name, _, alias = spec.partition("@")
        name, alias = name.strip(), alias.strip() or DEFAULT_ALIAS
        if ":" in name:
            raise ConfigError(f"SPLITSTACK_SERVING_MODELS entry {spec!r}: with a registry, models follow an alias "
                              "('name' or 'name@alias'); load a fixed version with RepositoryModelLoad")
        try:
            check_name("model name", name)
            check_name("alias", alias)
        except InvalidName as exc:
            raise ConfigError(f"SPLITSTACK_SERVING_MODELS entry {spec!r}: {exc}") from None
        if name in followed:
            raise ConfigError(f"SPLITSTACK_SERVING_MODELS lists model {name!r} twice; a model follows one alias")
        followed[name] = FollowedModel(name, alias)
    return list(followed.values())


def describe(exc: BaseException) -> str:
    """A one-line account of a failure (gRPC errors by status and message)."""
    if isinstance(exc, grpc.aio.AioRpcError):
        return f"{exc.code().name}: {exc.details()}"
    return f"{type(exc).__name__}: {exc}"


class ModelLifecycle:
    """Keeps each followed model on its alias's version; announces swaps; reports readiness."""

    def __init__(self, repository: ModelRepository, source: RegistryModelSource, followed: Sequence[FollowedModel],
                 *, target: str, replica: str, on_ready: Callable[[], None]) -> None:
        self.repository = repository
        self.source = source
        self.followed = {model.name: model for model in followed}
        repository.reserve(self.followed)
        self.target = target
        self.replica = replica
        self.ready = False
        self._on_ready = on_ready
        self._locks: dict[str, asyncio.Lock] = {}
        self._deploying: dict[str, str] = {}        # model -> the version its alias is being moved to
        self._wanted = asyncio.Event()
        self._publish: Publish | None = None
        self._run_id = uuid.uuid4().hex[:8]
        self._swap_numbers = itertools.count(1)
        self._announcements: set[asyncio.Task] = set()

    def subjects(self) -> list[str]:
        """The promotion subjects of the followed aliases."""
        return [subject("model_promoted", model=m.name, alias=m.alias) for m in self.followed.values()]

    def attach(self, publish: Publish) -> None:
        """Announce deployments through `publish` from now on."""
        self._publish = publish

    # -- reconciliation ------------------------------------------------------------------------

    def request_reconcile(self, why: str) -> None:
        """Have the reconciler check every followed alias again."""
        log.info("reconciling with the registry: %s", why)
        self._wanted.set()

    async def run_reconciler(self) -> None:
        """Reconcile at start and whenever asked; retry failed reconciliations with back-off, for as
        long as they fail (the pauses are the chassis retry's, `RECONCILE_PACE`)."""
        pauses = RECONCILE_PACE.pauses()
        self._wanted.set()
        while True:
            await self._wanted.wait()
            self._wanted.clear()
            try:
                await self.reconcile()
            except Exception as exc:  # noqa: BLE001 - the registry or the bus may be away for a while
                pause = next(pauses)
                log.warning("reconciling with the registry failed (%s); retrying in %.1fs", describe(exc), pause)
                await asyncio.sleep(pause)
                self._wanted.set()
                continue
            pauses = RECONCILE_PACE.pauses()

    async def reconcile(self) -> None:
        """Sync every followed model; raise the first transient failure after trying them all."""
        failures: list[Exception] = []
        for model in self.followed.values():
            try:
                await self.sync(model)
            except Exception as exc:  # noqa: BLE001 - one model's trouble must not block the others
                failures.append(exc)
        self._check_ready()
        if failures:
            raise failures[0]

    async def on_promoted(self, event: events_pb2.ModelPromoted) -> None:
        """A `model.promoted` event: sync the model when this server follows that alias."""
        model = self.followed.get(event.model)
        if model is None or model.alias != event.alias:
            log.debug("ignoring promotion of %s@%s (not followed here)", event.model, event.alias)
            return
        if event.version:
            self.source.remember(event.model, event.version, list(event.serving_artifacts))
        moved = f"moved from version {event.previous_version} to {event.version}" if event.version else "was deleted"
        log.info("model '%s' alias '%s' %s (by %s: %s)", event.model, event.alias, moved, event.actor or "-",
                 event.reason or "-")
        try:
            await self.sync(model)
        except Exception as exc:
            # The message is redelivered a few times; the reconciler keeps trying beyond them.
            self.request_reconcile(f"following {event.model}@{event.alias} failed ({describe(exc)})")
            raise

    async def sync(self, model: FollowedModel) -> None:
        """Make `model` serve the version its alias points at now. A load that fails is reported by
        the repository and leaves the current version serving; transient failures raise."""
        async with self._locks.setdefault(model.name, asyncio.Lock()):
            try:
                version = str(await self.source.resolve_alias(model.name, model.alias))
            except AliasMissing as exc:
                current = self.repository.current_version(model.name)
                keeping = f"keeping version {current}" if current else "nothing to serve until it is set"
                log.warning("%s; %s", exc, keeping)
                return
            self.repository.pin(model.name, version)
            current = self.repository.current_version(model.name)
            if version == current:
                log.debug("model '%s' already serves version %s of alias '%s'", model.name, version, model.alias)
                return
            self._deploying[model.name] = version
            try:
                await self.repository.load(model.name, version)
            except ModelLoadError:
                log.warning("model '%s' stays on version %s: version %s of alias '%s' did not load",
                            model.name, current or "(none)", version, model.alias)
            finally:
                self._deploying.pop(model.name, None)
        self._check_ready()

    def _check_ready(self) -> None:
        if self.ready or not all(self.repository.current_version(name) for name in self.followed):
            return
        self.ready = True
        log.info("ready: %d followed model(s) loaded and warmed", len(self.followed))
        self._on_ready()

    # -- announcing deployments ----------------------------------------------------------------

    async def announce_swap(self, loaded: ModelVersion, previous: str) -> None:
        """Swap listener: publish `model.deployed.<model>.<target>` for the version just made current."""
        self._check_ready()
        if self._publish is None:
            return
        followed = self.followed.get(loaded.name)
        alias = followed.alias if followed and self._deploying.get(loaded.name) == loaded.version else ""
        payload = events_pb2.ModelDeployed(
            model=loaded.name, version=_number(loaded.version), target=self.target,
            artifact_sha256=loaded.sha256, replica=self.replica, previous_version=_number(previous), alias=alias)
        event_id = f"model.deployed:{loaded.name}:{self.target}:{self.replica}:{self._run_id}:{next(self._swap_numbers)}"
        task = asyncio.create_task(self._publish_deployed(payload, event_id), name=f"announce-{event_id}")
        self._announcements.add(task)
        task.add_done_callback(self._announcements.discard)

    async def _publish_deployed(self, payload: Message, event_id: str) -> None:
        where = subject("model_deployed", model=payload.model, target=self.target)
        for attempt, pause in enumerate((*PUBLISH_PAUSES, None), start=1):
            try:
                await self._publish(where, payload, event_id=event_id)
                log.info("announced %s (version %d, previous %d)", where, payload.version, payload.previous_version)
                return
            except Exception as exc:  # noqa: BLE001 - NATS may be reconnecting; the id makes retries safe
                if pause is None:
                    log.error("could not announce %s version %d after %d attempts: %s", where, payload.version,
                              attempt, describe(exc))
                    return
                log.warning("announcing %s failed (%s); retrying in %.1fs", where, describe(exc), pause)
                await asyncio.sleep(pause)

    async def close(self, timeout: float) -> None:
        """Let pending announcements finish (cancelled after `timeout`)."""
        pending = list(self._announcements)
        if not pending:
            return
        _, late = await asyncio.wait(pending, timeout=timeout)
        for task in late:
            task.cancel()


def _number(version: str) -> int:
    return int(version) if version.isdigit() else 0


# -- reconnect watchers (background tasks) ------------------------------------------------------

async def follow_bus_reconnects(reconnects: ReconnectSignal, lifecycle: ModelLifecycle) -> None:
    """Reconcile after every reconnect to NATS (`Bus.reconnects`): promotions may have been missed."""
    while True:
        await reconnects.wait()
        lifecycle.request_reconcile("reconnected to NATS")


async def follow_registry_channel(channel: grpc.aio.Channel, lifecycle: ModelLifecycle) -> None:
    """Reconcile whenever the registry channel is READY again after losing its connection; keep the
    channel connecting while it is idle, so the registry's return is noticed without a request."""
    lost = False
    state = channel.get_state(try_to_connect=True)
    while True:
        await channel.wait_for_state_change(state)
        state = channel.get_state(try_to_connect=True)
        if state == grpc.ChannelConnectivity.READY:
            if lost:
                lifecycle.request_reconcile("reconnected to the registry")
            lost = False
        elif state in (grpc.ChannelConnectivity.TRANSIENT_FAILURE, grpc.ChannelConnectivity.IDLE):
            lost = True
