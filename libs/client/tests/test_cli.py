"""The `splitstack` CLI as a user runs it: a separate process, then the stack it started outlives it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from splitstack.client import stack
from splitstack.client.stackfile import StackPaths

PROBE = '["' + sys.executable + '", "-m", "splitstack.chassis.testing.probe"]'
CONSOLE_SCRIPT = Path(sys.executable).parent / "splitstack"


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("SPLITSTACK_STATE_DIR", "SPLITSTACK_STACK_FILE")}
    return subprocess.run([sys.executable, "-m", "splitstack.client.cli", *args], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=120)


@pytest.fixture
def state_dir(tmp_path: Path) -> Iterator[Path]:
    """A state dir whose stack is stopped after the test, whatever the CLI left."""
    yield tmp_path / "state"
    stack.down(StackPaths(tmp_path / "state"), stop_timeout=5)


def stack_file(tmp_path: Path, services: str = "") -> Path:
    path = tmp_path / "stack.toml"
    path.write_text('[nats]\nargs = ["--store_dir", "{state_dir}/nats"]\n' + services)
    return path


def test_up_status_down(tmp_path: Path, state_dir: Path) -> None:
    services = f"[services.probe]\ncommand = {PROBE}\n"
    flags = ["--state-dir", str(state_dir), "--stack-file", str(stack_file(tmp_path, services))]
    up = run_cli("up", *flags)
    assert up.returncode == 0, up.stderr
    assert "nats: started" in up.stdout and "probe: started" in up.stdout

    table = run_cli("status", *flags)
    assert table.returncode == 0, table.stdout + table.stderr
    assert "probe" in table.stdout and "SERVING" in table.stdout and "all healthy" in table.stdout
    report = json.loads(run_cli("status", "--json", *flags).stdout)
    assert report["healthy"] and [c["name"] for c in report["components"]] == ["nats", "probe"]
    assert all(c["pid"] and c["health"] for c in report["components"])

    assert run_cli("up", *flags).stdout.startswith("stack is already up and healthy")

    down = run_cli("down", "--state-dir", str(state_dir))
    assert down.returncode == 0 and "stopped probe, nats" in down.stdout
    after = run_cli("status", "--json", *flags)
    assert after.returncode == 1 and not json.loads(after.stdout)["healthy"]
    assert run_cli("down", *flags).stdout.strip() == "nothing was running"


def test_failed_start_exits_1_with_log_tail(tmp_path: Path, state_dir: Path) -> None:
    crash = "import sys; print('cannot open the catalog', file=sys.stderr); sys.exit(2)"
    services = f"[services.catalog]\ncommand = {json.dumps([sys.executable, '-c', crash])}\n"
    result = run_cli("up", "--state-dir", str(state_dir), "--stack-file", str(stack_file(tmp_path, services)))
    assert result.returncode == 1
    assert result.stderr.startswith("splitstack: error: catalog failed to start: exited with code 2")
    assert "cannot open the catalog" in result.stderr and "Traceback" not in result.stderr
    assert not stack.status(StackPaths(state_dir)).healthy


def test_expected_errors_are_one_line(tmp_path: Path) -> None:
    missing = run_cli("up", "--state-dir", str(tmp_path / "s"), "--stack-file", str(tmp_path / "nope.toml"))
    assert missing.returncode == 1 and missing.stdout == ""
    assert missing.stderr == f"splitstack: error: stack file {tmp_path / 'nope.toml'} not found\n"

    outside = run_cli("status", cwd=tmp_path)
    assert outside.returncode == 1 and "pass --state-dir" in outside.stderr
    assert len(outside.stderr.splitlines()) == 1


@pytest.mark.skipif(not CONSOLE_SCRIPT.exists(), reason="splitstack-client is not installed in this venv")
def test_console_script_lists_the_stack_commands() -> None:
    result = subprocess.run([str(CONSOLE_SCRIPT), "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    assert all(command in result.stdout for command in ("up", "down", "status"))


def test_up_only_starts_the_named_services_and_a_full_up_adds_the_rest(tmp_path: Path, state_dir: Path) -> None:
    as_other = ('{ SPLITSTACK_PROBE_GRPC_PORT = "{grpc_port}", SPLITSTACK_PROBE_METRICS_PORT = "{metrics_port}", '
                'SPLITSTACK_PROBE_READY_FILE = "{ready_file}" }')
    services = "".join(f"[services.{name}]\ncommand = {PROBE}\nenv = {as_other}\n" for name in ("alpha", "beta"))
    flags = ["--state-dir", str(state_dir), "--stack-file", str(stack_file(tmp_path, services))]
    only = run_cli("up", "--only", "alpha", *flags)
    assert only.returncode == 0, only.stderr
    assert "alpha: started" in only.stdout and "beta: left down (not asked for)" in only.stdout
    assert "services: alpha;" in only.stdout
    first = {c["name"]: c for c in json.loads(run_cli("status", "--json", *flags).stdout)["components"]}
    assert first["alpha"]["health"] and first["beta"]["pid"] is None

    full = run_cli("up", *flags)
    assert full.returncode == 0 and "beta: started" in full.stdout and "alpha: started" not in full.stdout
    after = {c["name"]: c for c in json.loads(run_cli("status", "--json", *flags).stdout)["components"]}
    assert after["alpha"]["pid"] == first["alpha"]["pid"] and after["beta"]["health"]
    assert after["beta"]["address"] == first["beta"]["address"]   # its port was allocated by the first up

    unknown = run_cli("up", "--only", "gamma", *flags)
    assert unknown.returncode == 1 and "unknown service gamma (the stack has: alpha, beta)" in unknown.stderr
