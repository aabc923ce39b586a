"""The demo's own embedded stack: a wiped state dir, a stack file derived from the project's, up and down.

The stack file is the project's `deploy/local/stack.toml` with serving told to follow the demo
model's `production` alias. Serving is ready only once every model it follows is loaded, so the
stack comes up in two steps: NATS, registry, trainer and converter first (`up(only=...)`), serving
after the first promotion (`up()`, which adopts what already runs). `down` always runs at the end,
also on Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import json
import logging
import shutil
import signal
import tomllib
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

from splitstack.client import stack
from splitstack.client.stackfile import StackError, StackPaths

log = logging.getLogger(__name__)

MARKER = ".splitstack-demo"     # a state dir holding it was made by the demo and may be wiped
WITHOUT_SERVING = ("registry", "trainer", "converter")


def fresh_state_dir(state_dir: Path) -> None:
    """Empty `state_dir` for a repeatable run; refuse one the demo did not create."""
    if state_dir.exists() and any(state_dir.iterdir()):
        if not (state_dir / MARKER).is_file():
            raise StackError(f"{state_dir} is not empty and was not made by `splitstack demo`; "
                             f"pass another --state-dir")
        stack.down(StackPaths(state_dir), stop_timeout=5)   # a run killed without its clean-up
        shutil.rmtree(state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    (state_dir / MARKER).write_text("made by `splitstack demo`; wiped at its next start\n")


def toml_value(value: Any) -> str:
    """Enough TOML for stack files: strings, numbers, booleans, lists and inline tables."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{key} = {toml_value(v)}" for key, v in value.items()) + " }"
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return json.dumps(value)   # JSON strings and numbers are TOML basic strings and numbers


def write_demo_stack_file(project_stack_file: Path, state_dir: Path, model: str) -> Path:
    """The project's stack file, with serving following `model`, written into the demo's state dir."""
    try:
        doc = tomllib.loads(project_stack_file.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise StackError(f"cannot read the project's stack file {project_stack_file}: {exc}") from None
    services = doc.get("services", {})
    if "serving" not in services:
        raise StackError(f"{project_stack_file} has no [services.serving]; the demo needs one")
    services["serving"].setdefault("env", {})["SPLITSTACK_SERVING_MODELS"] = model
    lines = [f"# Written by `splitstack demo` from {project_stack_file}.", "", "[nats]"]
    lines += [f"{key} = {toml_value(value)}" for key, value in doc.get("nats", {}).items()]
    for name, table in services.items():
        lines += ["", f"[services.{name}]", *(f"{key} = {toml_value(value)}" for key, value in table.items())]
    path = state_dir / "stack.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


class DemoStack:
    """The demo's stack; a context manager that always stops everything it started."""

    def __init__(self, paths: StackPaths, report: Callable[[str], None]) -> None:
        self.paths, self.report = paths, report
        self._previous_sigterm: Any = None

    def __enter__(self) -> DemoStack:
        self._previous_sigterm = signal.signal(signal.SIGTERM, _interrupt)
        try:
            stack.up(self.paths, report=self.report, only=WITHOUT_SERVING)
        except BaseException:
            self.__exit__()
            raise
        return self

    def start_serving(self) -> None:
        """Everything, serving included: waits until serving has loaded the followed model."""
        stack.up(self.paths, report=self.report)

    def __exit__(self, *exc: object) -> None:
        try:
            stack.down(self.paths, report=self.report, stop_timeout=10)
        finally:
            signal.signal(signal.SIGTERM, self._previous_sigterm or signal.SIG_DFL)


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")
