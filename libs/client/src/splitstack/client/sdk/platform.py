"""`Platform`: the whole splitstack platform from one object, through gRPC and NATS only.

It holds the services' addresses (given, or read from the running local stack) and one channel
per address, and delegates to the per-service clients (`registry`, `training`, `conversion`,
`inference`, `events`). Every service failure is a `PlatformError`; bad local input a
`ValueError` raised before anything is sent.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import numpy as np

from splitstack.client.sdk.conversion import ConverterClient, wait_serving_choice
from splitstack.client.sdk.endpoints import Channels, Endpoints
from splitstack.client.sdk.events import Event, EventSubscription, EventTail
from splitstack.client.sdk.inference import ServingClient, wait_version
from splitstack.client.sdk.registry import RegistryClient
from splitstack.client.sdk.training import TrainerClient
from splitstack.converter.v1 import converter_pb2 as cpb
from splitstack.registry.v1 import registry_pb2 as rpb
from splitstack.trainer.v1 import trainer_pb2 as tpb

log = logging.getLogger(__name__)


class Platform:
    """Client of the registry, trainer, converter pools, serving endpoints and the event bus."""

    def __init__(self, *, registry: str, trainer: str | None = None, converters: Mapping[str, str] | None = None,
                 serving: Mapping[str, str] | None = None, nats_url: str | None = None,
                 timeout: float = 30.0) -> None:
        if not registry:
            raise ValueError("the registry's address (host:port) is required")
        self.endpoints = Endpoints(registry, trainer, dict(converters or {}), dict(serving or {}), nats_url)
        self.timeout = timeout
        self._channels = Channels()
        self._serving: dict[str, ServingClient] = {}
        self._lock = threading.Lock()
        self.registry = RegistryClient(self._channels.get(registry), timeout)

    @classmethod
    def from_stack(cls, state_dir: str | os.PathLike[str] | None = None,
                   stack_file: str | os.PathLike[str] | None = None, *, timeout: float = 30.0) -> "Platform":
        """A Platform on the running local stack (addresses from `<state>/stack.json`)."""
        found = Endpoints.from_stack(state_dir, stack_file)
        return cls(registry=found.registry, trainer=found.trainer, converters=found.converters,
                   serving=found.serving, nats_url=found.nats_url, timeout=timeout)

    def close(self) -> None:
        self._channels.close()

    def __enter__(self) -> "Platform":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Platform({self.endpoints})"

    # --- clients of one service ----------------------------------------------------------------

    @property
    def trainer(self) -> TrainerClient:
        if not self.endpoints.trainer:
            raise ValueError("no trainer address configured (Platform(trainer=...), or a local stack with one)")
        return TrainerClient(self._channels.get(self.endpoints.trainer), self.timeout)

    def converter(self, target: str | None = None) -> ConverterClient:
        """The pool of `target` when known, else any pool (each accepts requests for every target)."""
        pools = self.endpoints.converters
        address = pools.get(target or "") or next(iter(pools.values()), None)
        if address is None:
            raise ValueError("no converter address configured (Platform(converters={target: address}))")
        return ConverterClient(self._channels.get(address), self.timeout)

    def serving(self, target: str = "cpu") -> ServingClient:
        """The serving endpoint of `target` (one client per target: it caches model signatures)."""
        address = self.endpoints.serving.get(target)
        if address is None:
            known = ", ".join(sorted(self.endpoints.serving)) or "none"
            raise ValueError(f"no serving address for target {target!r} (known targets: {known})")
        with self._lock:
            if target not in self._serving:
                self._serving[target] = ServingClient(self._channels.get(address), address, self.timeout)
            return self._serving[target]

    # --- data ----------------------------------------------------------------------------------

    def publish_dataset(self, dataset: str, source: Any, *, metadata: Mapping[str, str] | None = None,
                        idempotency_key: str | None = None, description: str = "") -> rpb.DatasetVersion:
        """Upload `source` (an .npz path, its bytes, or a mapping of arrays) as a new version of `dataset`."""
        return self.registry.publish_dataset(dataset, source, metadata=metadata, idempotency_key=idempotency_key,
                                             description=description)

    def datasets(self) -> list[rpb.Dataset]:
        return self.registry.datasets()

    def dataset_versions(self, dataset: str) -> list[rpb.DatasetVersion]:
        return self.registry.dataset_versions(dataset)

    # --- training ------------------------------------------------------------------------------

    def submit(self, spec: tpb.JobSpec | Mapping[str, Any]) -> tpb.Job:
        return self.trainer.submit(spec)

    def watch(self, job_id: str, *, timeout: float | None = None) -> Iterator[tpb.Job]:
        """The job now, then each change, until it is SUCCEEDED, FAILED or CANCELLED."""
        return self.trainer.watch(job_id, timeout=timeout)

    def job(self, job_id: str) -> tpb.Job:
        return self.trainer.job(job_id)

    def jobs(self, *, model: str | None = None, state: int | str | None = None) -> list[tpb.Job]:
        return self.trainer.jobs(model=model, state=state)

    def cancel(self, job_id: str, reason: str = "") -> tpb.Job:
        return self.trainer.cancel(job_id, reason)

    def set_retrain_policy(self, policy: tpb.RetrainPolicy | Mapping[str, Any]) -> tpb.RetrainPolicy:
        return self.trainer.set_retrain_policy(policy)

    def retrain_policies(self) -> list[tpb.RetrainPolicy]:
        return self.trainer.retrain_policies()

    def delete_retrain_policy(self, name: str) -> None:
        self.trainer.delete_retrain_policy(name)

    # --- registry reads ------------------------------------------------------------------------

    def models(self) -> list[rpb.Model]:
        return self.registry.models()

    def model(self, name: str) -> rpb.Model:
        return self.registry.model(name)

    def versions(self, model: str) -> list[rpb.ModelVersion]:
        return self.registry.versions(model)

    def version(self, model: str, version: int) -> rpb.ModelVersion:
        return self.registry.version(model, version)

    def artifacts(self, model: str, version: int) -> list[rpb.Artifact]:
        return self.registry.artifacts(model, version)

    def lineage(self, model: str, version: int) -> rpb.GetLineageResponse:
        return self.registry.lineage(model, version)

    def aliases(self, model: str) -> list[rpb.Alias]:
        return self.registry.aliases(model)

    def alias_history(self, model: str, alias: str = "") -> list[rpb.AliasMove]:
        return self.registry.alias_history(model, alias)

    def serving_choice(self, model: str, version: int, target: str) -> rpb.ServingChoice:
        return self.registry.serving_choice(model, version, target)

    # --- promotion -----------------------------------------------------------------------------

    def promote(self, model: str, version: int, alias: str = "production", *, reason: str = "",
                actor: str | None = None) -> rpb.Alias:
        return self.registry.promote(model, version, alias, reason=reason, actor=actor)

    def rollback(self, model: str, alias: str = "production", *, reason: str = "",
                 actor: str | None = None) -> rpb.Alias:
        """Back to the version `alias` named before its latest move (PlatformError when there is none)."""
        return self.registry.rollback(model, alias, reason=reason, actor=actor)

    def set_promotion_policy(self, model: str, policy: rpb.PromotionPolicy | Mapping[str, Any], *,
                             actor: str | None = None) -> rpb.Model:
        return self.registry.set_promotion_policy(model, policy, actor)

    # --- conversion ----------------------------------------------------------------------------

    def convert(self, model: str, version: int, target: str, *, tolerance: Any = None) -> cpb.Conversion:
        return self.converter(target).convert(model, version, target, tolerance=tolerance)

    def conversion(self, model: str, version: int, target: str) -> cpb.Conversion:
        return self.converter(target).conversion(model, version, target)

    def wait_serving_choice(self, model: str, version: int, target: str, *,
                            timeout: float = 300) -> rpb.ServingChoice:
        """The serving choice once written; PlatformError if the conversion fails, TimeoutError after `timeout`."""
        pool = self.endpoints.converters.get(target)
        converter = ConverterClient(self._channels.get(pool), self.timeout) if pool else None
        return wait_serving_choice(self.registry, converter, model, version, target, timeout)

    # --- inference -----------------------------------------------------------------------------

    def predict(self, model: str, inputs: Any, *, target: str = "cpu", version: int | None = None,
                timeout: float | None = None) -> dict[str, np.ndarray]:
        """Outputs by name for `inputs` (one array, or a mapping of input name to array)."""
        return self.serving(target).predict(model, inputs, version=version, timeout=timeout)

    def serving_version(self, model: str, *, target: str = "cpu") -> int:
        """The version serving answers `model`'s requests with now."""
        return self.serving(target).serving_version(model)

    def wait_serving_version(self, model: str, version: int, *, target: str = "cpu", timeout: float = 120,
                             events: EventSubscription | None = None) -> None:
        """Until serving on `target` answers `model`'s requests with `version` (TimeoutError after `timeout`).

        Pass `events` (subscribed to `model.deployed.<model>.<target>` before the action that deploys)
        to return as soon as a replica reports the swap.
        """
        wait_version(self.serving(target), model, version, timeout, events)

    # --- events --------------------------------------------------------------------------------

    def subscribe(self, subjects: Iterable[str] = (">",), *, since_start: bool = False) -> EventSubscription:
        """An open subscription (subscribed when this returns): iterate it or `get(timeout)`; close it."""
        if not self.endpoints.nats_url:
            raise ValueError("no NATS URL configured (Platform(nats_url=...), or a local stack)")
        return EventSubscription(self.endpoints.nats_url, subjects, since_start=since_start)

    def tail_events(self, subjects: Iterable[str] = (">",), *, since_start: bool = False,
                    stop: threading.Event | None = None) -> Iterator[Event]:
        """Events as they come (from the start of their streams with `since_start`) until `stop` is set.

        Subscribed when this returns (so nothing published afterwards is missed); closing the
        iterator (or setting `stop`) unsubscribes.
        """
        return EventTail(self.subscribe(subjects, since_start=since_start), stop)

