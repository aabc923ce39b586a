"""Fixtures for the serving tests: a model directory, the ONNX Runtime oracle, in-process servers;
for registry mode, a real nats-server and `splitstack-registry` (module-scoped) and servings that
follow aliases."""

from __future__ import annotations

import shutil
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

sys.path.insert(0, str(Path(__file__).parent))  # serving_support, beside this file

from registry_support import ModelRegistry, RegistryProcess, RestartableStack, registry_client  # noqa: E402
from serving_support import Oracle, build_mlp, build_model_dir  # noqa: E402

from inference import grpc_service_pb2_grpc as pb_grpc  # noqa: E402
from splitstack.chassis.testing.servers import NatsServer, free_port, start_nats  # noqa: E402
from splitstack_serving.config import ServingSettings  # noqa: E402
from splitstack_serving.main import ServingService, build_service  # noqa: E402


@pytest.fixture(scope="session")
def model_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The test models, built once per session (read-only: tests copy it)."""
    return build_model_dir(tmp_path_factory.mktemp("model-template"))


@pytest.fixture
def model_dir(model_template: Path, tmp_path: Path) -> Path:
    """This test's own copy of the model directory (tests may add or break versions)."""
    return Path(shutil.copytree(model_template, tmp_path / "models"))


@pytest.fixture(scope="session")
def oracle(model_template: Path) -> Oracle:
    """Expected results: ONNX Runtime in this process on the same model files."""
    return Oracle(model_template)


@dataclass
class RunningServing:
    """An in-process serving service and a client stub connected to it."""

    service: ServingService
    stub: pb_grpc.GRPCInferenceServiceStub
    channel: grpc.aio.Channel

    @property
    def repository(self):  # noqa: ANN201 - ModelRepository
        return self.service.repository


StartServing = Callable[..., Awaitable[RunningServing]]


@pytest.fixture
async def serve(model_dir: Path) -> AsyncIterator[StartServing]:
    """`await serve(models=("mlp",), max_queue_delay_us=...)`: a started service on a free port,
    with its startup models loaded; stopped after the test."""
    started: list[RunningServing] = []

    async def start(**settings: object) -> RunningServing:
        service = build_service(ServingSettings(model_dir=str(model_dir), **settings))  # type: ignore[arg-type]
        await service.runtime.start()
        running = RunningServing(service, None, None)  # type: ignore[arg-type]
        started.append(running)
        await service.load_startup_models()
        running.channel = grpc.aio.insecure_channel(f"127.0.0.1:{service.runtime.port}")
        running.stub = pb_grpc.GRPCInferenceServiceStub(running.channel)
        return running

    yield start
    for running in started:
        if running.channel is not None:
            await running.channel.close()
        await running.service.runtime.stop()


# ---- registry mode: a real nats-server and splitstack-registry, serving followed aliases -------------

@dataclass
class RegistryStack:
    """NATS and a registry process shared by a module's tests (each test uses its own model names)."""

    nats: NatsServer
    registry: RegistryProcess

    @property
    def nats_url(self) -> str:
        return self.nats.url


@pytest.fixture(scope="module")
def registry_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegistryStack]:
    root = tmp_path_factory.mktemp("registry-stack")
    nats_server = start_nats(root / "nats")
    try:
        registry = RegistryProcess.start(root / "registry", nats_server.url)
    except BaseException:
        nats_server.stop()
        raise
    yield RegistryStack(nats_server, registry)
    registry.stop()
    nats_server.stop()


@pytest.fixture
def restartable(tmp_path: Path) -> Iterator[RestartableStack]:
    """NATS and a registry on fixed ports, for tests that restart them in place."""
    stack = RestartableStack(tmp_path / "stack", free_port(), free_port())
    try:
        stack.start_nats()
        stack.start_registry()
        yield stack
    finally:
        stack.stop()


@pytest.fixture
async def registry(registry_stack: RegistryStack) -> AsyncIterator[ModelRegistry]:
    """A Registry API client of the module's registry."""
    async with registry_client(registry_stack.registry.address) as client:
        yield client


@pytest.fixture
def model_name() -> str:
    """A model name no other test uses."""
    return f"m{uuid.uuid4().hex[:10]}"


@pytest.fixture(scope="session")
def onnx_models(tmp_path_factory: pytest.TempPathFactory) -> dict[int, bytes]:
    """mlp ONNX files (64 -> 256 -> 10) with weights from seeds 1, 2, 3, as bytes."""
    root = tmp_path_factory.mktemp("registry-models")
    return {seed: build_mlp(root / f"{seed}.onnx", seed).read_bytes() for seed in (1, 2, 3)}


@pytest.fixture
async def follow(registry_stack: RegistryStack, tmp_path: Path) -> AsyncIterator[StartServing]:
    """`await follow(models=("name",), instance="a", ...)`: an in-process serving in registry mode on a
    free port, started (its readiness follows the registry); stopped after the test."""
    started: list[RunningServing] = []

    async def start(nats_url: str = "", registry_addr: str = "", **settings: object) -> RunningServing:
        instance = str(settings.setdefault("instance", f"replica-{len(started) + 1}"))
        settings.setdefault("cache_dir", str(tmp_path / f"cache-{instance}"))
        service = build_service(ServingSettings(
            registry_addr=registry_addr or registry_stack.registry.address, nats_url=nats_url or registry_stack.nats_url,
            nats_connect_timeout_seconds=10.0, shutdown_grace_seconds=5.0, **settings))  # type: ignore[arg-type]
        running = RunningServing(service, None, None)  # type: ignore[arg-type]
        started.append(running)
        await service.runtime.start()
        await service.start_models()
        running.channel = grpc.aio.insecure_channel(f"127.0.0.1:{service.runtime.port}")
        running.stub = pb_grpc.GRPCInferenceServiceStub(running.channel)
        return running

    yield start
    for running in started:
        if running.channel is not None:
            await running.channel.close()
        await running.service.runtime.stop()
