"""Child processes a service starts for untrusted work (user code checks, artifact loading).

Such a child runs in its own session (`start_new_session=True`), so everything it starts shares
its process group; `kill_group` ends all of it at once and reaps the child.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess

log = logging.getLogger(__name__)

KILL_WAIT_SECONDS = 10.0


def kill_group(child: subprocess.Popen, wait_seconds: float = KILL_WAIT_SECONDS) -> None:
    """SIGKILL the child's process group (before the child is reaped, so the group is still its)."""
    try:
        os.killpg(child.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        child.wait(timeout=wait_seconds)
    except subprocess.TimeoutExpired:
        log.error("child process %d survived SIGKILL for %.0f s", child.pid, wait_seconds)


__all__ = ["KILL_WAIT_SECONDS", "kill_group"]
