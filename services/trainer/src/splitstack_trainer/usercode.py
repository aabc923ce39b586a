"""Which model code a job may name, and checking that code without running it in the trainer.

A JobSpec names its LightningModule and LightningDataModule by import path
(`package.module:Class`), and importing a module runs its code, so which code runs is the
operator's decision:

- the built-in recipes (modules under `splitstack_trainer.recipes`, shipped with the trainer) are
  always allowed; they are trusted code and checked in the trainer process itself;
- any other module must lie under one of the dotted prefixes of
  `SPLITSTACK_TRAINER_ALLOWED_MODULE_PREFIXES` (`acme.models` allows `acme.models` and
  `acme.models.mlp`, never `acme.modelsx`), or the spec is refused with INVALID_ARGUMENT before
  anything is imported. Import paths are plain ASCII dotted identifiers: nothing relative, empty,
  or otherwise odd reaches the import system;
- allowed code is never imported by the trainer. A short-lived child process
  (`python -I -m splitstack_trainer.job.codecheck`: isolated mode, so no PYTHON* variable, no user
  site and no current directory on its path) imports it in a fresh scratch directory with a
  scrubbed environment (no credentials, no GPU), binds the hyperparameters exactly as
  `specs.bind_hyperparameters` does, and writes the outcome as JSON. It is killed (its whole
  process group) after `code_check_timeout_seconds` (FAILED_PRECONDITION); a child that crashes or
  answers nothing is INVALID_ARGUMENT with its last output line. At most `max_code_checks` run at
  once and as many more wait for a place; past that a check is UNAVAILABLE (try again later), so
  checks never tie up more than twice `max_code_checks` of the trainer's threads.

The child's import path is the one a job process gets: the trainer's `PYTHONPATH`, absolute
entries only and none inside the trainer's work directory (`import_roots`), plus the
interpreter's own site-packages.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from splitstack.chassis.children import kill_group
from splitstack.chassis.errors import FailedPrecondition, InvalidArgument, Unavailable
from splitstack_trainer.jobconfig import SUPERVISOR_ENV

log = logging.getLogger(__name__)

BUILTIN_PREFIX = "splitstack_trainer.recipes"
ALLOWED_PREFIXES_VAR = "SPLITSTACK_TRAINER_ALLOWED_MODULE_PREFIXES"
TIMEOUT_VAR = "SPLITSTACK_TRAINER_CODE_CHECK_TIMEOUT_SECONDS"
CHECK_MODULE = "splitstack_trainer.job.codecheck"
DOTTED_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*")
MAX_IMPORT_PATH = 255
MAX_RESULT_BYTES = 1024 * 1024
TAIL_BYTES = 4096


def check_prefix(prefix: str) -> str:
    """An operator's allowed prefix: a dotted module name (a trailing dot is dropped); ValueError otherwise."""
    name = prefix.strip().removesuffix(".")
    if not DOTTED_NAME.fullmatch(name):
        raise ValueError(f"{prefix!r} is not a dotted module name (e.g. acme.models)")
    return name


def is_under(module: str, prefix: str) -> bool:
    """`module` is `prefix` itself or inside it (dotted: `foo` covers `foo.bar`, not `foobar`)."""
    return module == prefix or module.startswith(prefix + ".")


def split_import_path(field: str, path: str) -> tuple[str, str]:
    """(module, qualified name) of `package.module:Class`; InvalidArgument for anything else."""
    module, sep, qualname = path.partition(":")
    well_formed = (sep and len(path) <= MAX_IMPORT_PATH and DOTTED_NAME.fullmatch(module)
                   and DOTTED_NAME.fullmatch(qualname))
    if not well_formed:
        raise InvalidArgument(f"{field} {path[:MAX_IMPORT_PATH]!r} is not an import path of the form "
                              "package.module:Class (ASCII dotted names, nothing relative)")
    return module, qualname


def import_roots(pythonpath: str, work_dir: Path | None = None) -> list[str]:
    """The absolute entries of `pythonpath` outside `work_dir` (relative ones would resolve against a
    job's own directory, where a job could plant modules)."""
    roots = []
    for entry in pythonpath.split(os.pathsep):
        if not entry or not os.path.isabs(entry):
            continue
        if work_dir is not None and Path(entry).resolve().is_relative_to(work_dir.resolve()):
            continue
        roots.append(entry)
    return roots


