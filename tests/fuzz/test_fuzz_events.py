"""Poison events on every consumed subject: each one settled (the unhandleable ones dead-lettered on
`deadletter.<consumer>`), every process alive, and a canary published afterwards still handled.

Consumers: the trainer's work consumer (`data.updated`; an enabled retrain policy listens on the poisoned
dataset, so well-formed poison becomes retraining triggers), the cpu converter pool's (`model.registered`,
`conversion.requested.*.cpu`) and serving's promotion fan-out (`model.promoted.fuzz-served.production`).
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fuzz_events import UNHANDLEABLE, Poison, poisons
from fuzz_report import Finding, FuzzLog, fuzz_settings, timeout_for
from fuzz_stack import CONSUMERS, DATASET, PLAIN_MODEL, FuzzStack, on_bus
from splitstack.contracts.envelope import MSG_ID_HEADER
from splitstack.trainer.v1 import trainer_pb2 as tpb

CANARY = {"trainer": "canary_data", "converter": "canary_conversion", "serving": "canary_promotion"}
POISONS_PER_EXAMPLE = 3   # each hypothesis example publishes this many poisons


def publish(stack: FuzzStack, batch: list[Poison]) -> list[int]:
    """Publish each poison into its stream (a unique Nats-Msg-Id each); their stream sequences."""
    async def send(nc) -> list[int]:  # noqa: ANN001
        js = nc.jetstream()
        acks = [await js.publish(p.subject, p.data, headers={MSG_ID_HEADER: f"fuzz-{uuid.uuid4().hex}"})
                for p in batch]
        return [ack.seq for ack in acks]
    return on_bus(stack.nats_url, send)


@pytest.mark.fuzz
@pytest.mark.parametrize("consumer", [pytest.param(c, marks=pytest.mark.timeout(timeout_for(POISONS_PER_EXAMPLE)))
                                      for c in CANARY])
def test_poison_events_are_settled_and_events_still_flow(consumer: str, fuzz_stack: FuzzStack,
                                                         fuzz_log: FuzzLog) -> None:
    where = f"consumer {CONSUMERS[consumer][1]}"
    published: list[tuple[Poison, int]] = []

    @fuzz_settings()
    @given(st.lists(poisons(consumer), min_size=POISONS_PER_EXAMPLE, max_size=POISONS_PER_EXAMPLE))
    def publish_poison(batch: list[Poison]) -> None:
        for poison, sequence in zip(batch, publish(fuzz_stack, batch), strict=True):
            published.append((poison, sequence))
            fuzz_log.record(where, poison.kind)

    with listening_policy(fuzz_stack, consumer):
        publish_poison()
        findings = settle_and_check(fuzz_stack, consumer, where, published, fuzz_log)
    assert not findings, "\n".join(f.line() for f in findings)


@contextlib.contextmanager
def listening_policy(stack: FuzzStack, consumer: str) -> Iterator[None]:
    """For the trainer: an enabled retrain policy on the poisoned dataset, so a well-formed poison is noted as a
    retraining trigger (an hour's debounce: no job starts during the test); deleted afterwards."""
    if consumer != "trainer":
        yield
        return
    spec = tpb.JobSpec(model=PLAIN_MODEL, dataset=DATASET, recipe="digits-mlp", max_epochs=1)
    policy = tpb.RetrainPolicy(name="fuzz-listening", model=PLAIN_MODEL, dataset=DATASET, template=spec,
                               debounce_seconds=3600, min_interval_seconds=3600, max_concurrent_jobs=1, enabled=True)
    stack.trainer.SetRetrainPolicy(tpb.SetRetrainPolicyRequest(policy=policy), timeout=60)
    try:
        yield
    finally:
        stack.trainer.DeleteRetrainPolicy(tpb.DeleteRetrainPolicyRequest(name=policy.name), timeout=60)


def settle_and_check(stack: FuzzStack, consumer: str, where: str, published: list[tuple[Poison, int]],
                     log: FuzzLog) -> list[Finding]:
    """Every poison settled, the unhandleable ones dead-lettered, processes alive, the canary handled."""
    found: list[Finding] = []
    last = max(sequence for _, sequence in published)
    try:
        stack.wait_settled(consumer, last)
    except AssertionError as exc:
        found.append(log.find(Finding(where, f"poison not settled: {exc}")))
    lettered = {letter.stream_sequence for letter in stack.dead_letters(CONSUMERS[consumer][1])}
    for poison, sequence in published:
        if poison.kind in UNHANDLEABLE and sequence not in lettered and not found:
            found.append(log.find(Finding(where, f"not dead-lettered (stream seq {sequence})", poison.describe())))
            break
    found += [log.find(Finding(where, f"{name} process died; restarted")) for name in stack.revive()]
    try:
        getattr(stack, CANARY[consumer])()
    except AssertionError as exc:
        found.append(log.find(Finding(where, f"events stalled after poison: {exc}")))
    return found
