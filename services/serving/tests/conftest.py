"""Fixtures for the serving tests: a model directory, the ONNX Runtime oracle, in-process servers."""

from __future__ import annotations

import shutil
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

sys.path.insert(0, str(Path(__file__).parent))  # serving_support, beside this file

from serving_support import Oracle, build_model_dir  # noqa: E402

from inference import grpc_service_pb2_grpc as pb_grpc  # noqa: E402
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
