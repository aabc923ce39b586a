"""Event handlers of the pool's work consumer `converter-<target>` (idempotent, see core.convert).

- `model.registered.<model>`: converted when this pool's target is among the version's required
  targets; acked otherwise.
- `conversion.requested.<model>.<target>`: converted (the consumer's filter only delivers this
  pool's target).

A conversion that fails has its conversion.failed event committed first; the message is then
terminated (`Terminate`), never redelivered. A transient error (registry or database unavailable)
naks the message; on its last allowed delivery the conversion is failed and reported instead.
"""

from __future__ import annotations

import logging

from splitstack.chassis.consumers import Delivery, Terminate
from splitstack.converter.v1 import converter_pb2 as pb
from splitstack.events.v1 import events_pb2
from splitstack_converter.conversion import ConversionJob
from splitstack_converter.core import Converter

log = logging.getLogger(__name__)


def job_for(payload: object, event_id: str, target: str) -> ConversionJob | None:
    """The conversion an event asks this pool for, or None when it asks nothing of it."""
    if isinstance(payload, events_pb2.ModelRegistered):
        if target not in payload.required_targets:
            return None
        announced = {ref.kind: ref.sha256 for ref in payload.artifacts if not ref.target and ref.sha256}
        return ConversionJob(model=payload.model, version=payload.version, target=target, trigger_event_id=event_id,
                             explicit=False, announced_digests=announced)
    if isinstance(payload, events_pb2.ConversionRequested):
        if payload.target != target:
            return None
        tolerance = payload.tolerance if payload.HasField("tolerance") else None
        return ConversionJob(model=payload.model, version=payload.version, target=target, trigger_event_id=event_id,
                             explicit=True, tolerance=tolerance, requested_by=payload.requested_by)
    raise Terminate(f"the converter does not handle {type(payload).__name__} events")


class WorkHandler:
    """Handles one delivery of the pool's work consumer."""

    def __init__(self, converter: Converter, max_deliver: int) -> None:
        self.converter = converter
        self.max_deliver = max_deliver

    async def __call__(self, delivery: Delivery) -> None:
        job = job_for(delivery.event.payload, delivery.event.event_id, self.converter.target.id)
        if job is None:
            log.debug("%s does not concern target %s; acked", delivery.subject, self.converter.target.id)
            return
        final = await self.converter.convert(job, last_delivery=delivery.num_delivered >= self.max_deliver)
        if final.state == pb.FAILED:
            raise Terminate(f"conversion {job.id} failed at {final.stage}: {final.error}")
