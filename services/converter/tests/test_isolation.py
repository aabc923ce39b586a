"""Untrusted registry artifacts against a real converter process (real NATS, real registry).

torch 2.13's `torch.export.load` unpickles a .pt2's example inputs with full `pickle` when the
weights-only load fails (see program_payloads.py), so a program can run code in whatever process
loads it. The converter loads programs only in a child process, refuses pickles there unless the
operator allows them, and gives the child no credentials, a scratch directory, a memory and a time
limit.

The pool here allows pickled programs (so the payloads do run, in the child) and carries fake AWS
credentials in its own environment; with the default settings the payload is refused before it is
unpickled (test_untrusted_registry.py).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path

import pytest
from converter_models import HandOff
from converter_support import FAST_PROFILE, expect_failure
from program_payloads import SLEEPER_CODE, SPY_CODE, Abort, Exec, Hog, plant

from splitstack_converter.pipeline.isolation import CHILD_ENV_ALLOWED

pytestmark = pytest.mark.timeout(420)

SECRET = "do-not-leak-4c1d"
LOAD_TIMEOUT_SECONDS = 60          # the trusting pool's limit: torch's import alone takes ~20 s on a busy machine
MEMORY_MIB = 4096
FIXED_CHILD_ENV = {"HOME", "TMPDIR", "XDG_CACHE_HOME", "PYTHONSAFEPATH", "PYTHONDONTWRITEBYTECODE",
                   "ORT_DISABLE_TELEMETRY"}
SET_BY_TORCH = {"TORCHINDUCTOR_CACHE_DIR"}     # torch's import adds it to its own process's environment


@pytest.fixture(scope="module")
def trusting_pool(stacks: Callable[..., object]):  # noqa: ANN201  conftest.Stack
    return stacks("trusting", {**FAST_PROFILE, "SPLITSTACK_CONVERTER_ALLOW_PICKLED_PROGRAMS": "true",
                               "SPLITSTACK_CONVERTER_LOAD_TIMEOUT_SECONDS": str(LOAD_TIMEOUT_SECONDS),
                               "SPLITSTACK_CONVERTER_CHILD_MEMORY_MIB": str(MEMORY_MIB),
                               "AWS_ACCESS_KEY_ID": "AKIA" + SECRET, "AWS_SECRET_ACCESS_KEY": SECRET,
                               "NATS_TOKEN": SECRET})


@pytest.fixture
def trusting(trusting_pool, request: pytest.FixtureRequest):  # noqa: ANN001, ANN201
    trusting_pool.attach_logs(request.node)
    return trusting_pool


async def gone(path: Path, timeout: float = 60.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while path.exists():
        assert asyncio.get_running_loop().time() < deadline, f"{path} is still there"
        await asyncio.sleep(0.2)


async def test_a_program_payload_runs_only_in_a_child_without_credentials(trusting,
                                                                         handoffs: dict[str, HandOff],
                                                                         tmp_path: Path) -> None:
    stack = trusting
    marker = tmp_path / "spy.json"
    mlp = handoffs["mlp"]
    failed = await expect_failure(stack, plant(mlp.program, Exec(SPY_CODE, marker)), mlp.sample, "spy")
    assert "cannot load the exported program" in failed.reason
    seen = json.loads(marker.read_text())                      # the payload ran ...
    converter = stack.converter.proc.pid
    assert seen["pid"] != converter and seen["ppid"] == converter   # ... in a child of the converter
    leaked = {k: v for k, v in seen["env"].items() if k.startswith(("SPLITSTACK_", "AWS_")) or SECRET in v}
    assert leaked == {}, leaked
    assert set(seen["env"]) <= set(CHILD_ENV_ALLOWED) | FIXED_CHILD_ENV | SET_BY_TORCH, sorted(seen["env"])
    assert seen["env"]["PYTHONSAFEPATH"] == "1" and seen["isolated"] == 1 and seen["safe_path"]
    assert seen["rlimit_as"] == MEMORY_MIB * 1024 * 1024
    work = (stack.pool.root / "work").resolve()
    assert Path(seen["cwd"]).resolve().is_relative_to(work) and seen["env"]["HOME"] == seen["cwd"]
    assert str(Path(seen["cwd"]).resolve()) not in seen["sys_path"] and "" not in seen["sys_path"]
    await gone(Path(seen["cwd"]))                               # the scratch directory goes with the conversion
    assert stack.converter.proc.poll() is None


async def test_a_hanging_load_is_killed_at_the_time_limit(trusting, handoffs: dict[str, HandOff],
                                                          tmp_path: Path) -> None:
    stack = trusting
    marker = tmp_path / "sleeper.pid"
    started = asyncio.get_running_loop().time()
    mlp = handoffs["mlp"]
    failed = await expect_failure(stack, plant(mlp.program, Exec(SLEEPER_CODE, marker)), mlp.sample, "sleeper")
    assert f"did not finish within its {LOAD_TIMEOUT_SECONDS}s time limit (the process was killed)" in failed.reason
    assert asyncio.get_running_loop().time() - started >= LOAD_TIMEOUT_SECONDS
    sleeper = int(marker.read_text())
    assert not Path(f"/proc/{sleeper}").exists() or b"pipeline.worker" not in Path(
        f"/proc/{sleeper}/cmdline").read_bytes()                # the sleeping child is gone
    assert stack.converter.proc.poll() is None


async def test_a_crashing_or_memory_hungry_load_fails_with_the_reason(trusting,
                                                                      handoffs: dict[str, HandOff]) -> None:
    stack = trusting
    mlp = handoffs["mlp"]
    crashed = await expect_failure(stack, plant(mlp.program, Abort()), mlp.sample, "abort")
    assert "loading and exporting the program crashed (killed by SIGABRT)" in crashed.reason
    hungry = await expect_failure(stack, plant(mlp.program, Hog(64 * 1024 ** 3)), mlp.sample, "hog")
    assert f"ran out of its memory limit ({MEMORY_MIB} MiB)" in hungry.reason
    truncated = await expect_failure(stack, mlp.program[:len(mlp.program) // 2], mlp.sample, "truncated")
    assert "cannot load the exported program" in truncated.reason
    assert stack.converter.proc.poll() is None
