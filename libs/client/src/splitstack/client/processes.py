"""Detached local processes and free ports, for the stack supervisor.

A process is identified by its pid *and* its start time (from /proc), so a pid reused by an
unrelated process after a reboot or a long pause is never signalled. Processes start in their own
session (they outlive the `splitstack up` that started them) and are stopped as a process group.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from splitstack.client.stackfile import HOST

log = logging.getLogger(__name__)

NEVER_PORTS = frozenset({4222})  # the system NATS's default port: never ours, even when free

# Processes this Python process started and has not yet seen exit (an in-process `up`, as in tests):
# polled so they are reaped, not left as zombies; a CLI `up` exits and leaves them to init.
_CHILDREN: dict[int, subprocess.Popen] = {}


def process_start_time(pid: int) -> int | None:
    """The start time of the process with this pid, or None when there is none (or only its zombie)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = stat[stat.rindex(")") + 2:].split()   # from field 3 (state): num_threads is [17], starttime [19]
    # A zombie leader whose other threads still run (Go's nats-server) still holds its ports.
    exited = fields[0] in ("Z", "X") and int(fields[17]) <= 1
    return None if exited else int(fields[19])


def is_alive(pid: int, start_time: int | None) -> bool:
    """True when `pid` is still the process that started at `start_time`."""
    child = _CHILDREN.get(pid)
    if child is not None and child.poll() is not None:
        del _CHILDREN[pid]
    return start_time is not None and process_start_time(pid) == start_time


def _wait_gone(pid: int, start_time: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while is_alive(pid, start_time):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def terminate(name: str, pid: int, start_time: int | None, timeout: float) -> None:
    """SIGTERM the process group led by `pid`, wait up to `timeout`, then SIGKILL it."""
    if start_time is None or not is_alive(pid, start_time):
        return
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, sig)   # started with start_new_session: pgid == pid
        if _wait_gone(pid, start_time, timeout):
            return
        log.warning("%s (pid %s) still runs %.0fs after %s", name, pid, timeout, sig.name)


def start_detached(argv: Sequence[str], env: Mapping[str, str], log_path: Path, cwd: Path) -> subprocess.Popen:
    """Start in a new session, stdin from /dev/null, stdout and stderr appended to `log_path`."""
    with open(log_path, "ab") as log_file:
        log_file.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} starting {list(argv)}\n".encode())
        log_file.flush()
        proc = subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
                                env={**os.environ, **env}, cwd=cwd, start_new_session=True)
    _CHILDREN[proc.pid] = proc
    return proc


def log_tail(path: Path, lines: int = 20) -> str:
    """The last lines of a log file (or a note that there is none)."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no log written)"


def port_is_free(port: int) -> bool:
    """True when a server could listen on HOST:port now (SO_REUSEADDR, as NATS and gRPC bind)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
    return True


def free_port(taken: set[int]) -> int:
    """A port free now on HOST that is not in `taken` (nor the system NATS's 4222)."""
    while True:
        with socket.socket() as sock:
            sock.bind((HOST, 0))
            port = sock.getsockname()[1]
        if port not in taken and port not in NEVER_PORTS:
            return port
