"""The local stack supervisor against real processes: nats-server with JetStream and the chassis probe.

Every test uses its own state dir and stack file; the fixture runs `down` afterwards and checks
that no process of the test's state dir is left.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import nats
import pytest

sys.path.insert(0, str(Path(__file__).parent))  # stack_support: beside this file

from stack_support import processes_of, toml_value  # noqa: E402

from splitstack.client import processes, stack  # noqa: E402
from splitstack.client.health import check_grpc  # noqa: E402
from splitstack.client.stackfile import (  # noqa: E402
    StackError, StackPaths, find_project_root, load_stack_definition, locate)

PROBE = [sys.executable, "-m", "splitstack.chassis.testing.probe"]
# A second service on the probe's code: it reads SPLITSTACK_PROBE_*, so its entry maps those from
# the placeholders of its own allocation.
PROBE_AS_OTHER = {"SPLITSTACK_PROBE_GRPC_PORT": "{grpc_port}", "SPLITSTACK_PROBE_METRICS_PORT": "{metrics_port}",
                  "SPLITSTACK_PROBE_READY_FILE": "{ready_file}"}


def write_stack_file(path: Path, services: dict[str, dict[str, object]]) -> Path:
    lines = ["[nats]", 'args = ["--store_dir", "{state_dir}/nats"]']
    for name, table in services.items():
        lines += ["", f"[services.{name}]", *(f"{k} = {toml_value(v)}" for k, v in table.items())]
    path.write_text("\n".join(lines) + "\n")
    return path


def process_env(pid: int) -> dict[str, str]:
    pairs = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(p.decode().split("=", 1) for p in pairs if b"=" in p)


def recorded(paths: StackPaths) -> dict:
    return json.loads(paths.stack_json.read_text())


def pids(paths: StackPaths) -> dict[str, int | None]:
    return {c["name"]: c["pid"] for c in recorded(paths)["components"]}


@pytest.fixture
def make_stack(tmp_path: Path) -> Iterator[Callable[..., StackPaths]]:
    """make_stack(services) -> StackPaths of a fresh state dir; everything is stopped afterwards."""
    state_dir = tmp_path / "state"

    def make(services: dict[str, dict[str, object]] | None = None) -> StackPaths:
        return StackPaths(state_dir, write_stack_file(tmp_path / "stack.toml", services or {}))

    yield make
    stack.down(StackPaths(state_dir), stop_timeout=5)
    assert processes_of(state_dir) == []


async def jetstream_roundtrip(url: str, publish: bytes | None) -> bytes:
    """Create stream SURVIVE (idempotent), publish `publish` if given, return the first message."""
    nc = await nats.connect(url, connect_timeout=5, allow_reconnect=False)
    try:
        js = nc.jetstream(timeout=5)
        await js.add_stream(name="SURVIVE", subjects=["survive.>"])
        if publish is not None:
            await js.publish("survive.one", publish)
        return (await js.get_msg("SURVIVE", 1)).data
    finally:
        await nc.close()


def test_up_status_down_cycle(make_stack: Callable[..., StackPaths]) -> None:
    paths = make_stack()
    lines: list[str] = []
    stack.up(paths, report=lines.append)
    doc = recorded(paths)
    port = doc["components"][0]["ports"]["client"]
    assert port != 4222 and doc["addresses"]["nats"] == f"127.0.0.1:{port}"
    assert doc["nats_url"] == f"nats://127.0.0.1:{port}"
    assert stack.status(paths).healthy
    assert asyncio.run(jetstream_roundtrip(doc["nats_url"], b"hello")) == b"hello"
    first = pids(paths)

    again: list[str] = []
    stack.up(paths, report=again.append)
    assert pids(paths) == first
    assert any("already up" in line for line in again), again

    assert stack.down(paths) == ["nats"]
    assert pids(paths) == {"nats": None} and processes_of(paths.state_dir) == []
    report = stack.status(paths)
    assert not report.healthy and report.components[0].health.detail == "not running"
    assert stack.down(paths) == []


def test_jetstream_store_survives_restart(make_stack: Callable[..., StackPaths]) -> None:
    paths = make_stack()
    stack.up(paths)
    url = recorded(paths)["nats_url"]
    asyncio.run(jetstream_roundtrip(url, b"kept across restarts"))
    stack.down(paths)

    stack.up(paths)
    assert recorded(paths)["nats_url"] == url   # last run's port, still free, is reused
    assert asyncio.run(jetstream_roundtrip(url, None)) == b"kept across restarts"
    assert (paths.state_dir / "nats" / "jetstream").is_dir()


def test_service_gets_its_env_and_serves(make_stack: Callable[..., StackPaths]) -> None:
    paths = make_stack({"probe": {"command": PROBE, "ready_timeout_seconds": 60}})
    lines: list[str] = []
    stack.up(paths, report=lines.append)
    doc = recorded(paths)
    probe = doc["components"][1]
    assert probe["name"] == "probe" and doc["addresses"]["probe"] == f"127.0.0.1:{probe['ports']['grpc']}"
    assert check_grpc(doc["addresses"]["probe"]).healthy
    env = process_env(probe["pid"])
    assert env["SPLITSTACK_NATS_URL"] == doc["nats_url"]
    assert env["SPLITSTACK_PROBE_GRPC_PORT"] == str(probe["ports"]["grpc"])
    assert env["SPLITSTACK_PROBE_METRICS_PORT"] == str(probe["ports"]["metrics"])
    ready = json.loads(paths.ready_file("probe").read_text())
    assert ready["pid"] == probe["pid"] and ready["grpc_port"] == probe["ports"]["grpc"]
    assert paths.log_file("probe").is_file() and (paths.state_dir / "probe").is_dir()
    assert [row.name for row in stack.status(paths).components if row.health.healthy] == ["nats", "probe"]


def test_every_service_gets_every_peer_address(make_stack: Callable[..., StackPaths]) -> None:
    paths = make_stack({"beta": {"command": PROBE, "depends_on": ["alpha"], "env": PROBE_AS_OTHER},
                        "alpha": {"command": PROBE, "env": PROBE_AS_OTHER}})
    stack.up(paths)
    doc = recorded(paths)
    assert [c["name"] for c in doc["components"]] == ["nats", "alpha", "beta"]   # dependencies first
    ports = {c["name"]: c["ports"] for c in doc["components"]}
    beta_spec = load_stack_definition(paths.stack_file).services[1]
    assert stack.service_env(beta_spec, ports, paths) == {
        "SPLITSTACK_BETA_GRPC_HOST": "127.0.0.1",
        "SPLITSTACK_BETA_GRPC_PORT": str(ports["beta"]["grpc"]),
        "SPLITSTACK_BETA_METRICS_PORT": str(ports["beta"]["metrics"]),
        "SPLITSTACK_BETA_READY_FILE": str(paths.ready_file("beta")),
        "SPLITSTACK_NATS_URL": doc["nats_url"],
        "SPLITSTACK_ALPHA_ADDR": doc["addresses"]["alpha"],
        "SPLITSTACK_PROBE_GRPC_PORT": str(ports["beta"]["grpc"]),
        "SPLITSTACK_PROBE_METRICS_PORT": str(ports["beta"]["metrics"]),
        "SPLITSTACK_PROBE_READY_FILE": str(paths.ready_file("beta")),
    }
    alpha, beta = doc["components"][1], doc["components"][2]
    assert process_env(beta["pid"])["SPLITSTACK_ALPHA_ADDR"] == doc["addresses"]["alpha"]
    assert process_env(alpha["pid"])["SPLITSTACK_BETA_ADDR"] == doc["addresses"]["beta"]
    assert check_grpc(doc["addresses"]["alpha"]).healthy and check_grpc(doc["addresses"]["beta"]).healthy


def test_failing_service_fails_up_and_leaves_nothing_running(make_stack: Callable[..., StackPaths]) -> None:
    crash = "import sys; print('broken: no database configured', file=sys.stderr); sys.exit(3)"
    paths = make_stack({"broken": {"command": [sys.executable, "-c", crash]}})
    with pytest.raises(stack.ServiceStartError) as failure:
        stack.up(paths)
    message = str(failure.value)
    assert message.startswith("broken failed to start: exited with code 3")
    assert "broken: no database configured" in message and str(paths.log_file("broken")) in message
    assert set(pids(paths).values()) == {None}
    assert processes_of(paths.state_dir) == []


def test_service_never_ready_times_out_and_is_stopped(make_stack: Callable[..., StackPaths]) -> None:
    hang = "import time; print('waiting for a database', flush=True); time.sleep(120)"
    paths = make_stack({"stuck": {"command": [sys.executable, "-c", hang], "ready_timeout_seconds": 1}})
    with pytest.raises(stack.ServiceStartError, match=r"stuck failed to start: not ready within 1s") as failure:
        stack.up(paths)
    assert "waiting for a database" in str(failure.value)
    assert processes_of(paths.state_dir) == []


def test_uninstalled_service_is_skipped_and_reported(make_stack: Callable[..., StackPaths]) -> None:
    paths = make_stack({"ghost": {"command": "splitstack-ghost-not-installed"},
                        "haunted": {"command": PROBE, "depends_on": ["ghost"]}})
    lines: list[str] = []
    stack.up(paths, report=lines.append)
    assert "ghost: skipped (splitstack-ghost-not-installed is not installed)" in lines
    assert "haunted: skipped (depends on ghost, which is skipped)" in lines
    assert list(pids(paths)) == ["nats"] and set(recorded(paths)["skipped"]) == {"ghost", "haunted"}
    report = stack.status(paths)
    assert report.healthy and report.skipped["ghost"] == "splitstack-ghost-not-installed is not installed"


def test_up_restarts_only_what_died(make_stack: Callable[..., StackPaths]) -> None:
    paths = make_stack({"probe": {"command": PROBE}})
    stack.up(paths)
    first = pids(paths)

    os.kill(first["probe"], signal.SIGKILL)
    assert not stack.status(paths).healthy
    stack.up(paths)
    second = pids(paths)
    assert second["nats"] == first["nats"] and second["probe"] not in (None, first["probe"])

    nats_port = recorded(paths)["components"][0]["ports"]["client"]
    os.kill(second["nats"], signal.SIGKILL)
    lines: list[str] = []
    stack.up(paths, report=lines.append)
    third = pids(paths)
    # NATS comes back on its port, so the probe's environment is unchanged and it keeps running.
    assert third["probe"] == second["probe"] and third["nats"] not in (None, second["nats"]), lines
    assert recorded(paths)["components"][0]["ports"]["client"] == nats_port
    assert stack.status(paths).healthy, lines


def test_changed_entry_restarts_that_service(make_stack: Callable[..., StackPaths]) -> None:
    paths = make_stack({"probe": {"command": PROBE}})
    stack.up(paths)
    first = pids(paths)
    make_stack({"probe": {"command": PROBE, "env": {"SPLITSTACK_PROBE_LOG_LEVEL": "DEBUG"}}})
    lines: list[str] = []
    stack.up(paths, report=lines.append)
    assert "probe: restarting (configuration changed)" in lines
    assert pids(paths)["nats"] == first["nats"] and pids(paths)["probe"] != first["probe"]
    assert process_env(pids(paths)["probe"])["SPLITSTACK_PROBE_LOG_LEVEL"] == "DEBUG"


def test_entry_removed_from_the_stack_file_is_stopped(make_stack: Callable[..., StackPaths]) -> None:
    paths = make_stack({"probe": {"command": PROBE}})
    stack.up(paths)
    probe = recorded(paths)["components"][1]
    make_stack()
    lines: list[str] = []
    stack.up(paths, report=lines.append)
    assert "probe: stopping (no longer in the stack)" in lines
    assert list(pids(paths)) == ["nats"] and not processes.is_alive(probe["pid"], probe["start_time"])


def test_down_without_any_state_is_fine(tmp_path: Path) -> None:
    lines: list[str] = []
    assert stack.down(StackPaths(tmp_path / "never"), report=lines.append) == []
    assert lines == [f"nothing was running (no {tmp_path / 'never' / 'stack.json'})"]
    assert not (tmp_path / "never").exists()


@pytest.mark.parametrize(("services", "message"), [
    ({"a": {"command": "x", "depends_on": ["b"]}}, "depends on unknown service 'b'"),
    ({"a": {"command": "x", "depends_on": ["b"]}, "b": {"command": "x", "depends_on": ["a"]}},
     "dependency cycle a -> b -> a"),
    ({"Bad_Name": {"command": "x"}}, "service name 'Bad_Name'"),
    ({"logs": {"command": "x"}}, "service name 'logs'"),
    ({"a": {"command": "x", "port": 1}}, "unknown keys port"),
    ({"a": {"command": "x", "env": {"K": "{nope}"}}}, "unknown placeholder {nope}"),
    ({"a": {"command": []}}, "command is empty"),
    ({"a": {"command": "x", "ready_timeout_seconds": 0}}, "ready_timeout_seconds must be a positive number"),
])
def test_stack_file_mistakes_are_named(tmp_path: Path, services: dict, message: str) -> None:
    path = write_stack_file(tmp_path / "stack.toml", services)
    with pytest.raises(StackError, match="^" + str(path)) as failure:
        load_stack_definition(path)
    assert message in str(failure.value)


def test_shipped_stack_file_parses() -> None:
    root = find_project_root(Path(__file__).resolve().parent)
    assert root is not None
    definition = load_stack_definition(root / "deploy/local/stack.toml")
    assert definition.nats.args == ("--store_dir", "{state_dir}/nats")
    names = [service.name for service in definition.services]
    assert "registry" in names and set(names) <= {"registry", "trainer", "converter", "serving"}
    for service in definition.services:  # a service reads only its own prefix (shared vars aside)
        assert all(var.startswith(f"SPLITSTACK_{service.name.upper()}_") for var in service.env), service


def test_paths_come_from_flags_env_or_project_root(tmp_path: Path) -> None:
    project = tmp_path / "project"
    (project / "deploy/local").mkdir(parents=True)
    (project / "deploy/local/stack.toml").write_text("[nats]\n")
    inner = project / "services" / "x"
    inner.mkdir(parents=True)

    found = locate(cwd=inner, environ={})
    assert found == StackPaths(project / "state", project / "deploy/local/stack.toml")
    from_env = locate(cwd=inner, environ={"SPLITSTACK_STATE_DIR": "s", "SPLITSTACK_STACK_FILE": "/etc/st.toml"})
    assert from_env == StackPaths(inner / "s", Path("/etc/st.toml"))
    assert locate("flag", cwd=inner, environ={"SPLITSTACK_STATE_DIR": "s"}).state_dir == inner / "flag"

    with pytest.raises(StackError, match="pass --state-dir"):
        locate(cwd=tmp_path, environ={})
    with pytest.raises(StackError, match="pass --stack-file"):
        locate("st", cwd=tmp_path, environ={}).require_stack_file()
