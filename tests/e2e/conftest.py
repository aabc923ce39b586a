"""Fixtures of the end-to-end suite: real stacks of nats-server + registry + trainer + cpu converter +
cpu serving processes (see `e2e_stack.py`), reached only through gRPC and NATS.

- `shared` (session): one stack for the tests that need no crash; serving follows every model of
  SHARED_MODELS at `production`.
- `champion` (session, through `trained_champion`): version 1 of `loop` on the shared stack, trained
  by the trainer from dataset `digits` version 1, converted, promoted by the registry's policy and
  served. Its hand-off is what the other tests copy when their subject is not training.
- `new_stack` (function): a factory of fresh stacks for crash tests (their own processes, stopped at
  the end of the test).

A failing test's report carries the tail of every log of the stacks it used (chassis SERVICE_LOGS).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # e2e_*: beside this file

from e2e_stack import SERVICES, Stack  # noqa: E402
from e2e_support import (  # noqa: E402
    LOOP_DATASET, LOOP_MODEL, Champion, Clients, Digits, HandOff, NewStack, clients_of, job_spec, wait_alias,
    wait_choice, wait_job, wait_served,
)

from splitstack.chassis.testing.fixtures import SERVICE_LOGS  # noqa: E402

SHARED_MODELS = [LOOP_MODEL, "int8-gate", "two-targets", "worse", "rollback"]
CHAMPION_ROWS = 1000
CHAMPION_EPOCHS = 5


@pytest.fixture(scope="session")
def digits() -> Digits:
    return Digits.load()


@pytest.fixture(scope="session")
def shared_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    stack = Stack(tmp_path_factory.mktemp("shared"), SHARED_MODELS)
    try:
        stack.start_all()
        yield stack
    finally:
        stack.stop()


@pytest.fixture(scope="session")
def shared_clients(shared_stack: Stack) -> Iterator[Clients]:
    clients = clients_of(shared_stack)
    yield clients
    clients.close()


@pytest.fixture
def shared(shared_stack: Stack, request: pytest.FixtureRequest) -> Stack:
    request.node.stash.setdefault(SERVICE_LOGS, []).append(shared_stack)
    shared_stack.alive()
    return shared_stack


@pytest.fixture(scope="session")
def trained_champion(shared_stack: Stack, shared_clients: Clients, digits: Digits) -> Champion:
    """`loop` v1: dataset -> train -> convert -> auto-promote -> served."""
    api = shared_clients
    api.registry.create_dataset(LOOP_DATASET)
    api.registry.upload_dataset(LOOP_DATASET, digits.dataset(CHAMPION_ROWS))
    job = wait_job(api.trainer, api.trainer.submit(job_spec(LOOP_MODEL, LOOP_DATASET, max_epochs=CHAMPION_EPOCHS)).id)
    wait_choice(api.registry, LOOP_MODEL, job.model_version)
    wait_alias(api.registry, LOOP_MODEL, job.model_version)
    served = wait_served(api.serving, LOOP_MODEL, job.model_version)
    return Champion(LOOP_MODEL, job.model_version, job, HandOff.of(api.registry, LOOP_MODEL, job.model_version), served)


@pytest.fixture
def champion(shared_stack: Stack, request: pytest.FixtureRequest) -> Champion:
    """The trained champion; if training it fails, the test's report carries the shared stack's logs."""
    logs = request.node.stash.setdefault(SERVICE_LOGS, [])
    if shared_stack in logs:
        return request.getfixturevalue("trained_champion")
    logs.append(shared_stack)
    found = request.getfixturevalue("trained_champion")
    logs.remove(shared_stack)
    return found


@pytest.fixture
def new_stack(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[NewStack]:
    """`new_stack(models, services=..., crash_points={service: [...]}, seed=f)`: a started fresh stack and
    its clients; `seed(clients)` runs once the registry is up, before the converter starts."""
    made: list[tuple[Stack, Clients]] = []

    def make(models: list[str], services: Iterable[str] = SERVICES, crash_points: dict[str, list[str]] | None = None,
             seed: Callable[[Clients], object] | None = None) -> tuple[Stack, Clients]:
        stack = Stack(tmp_path / f"stack-{len(made) + 1}", models)
        request.node.stash.setdefault(SERVICE_LOGS, []).append(stack)
        clients = clients_of(stack)
        made.append((stack, clients))
        stack.start_all(services, crash_points, before=(lambda: seed(clients)) if seed else None)
        return stack, clients

    yield make
    for stack, clients in made:
        clients.close()
        stack.stop()
