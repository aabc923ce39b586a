"""Poison events for the consumers of the stack, and publishing them straight into JetStream.

Each consumer is fed payloads on the subjects it consumes (`CONSUMED`):
- `bytes`: random bytes, not an envelope at all;
- `no-id`: an envelope without event id or payload;
- `unknown-type`: an envelope whose payload names a type nobody knows;
- `garbage-value`: the right payload type with bytes that do not parse as it;
- `wrong-type`: a well-formed envelope around another event type;
- `nasty`: a well-formed envelope of the right type whose fields are hostile (names, versions, digests);
- `oversized`: the right type with a ~900 KB field (just under NATS' default 1 MB max payload);
on subjects whose name token is real, nearly valid or odd (`UPPER`, `é`, extra tokens, 200 characters).

The first four can never be handled: the consumer must dead-letter them at once
(`deadletter.<consumer>`, with the message's stream sequence). Every poison must be settled (acked or
terminated) within bounded time, and a canary published afterwards must still be handled.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from google.protobuf import any_pb2
from google.protobuf.message import Message
from hypothesis import strategies as st

from fuzz_messages import messages, near_miss_names
from fuzz_stack import CANARY_DATASET, CANARY_MODEL, DATASET, SERVED
from splitstack.contracts.envelope import wrap
from splitstack.events.v1 import events_pb2

UNHANDLEABLE = ("bytes", "no-id", "unknown-type", "garbage-value")
OVERSIZED_CHARS = 900 * 1024
MAX_POISON_BYTES = 1000 * 1024     # under NATS' default max payload (1 MiB), headers included
EVENT_TYPES = [events_pb2.DataUpdated, events_pb2.ModelRegistered, events_pb2.ModelPromoted,
               events_pb2.ConversionRequested, events_pb2.ModelConverted, events_pb2.DeadLetter]


@dataclass(frozen=True)
class Consumed:
    """A subject family a consumer reads, the payload type it expects there, and name tokens to try."""

    prefix: str                    # e.g. "data.updated"
    suffix: str                    # e.g. "" or ".cpu" (the converter pool's target)
    payload: type[Message]
    tokens: tuple[str, ...]        # real names; near misses are added


CONSUMED: dict[str, list[Consumed]] = {
    "trainer": [Consumed("data.updated", "", events_pb2.DataUpdated, (DATASET, CANARY_DATASET))],
    "converter": [Consumed("model.registered", "", events_pb2.ModelRegistered, (SERVED, CANARY_MODEL)),
                  Consumed("conversion.requested", ".cpu", events_pb2.ConversionRequested, (SERVED, CANARY_MODEL))],
    "serving": [Consumed("model.promoted", "", events_pb2.ModelPromoted, (f"{SERVED}.production",))],
}


@dataclass(frozen=True)
class Poison:
    """One message to publish: where, what kind, its bytes."""

    subject: str
    kind: str
    data: bytes

    def describe(self) -> str:
        return f"{self.kind} on {self.subject[:80]!r} ({len(self.data)} bytes: {self.data[:48]!r}...)"


def subject_tokens(consumed: Consumed) -> st.SearchStrategy[str]:
    """Real tokens mostly; odd ones that NATS still accepts as subject tokens sometimes (never on serving,
    whose consumer follows one exact subject; never several tokens where the filter wants exactly one)."""
    real = st.sampled_from(list(consumed.tokens))
    if consumed.prefix == "model.promoted":
        return real
    odd = ["UPPER", "é", "x" * 200, "-a", "a_b", "0"] + ([] if consumed.suffix else ["a.b.c"])
    near = near_miss_names(list(consumed.tokens)).filter(lambda t: _valid_token(t) and not (consumed.suffix and "." in t))
    return st.one_of(real, real, st.sampled_from(odd), near)


def _valid_token(token: str) -> bool:
    return bool(token) and not any(c in token for c in " \t\r\n\x00*>") and not token.startswith(".") \
        and not token.endswith(".") and ".." not in token


def _envelope(payload: Message) -> bytes:
    return wrap(payload, producer="fuzz").SerializeToString()


def _raw_envelope(type_url: str, value: bytes, event_id: str = "") -> bytes:
    env = events_pb2.Envelope(event_id=event_id or uuid.uuid4().hex, producer="fuzz",
                              payload=any_pb2.Any(type_url=type_url, value=value))
    return env.SerializeToString()


@st.composite
def poisons(draw: st.DrawFn, consumer: str) -> Poison:
    consumed = draw(st.sampled_from(CONSUMED[consumer]))
    subject = f"{consumed.prefix}.{draw(subject_tokens(consumed))}{consumed.suffix}"
    kind = draw(st.sampled_from(["bytes", "no-id", "unknown-type", "garbage-value", "wrong-type", "nasty", "nasty",
                                 "oversized"]))
    type_url = f"type.googleapis.com/{consumed.payload.DESCRIPTOR.full_name}"
    if kind == "bytes":
        data = draw(st.binary(min_size=1, max_size=256))
    elif kind == "no-id":
        data = events_pb2.Envelope(producer="fuzz").SerializeToString()
    elif kind == "unknown-type":
        data = _raw_envelope("type.googleapis.com/no.such.Event", draw(st.binary(max_size=32)))
    elif kind == "garbage-value":
        data = _raw_envelope(type_url, draw(st.sampled_from([b"\xff\xff\xff", b"\x0a\x05ab", b"\x08" * 9 + b"\x80"])))
    elif kind == "wrong-type":
        other = draw(st.sampled_from([t for t in EVENT_TYPES if t is not consumed.payload]))
        data = _envelope(draw(messages(other.DESCRIPTOR, consumed.tokens, big=False)))
    elif kind == "nasty":
        data = _envelope(draw(messages(consumed.payload.DESCRIPTOR, consumed.tokens, big=False)))
    else:
        payload = draw(messages(consumed.payload.DESCRIPTOR, consumed.tokens, big=False))
        _stuff(payload, "y" * OVERSIZED_CHARS)
        data = _envelope(payload)
    if len(data) > MAX_POISON_BYTES:   # many repeated items: NATS would refuse it; cut it (no longer well-formed)
        kind, data = "truncated", data[:MAX_POISON_BYTES]
    return Poison(subject, kind, data)


def _stuff(payload: Message, text: str) -> None:
    """Put `text` in the first string field found (depth-first) of `payload`."""
    for fd in payload.DESCRIPTOR.fields:
        if fd.type == fd.TYPE_STRING and not fd.message_type and not _repeated(fd):
            setattr(payload, fd.name, text)
            return
    for fd in payload.DESCRIPTOR.fields:
        if fd.type == fd.TYPE_MESSAGE and not _repeated(fd):
            _stuff(getattr(payload, fd.name), text)
            return


def _repeated(fd) -> bool:  # noqa: ANN001
    flag = getattr(fd, "is_repeated", None)
    return bool(flag) if flag is not None else fd.label == fd.LABEL_REPEATED
