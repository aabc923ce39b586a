"""The event envelope: wrap a payload with id, time, producer and trace context; unwrap it back."""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from google.protobuf import any_pb2, message as pb_message, symbol_database
from google.protobuf.timestamp_pb2 import Timestamp

from splitstack.events.v1 import events_pb2

MSG_ID_HEADER = "Nats-Msg-Id"


def new_event_id() -> str:
    """A fresh globally unique event id."""
    return uuid.uuid4().hex


def wrap(payload: pb_message.Message, *, producer: str, event_id: str | None = None,
         trace_context: dict[str, str] | None = None) -> events_pb2.Envelope:
    """Build an envelope around `payload` (event_id generated unless given, e.g. by the outbox)."""
    env = events_pb2.Envelope(event_id=event_id or new_event_id(), producer=producer,
                              trace_context=trace_context or {})
    env.occurred_at.GetCurrentTime()
    env.payload.Pack(payload)
    return env


@dataclass(frozen=True)
class Event:
    """A decoded envelope: its metadata and the unpacked payload message."""

    event_id: str
    occurred_at: Timestamp
    producer: str
    trace_context: dict[str, str]
    payload: pb_message.Message

    @property
    def type_name(self) -> str:
        return self.payload.DESCRIPTOR.full_name


def unpack_any(value: any_pb2.Any) -> pb_message.Message:
    """Unpack an Any into its registered message class (ValueError when the type is unknown)."""
    full_name = value.TypeName()
    try:
        cls = symbol_database.Default().GetSymbol(full_name)
    except KeyError:
        raise ValueError(f"unknown event payload type {full_name!r}") from None
    msg = cls()
    try:
        unpacked = value.Unpack(msg)
    except Exception as exc:  # protobuf raises DecodeError, a bare Exception subclass
        raise ValueError(f"event payload is not a valid {full_name}: {exc}") from None
    if not unpacked:
        raise ValueError(f"event payload type {full_name!r} does not match its message")
    return msg


def unwrap(data: bytes) -> Event:
    """Decode envelope bytes (ValueError on anything that is not a valid envelope)."""
    env = events_pb2.Envelope()
    try:
        env.ParseFromString(data)
    except Exception as exc:  # protobuf raises DecodeError, a bare Exception subclass
        raise ValueError(f"not an event envelope: {exc}") from None
    if not env.event_id or not env.payload.type_url:
        raise ValueError("event envelope lacks event_id or payload")
    return Event(event_id=env.event_id, occurred_at=env.occurred_at, producer=env.producer,
                 trace_context=dict(env.trace_context), payload=unpack_any(env.payload))
