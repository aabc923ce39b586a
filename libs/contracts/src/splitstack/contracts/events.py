"""Event subjects, JetStream streams and durable consumers, loaded from events.toml.

Use `subject("model_promoted", model="digits", alias="production")` to name a subject, and
`STREAMS` / `CONSUMERS` for set-up; nothing else in the monorepo spells a subject by hand.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass
from importlib import resources

from google.protobuf import message as pb_message
from google.protobuf import symbol_database

from splitstack.contracts.names import check_name

_TOKEN = re.compile(r"<([a-z_]+)>")


@dataclass(frozen=True)
class StreamDef:
    """A JetStream stream: its name, subjects and retention settings."""

    name: str
    description: str
    subjects: tuple[str, ...]
    retention: str
    storage: str
    duplicate_window_seconds: float
    max_age_days: float


@dataclass(frozen=True)
class SubjectDef:
    """An event subject pattern, its payload message and producer."""

    key: str
    pattern: str
    message: str
    producer: str
    transport: str

    @property
    def tokens(self) -> tuple[str, ...]:
        return tuple(_TOKEN.findall(self.pattern))

    def format(self, **tokens: str) -> str:
        """Fill every <token>; each value must obey the naming rule (or be '*' / '>' wildcards)."""
        missing = set(self.tokens) - set(tokens)
        extra = set(tokens) - set(self.tokens)
        if missing or extra:
            raise ValueError(f"subject {self.pattern}: missing {sorted(missing)}, unexpected {sorted(extra)}")
        for token, value in tokens.items():
            if value not in ("*", ">"):
                check_name(token, value)
        return _TOKEN.sub(lambda m: tokens[m.group(1)], self.pattern)

    def wildcard(self) -> str:
        """The subject with every token replaced by '*' (matches any instance)."""
        return _TOKEN.sub("*", self.pattern)

    def message_class(self) -> type[pb_message.Message]:
        """The generated payload class (imports the events module on first use)."""
        from splitstack.events.v1 import events_pb2  # noqa: F401  registers the descriptors

        return symbol_database.Default().GetSymbol(self.message)


@dataclass(frozen=True)
class ConsumerDef:
    """A durable work consumer shared by a service pool's replicas."""

    key: str
    durable: str
    stream: str
    filter_subjects: tuple[str, ...]

    def for_target(self, target: str) -> "ConsumerDef":
        """The pool's consumer for one inference target (fills <target>)."""
        check_name("target", target)
        fill = lambda s: s.replace("<target>", target)  # noqa: E731
        return ConsumerDef(self.key, fill(self.durable), self.stream, tuple(fill(s) for s in self.filter_subjects))


def _load() -> dict:
    return tomllib.loads(resources.files(__package__).joinpath("events.toml").read_text())


_DATA = _load()
STREAMS: dict[str, StreamDef] = {
    name: StreamDef(name=name, **{**spec, "subjects": tuple(spec["subjects"])})
    for name, spec in _DATA["streams"].items()
}
SUBJECTS: dict[str, SubjectDef] = {key: SubjectDef(key=key, **spec) for key, spec in _DATA["subjects"].items()}
CONSUMERS: dict[str, ConsumerDef] = {
    key: ConsumerDef(key=key, durable=spec["durable"], stream=spec["stream"],
                     filter_subjects=tuple(spec["filter_subjects"]))
    for key, spec in _DATA["consumers"].items()
}


def subject(key: str, **tokens: str) -> str:
    """Name a concrete subject, e.g. subject('data_updated', dataset='digits')."""
    return SUBJECTS[key].format(**tokens)


def subject_matches(pattern: str, concrete: str) -> bool:
    """NATS wildcard match ('*' one token, '>' the rest)."""
    p, c = pattern.split("."), concrete.split(".")
    for i, token in enumerate(p):
        if token == ">":
            return len(c) > i
        if i >= len(c) or (token != "*" and token != c[i]):
            return False
    return len(p) == len(c)


def stream_for(concrete_subject: str) -> StreamDef | None:
    """The stream that stores `concrete_subject`, or None for core-NATS subjects."""
    for stream in STREAMS.values():
        if any(subject_matches(s, concrete_subject) for s in stream.subjects):
            return stream
    return None


def definition_for(concrete_subject: str) -> SubjectDef:
    """The subject definition a concrete subject belongs to."""
    for definition in SUBJECTS.values():
        if subject_matches(definition.wildcard(), concrete_subject):
            return definition
    raise KeyError(f"no contract subject matches {concrete_subject!r}")
