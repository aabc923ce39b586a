"""Bounds on every free-text and metadata field a client may send, and on an event's size.

Names have their own rule (`splitstack.contracts.names`). Everything else a client writes that the
platform stores or announces (reasons, descriptions, actors, idempotency keys, metadata maps,
hyperparameter text) is bounded here, once, so a request cannot grow a database row or an event
past what NATS accepts (its default max payload is 1 MiB; an event here is at most
`MAX_EVENT_BYTES`). Each check raises `OutOfBounds` (a ValueError that the chassis maps to
INVALID_ARGUMENT) naming the field.
"""

from __future__ import annotations

from collections.abc import Mapping

MAX_SHORT_TEXT = 255           # idempotency keys, file names, actors, requested_by, labels
MAX_LONG_TEXT = 4096           # reasons, descriptions, free-form notes
MAX_METADATA_ENTRIES = 64      # entries of one metadata / labels / hyperparameter map
MAX_METADATA_KEY = 128         # characters of one key
MAX_METADATA_VALUE = 4096      # characters of one value
MAX_METADATA_TOTAL = 32 * 1024  # characters of keys and values of one map together
MAX_EVENT_BYTES = 256 * 1024   # one encoded event envelope (NATS' default max payload is 1 MiB)


class OutOfBounds(ValueError):
    """A field is longer, larger or more numerous than its documented bound."""


def check_text(field: str, value: object, limit: int = MAX_SHORT_TEXT, *, single_line: bool = False) -> str:
    """`value` is a string of at most `limit` characters (and no line break or NUL if single_line)."""
    if not isinstance(value, str):
        raise OutOfBounds(f"{field} must be text, got {type(value).__name__}")
    if len(value) > limit:
        raise OutOfBounds(f"{field} is {len(value)} characters long; at most {limit} are allowed")
    if "\x00" in value:
        raise OutOfBounds(f"{field} contains a NUL character")
    if single_line and ("\n" in value or "\r" in value):
        raise OutOfBounds(f"{field} must be a single line")
    return value


def check_metadata(field: str, values: Mapping[str, str], *, max_entries: int = MAX_METADATA_ENTRIES) -> None:
    """A string map: bounded entries, non-empty single-line keys, bounded keys, values and total."""
    if len(values) > max_entries:
        raise OutOfBounds(f"{field} has {len(values)} entries; at most {max_entries} are allowed")
    total = 0
    for key, value in values.items():
        if not key:
            raise OutOfBounds(f"{field} has an empty key")
        check_text(f"{field} key {key[:40]!r}", key, MAX_METADATA_KEY, single_line=True)
        check_text(f"{field}[{key!r}]", value, MAX_METADATA_VALUE)
        total += len(key) + len(value)
    if total > MAX_METADATA_TOTAL:
        raise OutOfBounds(f"{field} holds {total} characters in all; at most {MAX_METADATA_TOTAL} are allowed")


def check_event_size(subject: str, encoded: bytes | int) -> None:
    """An encoded event envelope fits `MAX_EVENT_BYTES`."""
    size = encoded if isinstance(encoded, int) else len(encoded)
    if size > MAX_EVENT_BYTES:
        raise OutOfBounds(f"the event for {subject[:120]!r} would be {size} bytes; at most "
                          f"{MAX_EVENT_BYTES} are allowed (shorten the request's text or metadata)")


__all__ = ["MAX_EVENT_BYTES", "MAX_LONG_TEXT", "MAX_METADATA_ENTRIES", "MAX_METADATA_KEY",
           "MAX_METADATA_TOTAL", "MAX_METADATA_VALUE", "MAX_SHORT_TEXT", "OutOfBounds", "check_event_size",
           "check_metadata", "check_text"]
