"""Work on untrusted bytes runs in a child process: no credentials, its own scratch directory, and a
time and a memory limit.

Loading a registry artifact (`torch.export.load` unpickles parts of a .pt2; ONNX Runtime runs any
graph it is given) is the riskiest thing the converter does, so it never happens in the service
process. Each piece of such work is one child, `python -I -m splitstack_converter.pipeline.worker
SPEC` (see `worker`), started with:

- **an environment built from an allow-list** (`CHILD_ENV_ALLOWED`): no `SPLITSTACK_*` settings
  (database URL, registry and NATS addresses, NATS credentials, TLS key paths), no `AWS_*` or other
  secrets; HOME and TMPDIR point into the scratch directory; `PYTHONSAFEPATH=1` and `-I` keep the
  working directory and user site-packages off `sys.path`;
- **a per-task scratch directory as its working directory**, removed with the conversion's;
- **a memory limit** (`RLIMIT_AS`, set by the child itself before it imports anything heavy) and a
  **time limit**: a child still running at the limit is killed with its whole process group;
- its own session (process group), and `PR_SET_PDEATHSIG` so it dies with the converter.

The parent receives only files the spec names and a small JSON result, and validates them
itself. A crash, a timeout or an exhausted memory limit raises `ChildFailed` with a reason that
says which; the caller turns it into a rejected candidate or a failed conversion.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from splitstack.chassis.children import kill_group

log = logging.getLogger(__name__)

WORKER_MODULE = "splitstack_converter.pipeline.worker"
SPEC_FILENAME = "spec.json"
RESULT_FILENAME = "result.json"
LOG_FILENAME = "child.log"
MAX_RESULT_BYTES = 1024 * 1024
LOG_TAIL_CHARS = 2000
MIB = 1024 * 1024

# Variables a child may inherit: how to find programs and libraries, locale, accelerators, threads.
CHILD_ENV_ALLOWED = ("PATH", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "LD_LIBRARY_PATH", "CUDA_VISIBLE_DEVICES",
                     "NVIDIA_VISIBLE_DEVICES", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
# Signs in a child's output that it hit its memory limit.
OUT_OF_MEMORY_SIGNS = ("MemoryError", "std::bad_alloc", "can't allocate memory", "Cannot allocate memory",
                       "out of memory", "Failed to allocate")


@dataclass(frozen=True)
class ChildLimits:
    """What a child may use: wall-clock seconds and address space (0: no memory limit)."""

    timeout_seconds: float = 300.0
    memory_bytes: int = 8192 * MIB

    def __post_init__(self) -> None:
        if self.timeout_seconds <= 0 or self.memory_bytes < 0:
            raise ValueError("child limits: timeout_seconds > 0 and memory_bytes >= 0 are required")

    def with_timeout(self, seconds: float) -> ChildLimits:
        return ChildLimits(seconds, self.memory_bytes)

    def describe_memory(self) -> str:
        return f"{self.memory_bytes // MIB} MiB" if self.memory_bytes else "unlimited"


class ChildFailed(Exception):
    """A child process crashed, was killed at its time limit, ran out of memory, or answered nonsense."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class ChildRefused(Exception):
    """The child finished and refused its input for a reason it reports (`stage`, `reason`)."""

    def __init__(self, stage: str, reason: str) -> None:
        super().__init__(reason)
        self.stage = stage
        self.reason = reason


def child_environment(scratch: Path, parent: dict[str, str] | None = None) -> dict[str, str]:
    """The whole environment of a child: the allow-listed variables of `parent`, plus fixed ones."""
    source = os.environ if parent is None else parent
    env = {name: source[name] for name in CHILD_ENV_ALLOWED if name in source}
    env.setdefault("PATH", "/usr/bin:/bin")
    env.update({"HOME": str(scratch), "TMPDIR": str(scratch), "XDG_CACHE_HOME": str(scratch / ".cache"),
                "PYTHONSAFEPATH": "1", "PYTHONDONTWRITEBYTECODE": "1", "ORT_DISABLE_TELEMETRY": "1"})
    return env


def run_child(task: str, spec: dict[str, Any], scratch: Path, limits: ChildLimits, *, what: str) -> dict[str, Any]:
    """Run worker task `task` on `spec` in a fresh child inside `scratch`; its JSON result.

    ChildRefused when the child reports that the input is unusable; ChildFailed when it crashed, hit a
    limit or left no readable result. `what` names the work in the reasons ("loading the exported program").
    """
    scratch.mkdir(parents=True, exist_ok=True)
    result_path = scratch / RESULT_FILENAME
    result_path.unlink(missing_ok=True)
    full_spec = {**spec, "task": task, "memory_bytes": limits.memory_bytes, "result": str(result_path)}
    (scratch / SPEC_FILENAME).write_text(json.dumps(full_spec))
    command = [sys.executable, "-I", "-m", WORKER_MODULE, str(scratch / SPEC_FILENAME)]
    with open(scratch / LOG_FILENAME, "wb") as output:
        child = subprocess.Popen(command, cwd=scratch, env=child_environment(scratch), stdin=subprocess.DEVNULL,
                                 stdout=output, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code = child.wait(timeout=limits.timeout_seconds)
        except subprocess.TimeoutExpired:
            kill_group(child)   # the child and whatever it started in its session
            raise ChildFailed(f"{what} did not finish within its {limits.timeout_seconds:g}s time limit "
                              f"(the process was killed)") from None
        except BaseException:
            kill_group(child)
            raise
    return _result(code, result_path, scratch / LOG_FILENAME, limits, what)


def _result(code: int, result_path: Path, log_path: Path, limits: ChildLimits, what: str) -> dict[str, Any]:
    tail = _tail(log_path)
    if code != 0:
        if any(sign in tail for sign in OUT_OF_MEMORY_SIGNS):
            raise ChildFailed(f"{what} ran out of its memory limit ({limits.describe_memory()}): "
                              f"{_last_line(tail)}")
        if code < 0:
            raise ChildFailed(f"{what} crashed (killed by {_signal_name(-code)}): {_last_line(tail)}")
        raise ChildFailed(f"{what} failed (exit status {code}): {_last_line(tail)}")
    try:
        if result_path.stat().st_size > MAX_RESULT_BYTES:
            raise ChildFailed(f"{what} answered with more than {MAX_RESULT_BYTES} bytes of result")
        result = json.loads(result_path.read_text())
    except (OSError, ValueError) as exc:
        raise ChildFailed(f"{what} left no readable result ({type(exc).__name__}): {_last_line(tail)}") from None
    if not isinstance(result, dict):
        raise ChildFailed(f"{what} answered with a {type(result).__name__}, not an object")
    refusal = result.get("refused")
    if isinstance(refusal, dict):
        raise ChildRefused(str(refusal.get("stage", "")), str(refusal.get("reason", ""))[:2000])
    return result


def _tail(path: Path) -> str:
    try:
        with open(path, "rb") as handle:
            handle.seek(max(0, path.stat().st_size - LOG_TAIL_CHARS))
            return handle.read().decode(errors="replace")
    except OSError:
        return ""


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1][:500] if lines else "no output"


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"
