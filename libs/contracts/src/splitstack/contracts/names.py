"""The one naming rule for models, datasets, targets and aliases (they appear in subjects and paths)."""

from __future__ import annotations

import re

NAME_RULE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
NAME_RULE_TEXT = "1-63 characters of a-z, 0-9, '_' or '-', starting with a letter or digit"


class InvalidName(ValueError):
    """A name broke the naming rule; the message names the field and the value."""


def is_valid_name(value: str) -> bool:
    """True when `value` matches the naming rule."""
    return bool(NAME_RULE.match(value))


def check_name(field: str, value: str) -> str:
    """Return `value` if valid, else raise InvalidName naming `field`."""
    if not isinstance(value, str) or not NAME_RULE.match(value):
        raise InvalidName(f"{field} {value!r} is not a valid name: {NAME_RULE_TEXT}")
    return value


def version_string(version: int) -> str:
    """A registry version as the Open Inference Protocol carries it (decimal string)."""
    if version <= 0:
        raise ValueError(f"version must be a positive integer, got {version}")
    return str(version)


def parse_version(text: str) -> int:
    """Parse an Open Inference Protocol version string; empty means 'any' (0)."""
    if text == "":
        return 0
    if not text.isdigit() or int(text) <= 0:
        raise ValueError(f"model version {text!r} is not a positive decimal integer")
    return int(text)
