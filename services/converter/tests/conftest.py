"""Fixtures of the converter's tests: trained hand-offs (MLP, tiny CNN) built once per session, and
real stacks (nats-server, `splitstack-registry`, `splitstack-converter` processes).

- `handoffs`: {"mlp": HandOff, "cnn": HandOff}, trained on digits and exported with a dynamic batch.
- `stack` (module): NATS + registry + one converter for target cpu with the default measurement
  floors (1,000 runs or 2 s per point), shared by the tests of a module on fresh model names.
- `fresh_stack` (function): NATS + registry + an empty converter pool (tests start, kill and restart
  converter replicas on one shared database themselves; measurement floors lowered).
- `stacks` (module): starts stacks with a converter environment of the test's choosing (and the
  registry on a given port), each with one converter; all stopped at the module's end.

When a test fails, the logs of every process it used are attached to its report.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # converter_models, converter_support: beside this file

from converter_models import HandOff, build  # noqa: E402
from converter_support import FAST_PROFILE, ConverterPool, ServiceProcess, start_registry  # noqa: E402

from splitstack.chassis.testing.fixtures import SERVICE_LOGS as STACKS  # noqa: E402
from splitstack.chassis.testing.servers import NatsServer, start_nats  # noqa: E402



@pytest.fixture(scope="session")
def handoffs() -> dict[str, HandOff]:
    return {kind: build(kind) for kind in ("mlp", "cnn")}


@dataclass
class Stack:
    """A running NATS + registry + converter pool."""

    nats: NatsServer
    registry: ServiceProcess
    pool: ConverterPool

    @property
    def converter(self) -> ServiceProcess:
        return self.pool.processes[0]

    def log_files(self) -> list[tuple[str, Path]]:
        return [("registry", self.registry.log_path), *((p.name, p.log_path) for p in self.pool.processes)]

    def attach_logs(self, node: pytest.Item) -> None:
        """Attach this stack's logs (as they are when the test ends) to `node`'s report on failure."""
        node.stash.setdefault(STACKS, []).append(self)


def _stack(root: Path, converter_env: dict[str, str], registry_port: int = 0) -> Iterator[Stack]:
    nats_server = start_nats(root / "nats")
    registry = None
    pool = None
    try:
        registry = start_registry(root / "registry", nats_server.url, registry_port)
        pool = ConverterPool(root / "converter", nats_server.url, registry.address, converter_env)
        yield Stack(nats_server, registry, pool)
    finally:
        if pool is not None:
            pool.stop_all()
        if registry is not None:
            registry.stop()
        nats_server.stop()


@pytest.fixture(scope="module")
def module_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    for stack in _stack(tmp_path_factory.mktemp("stack"), {}):
        stack.pool.start()
        yield stack


@pytest.fixture
def stack(module_stack: Stack, request: pytest.FixtureRequest) -> Stack:
    for process in [module_stack.registry, *module_stack.pool.processes]:
        assert process.proc.poll() is None, f"{process.name} died (rc {process.proc.returncode}):\n{process.log()}"
    module_stack.attach_logs(request.node)
    return module_stack


@pytest.fixture(scope="module")
def stacks(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., Stack]]:
    """`stacks(name, converter_env, registry_port=0)`: a started stack, stopped when the module ends."""
    with contextlib.ExitStack() as exits:
        def start(name: str, converter_env: dict[str, str], registry_port: int = 0) -> Stack:
            stack = exits.enter_context(contextlib.contextmanager(_stack)(
                tmp_path_factory.mktemp(name), converter_env, registry_port))
            stack.pool.start()
            return stack
        yield start


@pytest.fixture
def fresh_stack(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Stack]:
    env = {**FAST_PROFILE, "SPLITSTACK_CONVERTER_ACK_WAIT_SECONDS": "4", "SPLITSTACK_CONVERTER_LEASE_SECONDS": "4"}
    for stack in _stack(tmp_path, env):
        stack.attach_logs(request.node)
        yield stack
