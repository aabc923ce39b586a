"""Event handlers (idempotent).

- `data.updated.<dataset>` through the durable work consumer `trainer` (shared by replicas):
  noted as a retraining trigger of each enabled policy of the dataset (retrain.py); acked once the
  trigger is committed, so a crash before that redelivers it, and a redelivery changes nothing.
- `training.progress.<job>` on core NATS (every replica): the latest progress of a job.

Crash points: `trainer.trigger_noted` (the trigger is committed, the message not yet acked) and
`trainer.job_registering` (rank zero says it is registering its version).
"""

from __future__ import annotations

import logging

from splitstack.chassis.consumers import Delivery, Terminate
from splitstack.chassis.faults import crash_point
from splitstack.contracts.envelope import Event
from splitstack.events.v1 import events_pb2
from splitstack_trainer.core import Trainer

log = logging.getLogger(__name__)

TRIGGER_NOTED = "trainer.trigger_noted"
JOB_REGISTERING = "trainer.job_registering"


class DataUpdatedHandler:
    """Handles one delivery of the `trainer` work consumer."""

    def __init__(self, trainer: Trainer) -> None:
        self.trainer = trainer

    async def __call__(self, delivery: Delivery) -> None:
        payload = delivery.event.payload
        if not isinstance(payload, events_pb2.DataUpdated):
            raise Terminate(f"the trainer does not handle {type(payload).__name__} on {delivery.subject}")
        version = payload.dataset_version
        noted = await self.trainer.retraining.on_data_updated(version, delivery.event.event_id)
        if noted:
            crash_point(TRIGGER_NOTED)
        log.info("data.updated %s version %d (delivery %d): %d retraining polic%s noted it", version.dataset,
                 version.version, delivery.num_delivered, noted, "y" if noted == 1 else "ies")


class ProgressHandler:
    """Handles training.progress.<job> messages."""

    def __init__(self, trainer: Trainer) -> None:
        self.trainer = trainer

    async def __call__(self, event: Event) -> None:
        if isinstance(event.payload, events_pb2.TrainingProgress):
            if event.payload.progress.stage == "register":
                crash_point(JOB_REGISTERING)
            await self.trainer.on_progress(event.payload.progress)
