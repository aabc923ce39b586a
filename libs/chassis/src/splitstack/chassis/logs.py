"""Process-wide logging for a service started by `run_service`.

`configure_logging` installs one stderr handler on the root logger; `apply_level` sets the root
level from the service's settings, but only in a process whose logging the chassis configured
(so tests and embedding applications keep their own logging set-up).
"""

from __future__ import annotations

import logging
import sys

from splitstack.chassis.config import ConfigError

LOG_FORMAT = "%(asctime)s %(levelname)s [%(process)d] %(name)s: %(message)s"
_HANDLER_NAME = "splitstack-chassis"


def parse_level(level: str) -> int:
    """The numeric level for a name such as "info" or "DEBUG"; ConfigError when unknown."""
    value = logging.getLevelName(level.strip().upper())
    if not isinstance(value, int):
        raise ConfigError(f"log_level {level!r} is not one of DEBUG, INFO, WARNING, ERROR, CRITICAL")
    return value


def configure_logging(level: str = "INFO") -> None:
    """Log to stderr at `level`; idempotent."""
    root = logging.getLogger()
    if not any(h.get_name() == _HANDLER_NAME for h in root.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.set_name(_HANDLER_NAME)
        handler.setFormatter(logging.Formatter(LOG_FORMAT))
        root.addHandler(handler)
    root.setLevel(parse_level(level))


def apply_level(level: str) -> None:
    """Validate `level`; set it on the root logger when `configure_logging` set logging up."""
    value = parse_level(level)
    root = logging.getLogger()
    if any(h.get_name() == _HANDLER_NAME for h in root.handlers):
        root.setLevel(value)
