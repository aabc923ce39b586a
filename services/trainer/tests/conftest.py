"""Fixtures of the trainer's tests: real stacks of nats-server, `splitstack-registry` and
`splitstack-trainer` processes (SQLite everywhere), reached only through gRPC and NATS.

- `stack` (over the module-scoped `module_stack`): NATS + registry + one trainer, shared by the tests
  of a module; each test works on fresh model and dataset names.
- `fresh_stack`: NATS + registry and a trainer launcher with nothing started, for tests that
  start, crash and restart trainers themselves (`fresh_stack.trainers.start(...)`).
- `digits`: the digits dataset, uploaded under a fresh name to the stack's registry.

When a test fails, the logs of every process (job ranks included) are attached to its report.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # trainer_support: beside this file

from trainer_support import (  # noqa: E402
    EventLog, RegistryApi, ServiceProcess, TrainerApi, TrainerLauncher, digits_npz, name, open_channel,
    open_event_log, start_registry,
)

from splitstack.chassis.testing.fixtures import SERVICE_LOGS as STACKS  # noqa: E402
from splitstack.chassis.testing.servers import NatsServer, start_nats  # noqa: E402



@dataclass
class Clients:
    """API clients of one stack."""

    trainer: TrainerApi
    registry: RegistryApi
    events: EventLog


@dataclass
class Stack:
    """A running NATS + registry, and the trainers started on one state directory."""

    root: Path
    nats: NatsServer
    registry: ServiceProcess
    trainers: TrainerLauncher

    @property
    def trainer(self) -> ServiceProcess:
        return self.trainers.started[-1]

    def log_files(self) -> list[tuple[str, Path]]:
        return [("registry", self.registry.log_path), *self.trainers.log_files()]

    @contextlib.asynccontextmanager
    async def clients(self) -> AsyncIterator[Clients]:
        async with open_channel(self.trainer.address) as trainer, open_channel(self.registry.address) as registry, \
                open_event_log(self.nats.url) as events:
            yield Clients(TrainerApi(trainer), RegistryApi(registry), events)

    async def upload_digits(self, versions: int = 1) -> tuple[str, list[Any]]:
        """A fresh dataset with `versions` versions of digits (distinct content each)."""
        dataset = name("digits")
        async with open_channel(self.registry.address) as channel:
            uploaded = await RegistryApi(channel).dataset(
                dataset, [digits_npz(None if i == 0 else 1797 - i, seed=i) for i in range(versions)])
        return dataset, uploaded


@contextlib.contextmanager
def running_stack(root: Path, trainer_env: dict[str, str] | None = None) -> Iterator[Stack]:
    nats_server = start_nats(root / "nats")
    registry = None
    launcher = None
    try:
        registry = start_registry(root / "registry", nats_server.url)
        launcher = TrainerLauncher(root / "trainer", nats_server.url, registry.address, dict(trainer_env or {}))
        yield Stack(root, nats_server, registry, launcher)
    finally:
        if launcher is not None:
            launcher.stop_all()
        if registry is not None:
            registry.stop()
        nats_server.stop()


@pytest.fixture(scope="module")
def module_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with running_stack(tmp_path_factory.mktemp("stack")) as stack:
        stack.trainers.start()
        yield stack


@pytest.fixture
def stack(module_stack: Stack, request: pytest.FixtureRequest) -> Stack:
    for process in (module_stack.registry, module_stack.trainer):
        assert process.proc.poll() is None, f"{process.name} died (rc {process.proc.returncode}):\n{process.log()}"
    request.node.stash.setdefault(STACKS, []).append(module_stack)
    return module_stack


@pytest.fixture
def fresh_stack(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Stack]:
    with running_stack(tmp_path) as stack:
        request.node.stash.setdefault(STACKS, []).append(stack)
        yield stack


@pytest.fixture
async def digits(stack: Stack) -> Any:
    """(dataset name, its one version) in the shared stack's registry."""
    dataset, versions = await stack.upload_digits()
    return dataset, versions[0]
