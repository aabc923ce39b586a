"""The loaded models: several models and versions at once, each version with its own batcher.

`load(name, version)` fetches the artifact from the `ModelSource`, verifies its SHA-256 when the
source gives one, opens it (an ONNX Runtime session; a TensorRT engine for a `model.plan`), warms
it up, and only then makes it the model's current version, in one step on the event loop:
requests resolved before the step finish on the version they resolved to, which is released
once its last one is done. A failed load changes nothing that serves (the previous version
stays current) and is reported by `index()`; so is a fetch the source refuses
(`ModelLoadError`: not servable here, wrong digest). Crash point `serving.mid_swap`: a loaded,
warmed version has just replaced another as current, before the swap is announced and the old
version released (a first load of a model, replacing nothing, does not pass it).
Anything `resolve` returns is loaded *and* warmed, so readiness is `resolve` success. Swap
listeners (`on_swap`) hear of every version made current, after the swap (model.deployed);
release listeners (`on_release`) after versions were released (the artifact cache makes room).

Bounds (`ServingLimits`): at most `max_loaded_models` models (a first load past it is
ResourceExhausted before anything is fetched; `reserve`d, i.e. followed, models always have a
slot) and `max_versions_per_model` versions each: past it the oldest spare versions leave service,
idle before busy, never the current one nor the `pin`ned one (the followed alias's version).
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import logging
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType

from inference import model_config_pb2
from splitstack.chassis.errors import NotFound, ResourceExhausted
from splitstack.chassis.faults import crash_point
from splitstack.contracts.names import check_name

from splitstack_serving import metrics
from splitstack_serving.backend import BackendOptions, ModelLoadError, OnnxModel
from splitstack_serving.batching import BatchPolicy, DynamicBatcher
from splitstack_serving.limits import ServingLimits
from splitstack_serving.source import LocalModel, ModelSource, version_order
from splitstack_serving.stats import InferenceStats
from splitstack_serving.tensorrt_backend import PLAN_FILE, TensorRtModel
from splitstack_serving.tensors import ModelSignature, shown

log = logging.getLogger(__name__)

READY = "READY"
LOADING = "LOADING"
UNAVAILABLE = "UNAVAILABLE"
HASH_CHUNK_BYTES = 1 << 20
MID_SWAP = "serving.mid_swap"
_NO_VERSIONS: MappingProxyType = MappingProxyType({})

ServedModel = OnnxModel | TensorRtModel
SwapListener = Callable[["ModelVersion", str], Awaitable[None]]  # (now current, previous current version or "")


@dataclass
class ModelVersion:
    """One loaded, warmed model version and everything that serves it."""

    name: str
    version: str
    sha256: str
    path: Path
    model: ServedModel
    signature: ModelSignature
    policy: BatchPolicy
    batcher: DynamicBatcher
    stats: InferenceStats
    metrics: metrics.ModelMetrics
    in_flight: int = 0
    retired: bool = False
    loaded_at: int = 0        # load order within the process (the oldest spare version goes first)
    _drained: asyncio.Event = field(default_factory=asyncio.Event, repr=False)

    @property
    def label(self) -> str:
        """How messages name this version."""
        return f"model '{self.name}' version {self.version}"

    def acquire(self) -> None:
        """A request starts using this version (it will not be released under the request)."""
        self.in_flight += 1

    def release(self) -> None:
        """A request is done with this version."""
        self.in_flight -= 1
        if self.retired and self.in_flight == 0:
            self._drained.set()

    async def retire(self, timeout: float) -> None:
        """Wait (at most `timeout`) for the requests using this version, then free it."""
        self.retired = True
        if self.in_flight:
            try:
                await asyncio.wait_for(self._drained.wait(), timeout)
            except TimeoutError:
                log.error("%s: %d request(s) still running after %.1fs; releasing anyway",
                          self.label, self.in_flight, timeout)
        await self.batcher.close(timeout)
        self.model.close()
        metrics.forget_version(self.name, self.version)
        log.info("%s released", self.label)


@dataclass(frozen=True)
class IndexEntry:
    """One line of the repository index: a model version and its state (READY, LOADING, UNAVAILABLE)."""

    name: str
    version: str
    state: str
    reason: str = ""


def policy_for(default: BatchPolicy, config: model_config_pb2.ModelConfig | None, batchable: bool) -> BatchPolicy:
    """The batch policy of one model: the service defaults, then the model's own config (Triton's
    rules: a config without `dynamic_batching` runs requests one by one), then what the model allows."""
    policy = default
    if config is not None:
        if config.max_batch_size > 0:
            policy = replace(policy, max_batch_size=config.max_batch_size)
        if config.HasField("dynamic_batching"):
            batching = config.dynamic_batching
            policy = replace(policy, batching=True, max_queue_delay_us=batching.max_queue_delay_microseconds,
                             max_queue_size=batching.default_queue_policy.max_queue_size or policy.max_queue_size)
        else:
            policy = replace(policy, batching=False)
        if config.instance_group and config.instance_group[0].count > 0:
            policy = replace(policy, instances=config.instance_group[0].count)
    if not batchable:
        policy = replace(policy, max_batch_size=0, batching=False)
    return policy


def open_model(path: Path, options: BackendOptions) -> ServedModel:
    """Open an artifact with the backend its file name says: a TensorRT plan or an ONNX model (blocking)."""
    if path.name == PLAN_FILE:
        return TensorRtModel.open(path, options)
    return OnnxModel.open(path, options)


def engine_batch_limit(policy: BatchPolicy, model: ServedModel) -> BatchPolicy:
    """The policy within what the engine was built for (a plan's profile caps the batch; ONNX: no cap)."""
    limit = getattr(model, "max_batch_limit", 0)
    if limit > 0 and policy.max_batch_size > limit:
        log.warning("max_batch_size %d exceeds the engine's profile maximum %d; using %d",
                    policy.max_batch_size, limit, limit)
        return replace(policy, max_batch_size=limit)
    return policy


def file_sha256(path: Path) -> str:
    """The hex SHA-256 of a file (blocking)."""
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        while chunk := stream.read(HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


class ModelRepository:
    """Which model versions are loaded, which one is current per model, and how they change."""

    def __init__(self, source: ModelSource, options: BackendOptions, default_policy: BatchPolicy,
                 release_timeout: float = 30.0, limits: ServingLimits | None = None) -> None:
        self.source = source
        self.options = options
        self.default_policy = default_policy
        self.release_timeout = release_timeout
        self.limits = limits or ServingLimits()
        self._load_order = itertools.count(1)
        self._pinned: dict[str, str] = {}                 # name -> the version its followed alias points at
        self._opening: dict[str, str] = {}                # name -> digest of the artifact being opened
        self._new_models: set[str] = set()                # models not loaded yet whose first load runs now
        self._reserved: set[str] = set()                  # models that always have a slot (followed ones)
        self._versions: dict[str, dict[str, ModelVersion]] = {}
        self._current: dict[str, ModelVersion] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._loading: dict[str, str] = {}
        self._failures: dict[str, tuple[str, str]] = {}   # name -> (version, reason) of its last failed load
        self._unloaded: set[str] = set()
        self._swap_listeners: list[SwapListener] = []
        self._release_listeners: list[Callable[[], object]] = []

    def on_swap(self, listener: SwapListener) -> None:
        """Call `await listener(version, previous)` after each load that made `version` current."""
        self._swap_listeners.append(listener)

    def on_release(self, listener: Callable[[], object]) -> None:
        """Call `listener()` after versions were released (the artifact cache may make room then)."""
        self._release_listeners.append(listener)

    def resolve(self, name: str, version: str = "") -> ModelVersion:
        """The loaded version `version` of `name` ("" = current); NotFound when not loaded."""
        found = self._current.get(name) if not version else self._versions.get(name, _NO_VERSIONS).get(version)
        if found is None:
            raise self._not_found(name, version)
        return found

    def _not_found(self, name: str, version: str) -> NotFound:
        loaded = self.loaded_versions(name)
        if not loaded:
            return NotFound(f"model {shown(name)} is not loaded")
        return NotFound(f"model {shown(name)} version {shown(version)} is not loaded (loaded: {', '.join(loaded)})")

    def reserve(self, names: Iterable[str]) -> None:
        """These models always have a slot within `max_loaded_models` (the followed ones)."""
        self._reserved.update(names)

    def pin(self, name: str, version: str) -> None:
        """`version` of `name` is what its followed alias points at: never unloaded to make room."""
        self._pinned[name] = version

    def digests_in_use(self) -> set[str]:
        """Artifacts this repository serves or is opening (the artifact cache keeps them)."""
        used = {v.sha256 for versions in self._versions.values() for v in versions.values()}
        return used | set(self._opening.values())

    def is_ready(self, name: str, version: str = "") -> bool:
        """True when that version (or the current one) is loaded and warmed."""
        found = self._current.get(name) if not version else self._versions.get(name, _NO_VERSIONS).get(version)
        return found is not None

    def current_version(self, name: str) -> str:
        """The version of `name` an empty `model_version` gets ("" when none is loaded)."""
        found = self._current.get(name)
        return found.version if found is not None else ""

    def loaded_versions(self, name: str) -> list[str]:
        """The loaded versions of `name`, ascending."""
        return sorted(self._versions.get(name, {}), key=version_order)

    def current_versions(self) -> list[ModelVersion]:
        """The current version of every loaded model, by model name."""
        return [self._current[name] for name in sorted(self._current)]

    def all_versions(self, name: str = "") -> list[ModelVersion]:
        """Every loaded version of `name` ("" = of every model)."""
        names = [name] if name else sorted(self._versions)
        return [self._versions[n][v] for n in names for v in self.loaded_versions(n)]

    async def load(self, name: str, version: str = "", *, config: model_config_pb2.ModelConfig | None = None,
                   keep_previous: bool = False) -> ModelVersion:
        """Load `version` of `name` ("" = the source's current), warm it, make it current; release the
        version it replaces (unless `keep_previous`) once its requests are done. On failure nothing
        that serves changes and the error is raised; a version that was found but failed to load is
        also kept for `index()`."""
        check_name("model name", name)
        async with self._locks.setdefault(name, asyncio.Lock()):
            self._reserve_model(name)
            self._loading[name] = version
            try:
                loaded = await self._fetch_and_open(name, version, config)
            finally:
                self._loading.pop(name, None)
                self._new_models.discard(name)
            replaced, previous = self._install(loaded, keep_previous)
            if previous:
                crash_point(MID_SWAP)
            metrics.count_load(name, ok=True)
            log.info("%s loaded and current (sha256 %s, max_batch_size %d, batching %s)", loaded.label,
                     loaded.sha256[:12], loaded.policy.max_batch_size, "on" if loaded.policy.batching else "off")
            await self._notify_swap(loaded, previous)
            await self._retire(replaced)
            batcher = loaded.batcher  # after the retirement, which drops a reloaded version's gauge
            metrics.watch_pending(name, loaded.version, lambda: batcher.pending)
            return loaded

    def _reserve_model(self, name: str) -> None:
        """Count a model's first load against `max_loaded_models` (ResourceExhausted past it)."""
        if name in self._versions or name in self._reserved:
            return
        cap = self.limits.max_loaded_models
        taken = len({*self._versions, *self._reserved, *self._new_models})
        if taken >= cap:
            raise ResourceExhausted(f"cannot load model '{name}': {taken} models are loaded, loading or followed, "
                                    f"at most {cap} are allowed (SPLITSTACK_SERVING_MAX_LOADED_MODELS); "
                                    "unload one first")
        self._new_models.add(name)

    async def _fetch_and_open(self, name: str, version: str,
                              config: model_config_pb2.ModelConfig | None) -> ModelVersion:
        """Fetch and open a version; a fetch the source refuses (ModelLoadError) or any failure to
        open what it fetched is recorded for `index()` and counted, then raised."""
        try:
            local = await self.source.fetch(name, version)
        except ModelLoadError as exc:
            self._report_failure(name, getattr(exc, "version", "") or version, exc)
            raise
        self._loading[name] = local.version
        self._opening[name] = local.sha256
        try:
            return await self._open(local, config)
        except Exception as exc:
            self._report_failure(name, local.version, exc)
            raise
        finally:
            self._opening.pop(name, None)

    def _report_failure(self, name: str, version: str, exc: BaseException) -> None:
        self._failures[name] = (version, str(exc))
        metrics.count_load(name, ok=False)
        log.error("loading model '%s' version %s failed: %s", name, version or "(current)", exc)

    async def _notify_swap(self, loaded: ModelVersion, previous: str) -> None:
        for listener in self._swap_listeners:
            try:
                await listener(loaded, previous)
            except Exception:  # noqa: BLE001 - the swap happened; a listener's trouble must not undo it
                log.exception("swap listener failed for %s", loaded.label)

    async def _open(self, local: LocalModel, config: model_config_pb2.ModelConfig | None) -> ModelVersion:
        sha256 = await asyncio.to_thread(file_sha256, local.path)
        if local.sha256 and sha256 != local.sha256:
            raise ModelLoadError(f"model '{local.name}' version {local.version}: {local.path.name} has sha256 "
                                 f"{sha256}, expected {local.sha256}; refusing to load it")
        model = await asyncio.to_thread(open_model, local.path, self.options)
        try:
            policy = engine_batch_limit(policy_for(self.default_policy, config or local.config, model.batchable),
                                        model)
            await asyncio.to_thread(model.warm_up, policy.max_batch_size)
        except BaseException:
            model.close()
            raise
        return self._serving_version(local, sha256, model, policy)

    @staticmethod
    def _serving_version(local: LocalModel, sha256: str, model: ServedModel, policy: BatchPolicy) -> ModelVersion:
        stats = InferenceStats()
        model_metrics = metrics.model_metrics(local.name)
        label = f"model '{local.name}' version {local.version}"
        batcher = DynamicBatcher(label, model.run, [spec.name for spec in model.inputs], policy, stats, model_metrics)
        signature = ModelSignature(model.inputs, model.outputs, policy.max_batch_size)
        return ModelVersion(local.name, local.version, sha256, local.path, model, signature, policy, batcher,
                            stats, model_metrics)

    def _install(self, loaded: ModelVersion, keep_previous: bool) -> tuple[list[ModelVersion], str]:
        """Make `loaded` current (one synchronous step); return the versions it takes out of service
        and the version that was current before ("" when none)."""
        versions = self._versions.setdefault(loaded.name, {})
        replaced = [v for v in (versions.get(loaded.version),) if v is not None]
        previous = self._current.get(loaded.name)
        if previous is not None and previous.version != loaded.version and not keep_previous:
            replaced.append(versions.pop(previous.version))
        loaded.loaded_at = next(self._load_order)
        versions[loaded.version] = loaded
        self._current[loaded.name] = loaded
        replaced.extend(self._spare_versions_over_cap(loaded.name))
        self._failures.pop(loaded.name, None)
        self._unloaded.discard(loaded.name)
        metrics.set_loaded_versions(loaded.name, len(versions))
        return replaced, previous.version if previous is not None else ""

    def _spare_versions_over_cap(self, name: str) -> list[ModelVersion]:
        """Take the oldest versions of `name` out of service while more than `max_versions_per_model`
        are loaded: never the current one nor the followed alias's, idle ones before busy ones (a
        version taken out is released only once its requests are done)."""
        versions = self._versions[name]
        excess = len(versions) - self.limits.max_versions_per_model
        if excess <= 0:
            return []
        keep = {self._current[name].version, self._pinned.get(name)}
        spare = sorted((v for v in versions.values() if v.version not in keep),
                       key=lambda v: (v.in_flight > 0, v.loaded_at))
        removed = [versions.pop(v.version) for v in spare[:excess]]
        for version in removed:
            log.info("%s taken out of service: %d versions loaded, at most %d are kept "
                     "(SPLITSTACK_SERVING_MAX_VERSIONS_PER_MODEL)", version.label, len(versions) + len(removed),
                     self.limits.max_versions_per_model)
        return removed

    async def unload(self, name: str, version: str = "") -> None:
        """Take `version` of `name` ("" = every version) out of service and release it once its
        requests are done. Unloading the current version makes the highest remaining one current."""
        async with self._locks.setdefault(name, asyncio.Lock()):
            versions = self._versions.get(name, {})
            if not versions or (version and version not in versions):
                raise self._not_found(name, version)
            removed = [versions.pop(version)] if version else [versions.pop(v) for v in list(versions)]
            remaining = self.loaded_versions(name)
            if remaining:
                self._current[name] = versions[remaining[-1]]
            else:
                self._current.pop(name, None)
                self._versions.pop(name, None)
                self._unloaded.add(name)
            metrics.set_loaded_versions(name, len(remaining))
            await self._retire(removed)

    async def _retire(self, versions: Iterable[ModelVersion]) -> None:
        versions = list(versions)
        await asyncio.gather(*(v.retire(self.release_timeout) for v in versions))
        if not versions:
            return
        for listener in self._release_listeners:
            try:
                listener()
            except Exception:  # noqa: BLE001 - the release happened; a listener's trouble must not undo it
                log.exception("release listener failed")

    async def index(self, ready_only: bool = False) -> list[IndexEntry]:
        """Every model the source offers or that is loaded, one entry per loaded version."""
        available = await self.source.available()
        entries: list[IndexEntry] = []
        for name in sorted({*available, *self._versions, *self._failures, *self._loading}):
            entries.extend(IndexEntry(name, v, READY) for v in self.loaded_versions(name))
            if name in self._loading:
                entries.append(IndexEntry(name, self._loading[name], LOADING))
            if name in self._failures:
                failed_version, reason = self._failures[name]
                entries.append(IndexEntry(name, failed_version, UNAVAILABLE, reason))
            elif name not in self._versions and name not in self._loading:
                entries.append(IndexEntry(name, "", UNAVAILABLE, "unloaded" if name in self._unloaded else ""))
        return [e for e in entries if e.state == READY] if ready_only else entries

    async def close(self) -> None:
        """Release every version (after its requests finish, within the release timeout)."""
        versions = self.all_versions()
        self._versions.clear()
        self._current.clear()
        await self._retire(versions)
