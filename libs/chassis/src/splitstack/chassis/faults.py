"""Named crash points: let a test kill a process at an exact line, the way a power cut would.

Code marks the places where a crash matters with `crash_point("outbox.after_publish")`. A test
arms points for a child process through its environment (`crash_env`):

- `SPLITSTACK_CRASH_POINTS`: comma-separated point names; `name@N` crashes on the N-th time the
  point is reached (default: the first).
- `SPLITSTACK_CRASH_MARKER_DIR`: where a marker file named after the point is written (and fsync'd)
  just before the crash, so the test can assert the point was reached (`crash_point_hit`). When
  unset, the marker goes into the process's current working directory at the time of the crash.

An armed point ends the process with SIGKILL on the spot: no exception, no `finally`, no atexit
handler, no flush of buffered output. The environment is read once; when nothing is armed a
point costs one cached lookup.
"""

from __future__ import annotations

import functools
import os
import re
import signal
import threading
from collections.abc import Iterable, Mapping
from pathlib import Path

POINTS_ENV = "SPLITSTACK_CRASH_POINTS"
MARKER_DIR_ENV = "SPLITSTACK_CRASH_MARKER_DIR"
POINT_RULE = re.compile(r"^[a-z0-9][a-z0-9_.-]*$")

_hits: dict[str, int] = {}
_hits_lock = threading.Lock()


@functools.cache
def check_point_name(name: str) -> str:
    """Return `name` if it obeys the crash point naming rule, else raise ValueError."""
    if not isinstance(name, str) or not POINT_RULE.match(name):
        raise ValueError(f"crash point {name!r} is not a valid name: a-z, 0-9, '_', '.' or '-', "
                         "starting with a letter or digit")
    return name


def parse_crash_points(spec: str) -> dict[str, int]:
    """Parse `a,b@3` into {point name: the hit that crashes}; ValueError on a malformed entry."""
    armed: dict[str, int] = {}
    for entry in (e.strip() for e in spec.split(",")):
        if not entry:
            continue
        name, _, nth = entry.partition("@")
        check_point_name(name)
        if nth and (not nth.isdigit() or int(nth) < 1):
            raise ValueError(f"{POINTS_ENV}: {entry!r}: the hit count after '@' must be a positive integer")
        if name in armed:
            raise ValueError(f"{POINTS_ENV}: crash point {name!r} is armed twice")
        armed[name] = int(nth) if nth else 1
    return armed


@functools.cache
def armed_crash_points() -> Mapping[str, int]:
    """The points this process arms, read from the environment on first use and cached."""
    return parse_crash_points(os.environ.get(POINTS_ENV, ""))


def crash_point(name: str) -> None:
    """Die here with SIGKILL if `name` is armed and this is the armed hit; otherwise do nothing."""
    check_point_name(name)
    armed = armed_crash_points()
    if not armed or name not in armed:
        return
    with _hits_lock:
        _hits[name] = _hits.get(name, 0) + 1
        if _hits[name] != armed[name]:
            return
        _write_marker(name, _hits[name])
        os.kill(os.getpid(), signal.SIGKILL)


def _write_marker(name: str, hit: int) -> None:
    """Write and fsync `<marker dir>/<name>` (pid and hit), then fsync the directory entry."""
    marker_dir = Path(os.environ.get(MARKER_DIR_ENV) or os.getcwd())
    fd = os.open(marker_dir / name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, f"pid={os.getpid()} hit={hit}\n".encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    dir_fd = os.open(marker_dir, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    os.write(2, f"crash point {name} hit {hit}: SIGKILL\n".encode())


def crash_env(points: Iterable[str], marker_dir: Path) -> dict[str, str]:
    """The variables that arm `points` (`name` or `name@N`) in a child; merge them into its env."""
    spec = ",".join(points)
    parse_crash_points(spec)
    return {POINTS_ENV: spec, MARKER_DIR_ENV: str(marker_dir)}


def crash_point_hit(marker_dir: Path, name: str) -> bool:
    """True when a process armed by `crash_env(..., marker_dir)` died at point `name`."""
    return (Path(marker_dir) / check_point_name(name)).is_file()