class CodeChecker:
    """The operator's allow-list, and the child process that checks allowed code."""

    def __init__(self, allowed_prefixes: tuple[str, ...] = (), timeout_seconds: float = 120.0,
                 max_concurrent: int = 2, python: str = sys.executable, path: tuple[str, ...] = ()) -> None:
        self.allowed_prefixes = tuple(check_prefix(p) for p in allowed_prefixes)
        self.timeout_seconds = timeout_seconds
        self.python = python
        self.path = path
        self._slots = threading.BoundedSemaphore(max_concurrent)          # checks running
        self._admitted = threading.BoundedSemaphore(2 * max_concurrent)   # running or waiting for a slot
        self._max_concurrent = max_concurrent

    @classmethod
    def from_settings(cls, settings: Any) -> CodeChecker:
        work_dir = Path(settings.work_dir)
        return cls(settings.allowed_module_prefixes, settings.code_check_timeout_seconds, settings.max_code_checks,
                   path=tuple(import_roots(os.environ.get("PYTHONPATH", ""), work_dir)))

    @staticmethod
    def is_builtin(path: str) -> bool:
        return is_under(path.partition(":")[0], BUILTIN_PREFIX)

    def ensure_allowed(self, field: str, path: str) -> None:
        """InvalidArgument unless `path` is well-formed and its module built in or under an allowed prefix."""
        module, _ = split_import_path(field, path)
        if is_under(module, BUILTIN_PREFIX) or any(is_under(module, p) for p in self.allowed_prefixes):
            return
        allowed = ", ".join(self.allowed_prefixes) or "none set"
        raise InvalidArgument(f"{field} {path!r}: module {module!r} is not allowed on this trainer; it runs only "
                              f"the built-in recipes ({BUILTIN_PREFIX}) and modules under the operator's "
                              f"{ALLOWED_PREFIXES_VAR} ({allowed})")

    def check_in_child(self, module: str, datamodule: str,
                       hyperparameters: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """Import both classes and bind `hyperparameters` in a child process: (module kwargs, datamodule kwargs)."""
        busy = Unavailable(f"{self._max_concurrent} code checks are already running on this trainer and as many "
                           "wait (SPLITSTACK_TRAINER_MAX_CODE_CHECKS); try again later")
        if not self._admitted.acquire(blocking=False):
            raise busy
        try:
            if not self._slots.acquire(timeout=self.timeout_seconds):
                raise busy
            try:
                with tempfile.TemporaryDirectory(prefix="splitstack-codecheck-") as scratch:
                    outcome = self._run_child(Path(scratch), module, datamodule, dict(hyperparameters))
            finally:
                self._slots.release()
        finally:
            self._admitted.release()
        if "error" in outcome:
            raise InvalidArgument(str(outcome["error"]))
        return dict(outcome["module_hparams"]), dict(outcome["datamodule_hparams"])

    def _run_child(self, scratch: Path, module: str, datamodule: str, given: dict[str, Any]) -> dict[str, Any]:
        result, output = scratch / "result.json", scratch / "output.log"
        request = json.dumps({"path": list(self.path), "module": module, "datamodule": datamodule,
                              "hyperparameters": given, "result": str(result)})
        work = scratch / "cwd"
        work.mkdir()
        with open(output, "wb") as out:
            try:
                child = subprocess.Popen([self.python, "-I", "-m", CHECK_MODULE], stdin=subprocess.PIPE, stdout=out,
                                         stderr=subprocess.STDOUT, cwd=work, env=child_environment(scratch),
                                         start_new_session=True)
            except OSError as exc:
                raise FailedPrecondition(f"the code check of {module!r} could not start {self.python}: {exc}") from None
            try:
                child.communicate(request.encode(), timeout=self.timeout_seconds)
            except subprocess.TimeoutExpired:
                kill_group(child)
                log.warning("code check of %s / %s killed after %.0f s", module, datamodule, self.timeout_seconds)
                raise FailedPrecondition(
                    f"checking module {module!r} and datamodule {datamodule!r} did not finish within "
                    f"{self.timeout_seconds:g} s ({TIMEOUT_VAR}): importing them hangs or is too slow; "
                    "the checking process was killed") from None
            finally:
                kill_group(child)   # anything the user code left behind
        return _outcome(child.returncode, result, output, module, datamodule)


def child_environment(scratch: Path) -> dict[str, str]:
    """The checking child's whole environment: no credentials, no settings, no GPU, homes in `scratch`."""
    return {"PATH": os.environ.get("PATH", os.defpath), "HOME": str(scratch), "TMPDIR": str(scratch),
            "LANG": "C.UTF-8", "PYTHONSAFEPATH": "1", "PYTHONDONTWRITEBYTECODE": "1", "ORT_DISABLE_TELEMETRY": "1",
            "CUDA_VISIBLE_DEVICES": "", SUPERVISOR_ENV: str(os.getpid())}


def _outcome(returncode: int | None, result: Path, output: Path, module: str, datamodule: str) -> dict[str, Any]:
    try:
        with open(result, "rb") as source:
            outcome = json.loads(source.read(MAX_RESULT_BYTES))
        if isinstance(outcome, dict) and ("error" in outcome or {"module_hparams", "datamodule_hparams"} <= outcome.keys()):
            return outcome
    except (OSError, ValueError):
        pass
    last = _last_line(output)
    how = f"exited with status {returncode}"
    if returncode is not None and returncode < 0:
        how = f"was killed by signal {-returncode}"
        with contextlib.suppress(ValueError):
            how = f"was killed by {signal.Signals(-returncode).name}"
    return {"error": f"checking module {module!r} and datamodule {datamodule!r} failed: the checking process "
                     f"{how} without an answer" + (f": {last}" if last else "")}


def _last_line(path: Path) -> str:
    try:
        with open(path, "rb") as source:
            source.seek(max(0, path.stat().st_size - TAIL_BYTES))
            lines = [ln.strip() for ln in source.read().decode(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return lines[-1][-500:] if lines else ""
