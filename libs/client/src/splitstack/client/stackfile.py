"""The local stack's definition (`deploy/local/stack.toml`) and where the stack keeps its state.

The definition is data:

    [nats]                                   # extra nats-server arguments; {state_dir} is filled in
    args = ["--store_dir", "{state_dir}/nats"]
    ready_timeout_seconds = 15

    [services.registry]                      # one table per service
    command = "splitstack-registry"          # a console script, or an argv list
    depends_on = []                          # started (and ready) before this one
    env = { SPLITSTACK_REGISTRY_DB_URL = "sqlite:///{data_dir}/registry.db" }
    ready_timeout_seconds = 60

A service is started only when its command is installed (beside this Python or on PATH).
The state dir and the stack file come from flags, then SPLITSTACK_STATE_DIR /
SPLITSTACK_STACK_FILE, then the project root: the nearest directory at or above the working
directory that holds `deploy/local/stack.toml`.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HOST = "127.0.0.1"
STACK_FILE_IN_PROJECT = Path("deploy/local/stack.toml")
STATE_DIR_ENV = "SPLITSTACK_STATE_DIR"
STACK_FILE_ENV = "SPLITSTACK_STACK_FILE"
# Letters and digits only: the name becomes an env prefix (SPLITSTACK_<NAME>_...), and '_' or '-'
# would let one service's prefix swallow another's (probe / probe_b).
SERVICE_NAME = re.compile(r"^[a-z][a-z0-9]{0,31}$")
RESERVED_NAMES = frozenset({"nats", "logs", "run"})   # directories of the state dir
PLACEHOLDER = re.compile(r"\{([a-z_]+)\}")
NATS_PLACEHOLDERS = frozenset({"state_dir"})
SERVICE_PLACEHOLDERS = frozenset({"state_dir", "data_dir", "grpc_port", "metrics_port", "ready_file", "nats_url"})


class StackError(Exception):
    """An expected failure of the stack commands; the message is meant for the user as is."""


@dataclass(frozen=True)
class NatsSpec:
    """How the embedded nats-server runs (the supervisor adds -a, -p and -js itself)."""

    args: tuple[str, ...] = ("--store_dir", "{state_dir}/nats")
    ready_timeout_seconds: float = 15.0


@dataclass(frozen=True)
class ServiceSpec:
    """One `[services.<name>]` table."""

    name: str
    command: tuple[str, ...]
    depends_on: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    ready_timeout_seconds: float = 60.0


@dataclass(frozen=True)
class StackDefinition:
    """NATS and the services, dependencies before dependents (the start order)."""

    nats: NatsSpec
    services: tuple[ServiceSpec, ...]


def fill_placeholders(text: str, values: Mapping[str, str], where: str) -> str:
    """Replace each `{name}` in `text`; an unknown name is an error naming `where`."""
    def one(match: re.Match[str]) -> str:
        if match.group(1) not in values:
            raise StackError(f"{where}: unknown placeholder {{{match.group(1)}}} "
                             f"(known: {', '.join('{%s}' % k for k in sorted(values))})")
        return values[match.group(1)]
    return PLACEHOLDER.sub(one, text)


def resolve_program(program: str) -> str | None:
    """The executable for `program`: a path as given, else beside this Python, else on PATH."""
    if os.sep in program:
        return program if os.path.isfile(program) and os.access(program, os.X_OK) else None
    beside = Path(sys.executable).parent / program
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which(program)


def _check_keys(table: Mapping[str, Any], allowed: set[str], where: str) -> None:
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise StackError(f"{where}: unknown keys {', '.join(unknown)} (allowed: {', '.join(sorted(allowed))})")


def _timeout(table: Mapping[str, Any], default: float, where: str) -> float:
    value = table.get("ready_timeout_seconds", default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise StackError(f"{where}: ready_timeout_seconds must be a positive number, got {value!r}")
    return float(value)


def _strings(value: Any, where: str, what: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise StackError(f"{where}: {what} must be a list of strings, got {value!r}")
    return tuple(value)


def _nats_spec(table: Any, where: str) -> NatsSpec:
    if not isinstance(table, dict):
        raise StackError(f"{where}: must be a table")
    _check_keys(table, {"args", "ready_timeout_seconds"}, where)
    args = _strings(table.get("args", list(NatsSpec.args)), where, "args")
    for arg in args:
        fill_placeholders(arg, dict.fromkeys(NATS_PLACEHOLDERS, ""), f"{where} args")
    return NatsSpec(args, _timeout(table, NatsSpec.ready_timeout_seconds, where))


def _command(value: Any, where: str) -> tuple[str, ...]:
    command = tuple(value.split()) if isinstance(value, str) else _strings(value, where, "command")
    if not command or not command[0]:
        raise StackError(f"{where}: command is empty")
    return command


def _service_spec(name: str, table: Any, where: str) -> ServiceSpec:
    if not SERVICE_NAME.match(name) or name in RESERVED_NAMES:
        raise StackError(f"{where}: service name {name!r} must be 1-32 lowercase letters or digits, starting "
                         f"with a letter, and not one of {', '.join(sorted(RESERVED_NAMES))}")
    if not isinstance(table, dict) or "command" not in table:
        raise StackError(f"{where}: must be a table with a command")
    _check_keys(table, {"command", "depends_on", "env", "ready_timeout_seconds"}, where)
    env = table.get("env", {})
    if not isinstance(env, dict) or not all(isinstance(v, (str, int, float)) for v in env.values()):
        raise StackError(f"{where}: env must be a table of strings or numbers")
    env = {str(k): str(v) for k, v in env.items()}
    for key, value in env.items():
        fill_placeholders(value, dict.fromkeys(SERVICE_PLACEHOLDERS, ""), f"{where} env.{key}")
    depends_on = tuple(d for d in _strings(table.get("depends_on", []), where, "depends_on") if d != "nats")
    return ServiceSpec(name, _command(table["command"], where), depends_on, env,
                       _timeout(table, ServiceSpec.ready_timeout_seconds, where))


def _in_start_order(services: list[ServiceSpec], where: str) -> list[ServiceSpec]:
    """Dependencies before dependents, otherwise in file order; unknown names and cycles fail."""
    by_name = {s.name: s for s in services}
    order: list[ServiceSpec] = []
    visiting: list[str] = []

    def visit(spec: ServiceSpec) -> None:
        if spec in order:
            return
        if spec.name in visiting:
            raise StackError(f"{where}: dependency cycle {' -> '.join([*visiting, spec.name])}")
        visiting.append(spec.name)
        for dep in spec.depends_on:
            if dep not in by_name:
                raise StackError(f"{where}: services.{spec.name} depends on unknown service {dep!r}")
            visit(by_name[dep])
        visiting.pop()
        order.append(spec)

    for spec in services:
        visit(spec)
    return order


def load_stack_definition(path: Path) -> StackDefinition:
    """Parse and check a stack file; every problem is a StackError naming the file and the table."""
    try:
        doc = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise StackError(f"stack file {path} not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise StackError(f"{path}: {exc}") from None
    _check_keys(doc, {"nats", "services"}, str(path))
    services = doc.get("services", {})
    if not isinstance(services, dict):
        raise StackError(f"{path}: services must be a table of [services.<name>] tables")
    specs = [_service_spec(name, table, f"{path} [services.{name}]") for name, table in services.items()]
    return StackDefinition(_nats_spec(doc.get("nats", {}), f"{path} [nats]"), tuple(_in_start_order(specs, str(path))))


@dataclass(frozen=True)
class StackPaths:
    """Where the stack file is and where the state lives (both absolute)."""

    state_dir: Path
    stack_file: Path | None = None

    @property
    def stack_json(self) -> Path:
        return self.state_dir / "stack.json"

    def log_file(self, name: str) -> Path:
        return self.state_dir / "logs" / f"{name}.log"

    def ready_file(self, name: str) -> Path:
        return self.state_dir / "run" / f"{name}.ready"

    def data_dir(self, name: str) -> Path:
        return self.state_dir / name

    def create_dirs(self) -> None:
        for sub in ("logs", "run"):
            (self.state_dir / sub).mkdir(parents=True, exist_ok=True)

    def require_stack_file(self) -> Path:
        if self.stack_file is None:
            raise StackError(f"no stack file: not inside a splitstack project (no {STACK_FILE_IN_PROJECT} here "
                             f"or above); pass --stack-file or set {STACK_FILE_ENV}")
        return self.stack_file


def find_project_root(start: Path) -> Path | None:
    """The nearest directory at or above `start` holding deploy/local/stack.toml."""
    for candidate in (start, *start.parents):
        if (candidate / STACK_FILE_IN_PROJECT).is_file():
            return candidate
    return None


def locate(state_dir: str | os.PathLike[str] | None = None, stack_file: str | os.PathLike[str] | None = None,
           *, cwd: Path | None = None, environ: Mapping[str, str] | None = None) -> StackPaths:
    """StackPaths from explicit values, else the environment, else the project root above `cwd`."""
    environ = os.environ if environ is None else environ
    cwd = Path.cwd() if cwd is None else cwd
    state = state_dir or environ.get(STATE_DIR_ENV) or None
    stack = stack_file or environ.get(STACK_FILE_ENV) or None
    root = find_project_root(cwd.absolute()) if state is None or stack is None else None
    if state is None:
        if root is None:
            raise StackError(f"no state dir: {cwd} is not inside a splitstack project (no {STACK_FILE_IN_PROJECT} "
                             f"there or above); pass --state-dir or set {STATE_DIR_ENV}")
        state = root / "state"
    if stack is None and root is not None:
        stack = root / STACK_FILE_IN_PROJECT

    def absolute(p: str | os.PathLike[str]) -> Path:
        return Path(os.path.normpath(cwd.absolute() / Path(p)))
    return StackPaths(absolute(state), absolute(stack) if stack is not None else None)
