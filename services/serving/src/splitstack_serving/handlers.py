"""Event handlers of the serving service: `model.promoted` through a fan-out consumer.

Every replica sees every promotion (fan-out). The handler is idempotent (see lifecycle.py: the
alias is read back from the registry and a version already current is not reloaded). A load that
fails is reported and the message acked (retrying a bad artifact cannot help); a transient
failure (registry unreachable) raises, so the message is redelivered after a delay, and it also
wakes the reconciler, which keeps retrying with back-off beyond the bounded redeliveries.
"""

from __future__ import annotations

from splitstack.chassis.bus import Delivery, Terminate
from splitstack.events.v1 import events_pb2

from splitstack_serving.lifecycle import ModelLifecycle

PROMOTIONS_CONSUMER = "serving-promotions"   # labels the fan-out consumer's metrics and dead letters


class PromotionHandler:
    """Handles `model.promoted.<model>.<alias>` deliveries for the aliases this server follows."""

    def __init__(self, lifecycle: ModelLifecycle) -> None:
        self.lifecycle = lifecycle

    async def __call__(self, delivery: Delivery) -> None:
        payload = delivery.event.payload
        if not isinstance(payload, events_pb2.ModelPromoted):
            raise Terminate(f"expected a ModelPromoted on {delivery.subject}, got {payload.DESCRIPTOR.full_name}")
        await self.lifecycle.on_promoted(payload)
