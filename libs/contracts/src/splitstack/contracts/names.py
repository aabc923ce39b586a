"""The one naming rule for models, datasets, targets and aliases (they appear in subjects and paths).

Names are checked with a full match: `re.match` with `$` would also accept a trailing newline
("prod\\n"), which NATS refuses in a subject and which would then block every later event.
"""

from __future__ import annotations

import re

NAME_RULE = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")
NAME_RULE_TEXT = "1-63 characters of a-z, 0-9, '_' or '-', starting with a letter or digit"
_DECIMAL = re.compile(r"[0-9]{1,18}")


class InvalidName(ValueError):
    """A name broke the naming rule; the message names the field and the value."""


def is_valid_name(value: object) -> bool:
    """True when `value` is a string that matches the naming rule in full."""
    return isinstance(value, str) and NAME_RULE.fullmatch(value) is not None


def check_name(field: str, value: object) -> str:
    """Return `value` if valid, else raise InvalidName naming `field`."""
    if not is_valid_name(value):
        raise InvalidName(f"{field} {_shown(value)} is not a valid name: {NAME_RULE_TEXT}")
    return value  # type: ignore[return-value]


def _shown(value: object) -> str:
    """The rejected value for an error message, cut so a huge value cannot make a huge message."""
    text = repr(value)
    return text if len(text) <= 80 else f"{text[:77]}..."


def version_string(version: int) -> str:
    """A registry version as the Open Inference Protocol carries it (decimal string)."""
    if version <= 0:
        raise ValueError(f"version must be a positive integer, got {version}")
    return str(version)


def parse_version(text: str) -> int:
    """Parse an Open Inference Protocol version string; empty means 'any' (0)."""
    if text == "":
        return 0
    if not _DECIMAL.fullmatch(text) or int(text) <= 0:
        raise ValueError(f"model version {_shown(text)} is not a positive decimal integer")
    return int(text)
