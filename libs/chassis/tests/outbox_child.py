"""Child process for the outbox crash tests: a tiny "dataset registry" with an outbox.

`write URL DATASET EVENT_ID` registers a dataset version and its data.updated event in one
transaction, commits, then reaches crash point `test.after_commit`. `relay URL NATS_URL` relays
every pending event (crash point `outbox.after_publish` fires inside the relay). The tests arm
points through the environment (`crash_env`) and import this module for the schema.
"""

from __future__ import annotations

import asyncio
import sys

from sqlalchemy import Column, Engine, Integer, MetaData, String, Table, create_engine, insert
from sqlalchemy.orm import Session

from splitstack.chassis.faults import crash_point
from splitstack.chassis.outbox import Outbox, OutboxRelay, outbox_table
from splitstack.contracts.events import subject
from splitstack.events.v1 import events_pb2
from splitstack.registry.v1 import registry_pb2

PRODUCER = "test/outbox-child"

metadata = MetaData()
dataset_versions = Table(
    "dataset_versions", metadata,
    Column("dataset", String(63), primary_key=True),
    Column("version", Integer, primary_key=True),
)
outbox = outbox_table(metadata)


def dataset_updated(dataset: str, version: int) -> events_pb2.DataUpdated:
    """The event announcing a dataset version."""
    return events_pb2.DataUpdated(dataset_version=registry_pb2.DatasetVersion(dataset=dataset, version=version))


def register(engine: Engine, dataset: str, version: int, event_id: str | None = None) -> str:
    """Write the state row and its event in one transaction; return the event id."""
    with Session(engine) as session, session.begin():
        session.execute(insert(dataset_versions).values(dataset=dataset, version=version))
        return Outbox(outbox, PRODUCER).add(session, subject("data_updated", dataset=dataset),
                                            dataset_updated(dataset, version), event_id=event_id)


def write(url: str, dataset: str, event_id: str) -> None:
    engine = create_engine(url)
    metadata.create_all(engine)
    register(engine, dataset, 1, event_id)
    crash_point("test.after_commit")
    engine.dispose()


async def relay(url: str, nats_url: str) -> None:
    from splitstack.chassis.bus import connect_bus
    from splitstack.chassis.config import ChassisSettings

    engine = create_engine(url)
    bus = await connect_bus(ChassisSettings(nats_url=nats_url), producer=PRODUCER)
    try:
        await bus.ensure_streams()
        relay = OutboxRelay(engine, outbox, bus)
        while await relay.relay_once():
            pass
    finally:
        await bus.close()
        engine.dispose()


def main(argv: list[str]) -> None:
    command, url, *rest = argv
    if command == "write":
        write(url, *rest)
    elif command == "relay":
        asyncio.run(relay(url, *rest))
    else:
        raise SystemExit(f"unknown command {command!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
