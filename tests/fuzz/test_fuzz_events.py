"""Poison events on every consumed subject: each one settled (the unhandleable ones dead-lettered on
`deadletter.<consumer>`), every process alive, and a canary published afterwards still handled.

Consumers: the trainer's work consumer (`data.updated`), the cpu converter pool's (`model.registered`,
`conversion.requested.*.cpu`) and serving's promotion fan-out (`model.promoted.fuzz-served.production`).
"""

from __future__ import annotations

import uuid

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fuzz_events import UNHANDLEABLE, Poison, poisons
from fuzz_report import Finding, FuzzLog, fuzz_settings, timeout_for
from fuzz_stack import CONSUMERS, FuzzStack, on_bus
from splitstack.contracts.envelope import MSG_ID_HEADER

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

    publish_poison()
    findings = settle_and_check(fuzz_stack, consumer, where, published, fuzz_log)
    assert not findings, "\n".join(f.line() for f in findings)


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
