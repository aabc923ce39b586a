"""The servers under test, each a child process on a free port: echo, splitstack-serving, KServe.

`ServerProcess` is one of them: its gRPC address, its log file, its CPU time (from /proc, every
thread), its ModelStatistics when it has them, and a stop that SIGTERMs, then kills after a
timeout. `start_echo` is the trivial server (loadgen.py --echo), `start_splitstack` runs
`python -m splitstack_serving.main` on a Triton-style model directory with the given batching
settings, `start_kserve` runs kserve_model.py in KServe's venv, which `ensure_kserve_venv`
creates on first use (`python3.11 -m venv` + pip) and reuses afterwards.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from inference import grpc_service_pb2 as pb
from inference import grpc_service_pb2_grpc as pb_grpc

HERE = Path(__file__).resolve().parent
KSERVE_REQUIREMENTS = ("kserve==0.21.*", "onnxruntime", "numpy")
KSERVE_INSTALL_TIMEOUT_S = 600
START_TIMEOUT_S = 90.0
STOP_TIMEOUT_S = 20.0
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


class ServerStartError(RuntimeError):
    """A server under test did not come up; the message says why (with its log's tail)."""


@dataclass
class ServerProcess:
    """A server under test running as a child process."""

    name: str
    proc: subprocess.Popen
    port: int
    log_path: Path
    has_statistics: bool = False
    _channel: grpc.Channel | None = field(default=None, repr=False)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def cpu_seconds(self) -> float:
        """User + system CPU of the process so far, every thread included."""
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS

    def stub(self) -> pb_grpc.GRPCInferenceServiceStub:
        if self._channel is None:
            self._channel = grpc.insecure_channel(self.address)
        return pb_grpc.GRPCInferenceServiceStub(self._channel)

    def infer(self, request: pb.ModelInferRequest) -> pb.ModelInferResponse:
        return self.stub().ModelInfer(request, timeout=30)

    def log_tail(self, lines: int = 30) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self) -> None:
        if self._channel is not None:
            self._channel.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _spawn(command: list[str], log_path: Path, env: dict[str, str] | None = None,
           cpus: list[int] | None = None) -> subprocess.Popen:
    if cpus:
        command = ["taskset", "-c", ",".join(map(str, cpus)), *command]
    with log_path.open("wb") as log_file:
        return subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, env=env,
                                cwd=log_path.parent, start_new_session=True)


def _wait_ready(server: ServerProcess, model: str | None, timeout: float = START_TIMEOUT_S) -> None:
    """Poll ServerReady (and ModelReady) until true; ServerStartError if it exits or times out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise ServerStartError(f"{server.name} exited with {server.proc.returncode}:\n{server.log_tail()}")
        with contextlib.suppress(grpc.RpcError):
            stub = server.stub()
            if stub.ServerReady(pb.ServerReadyRequest(), timeout=1).ready and (
                    model is None or stub.ModelReady(pb.ModelReadyRequest(name=model), timeout=1).ready):
                return
        time.sleep(0.1)
    server.stop()
    raise ServerStartError(f"{server.name} not ready within {timeout:.0f}s:\n{server.log_tail()}")


@contextlib.contextmanager
def running(server: ServerProcess) -> Iterator[ServerProcess]:
    """Stop `server` on exit, whatever happened."""
    try:
        yield server
    finally:
        server.stop()


def start_echo(work_dir: Path, response: bytes, cpus: list[int] | None = None) -> ServerProcess:
    """The trivial server: answers ModelInfer with `response`, nothing else."""
    port_file, response_file = work_dir / "echo.port", work_dir / "echo.response"
    port_file.unlink(missing_ok=True)
    response_file.write_bytes(response)
    proc = _spawn([sys.executable, str(HERE / "loadgen.py"), "--echo", str(port_file), "--response-file",
                   str(response_file)], work_dir / "echo.log", cpus=cpus)
    deadline = time.monotonic() + START_TIMEOUT_S
    while not port_file.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise ServerStartError(f"echo server did not start:\n{(work_dir / 'echo.log').read_text()}")
        time.sleep(0.05)
    return ServerProcess("echo", proc, int(port_file.read_text()), work_dir / "echo.log")


@dataclass(frozen=True)
class BatchingSettings:
    """splitstack-serving's batching for one run."""

    batching: bool
    max_queue_delay_us: int = 0
    max_batch_size: int = 64


def start_splitstack(work_dir: Path, model_dir: Path, model: str, settings: BatchingSettings,
                     server_src: Path | None = None, cpus: list[int] | None = None) -> ServerProcess:
    """`python -m splitstack_serving.main` serving `model` from `model_dir` (one ORT thread each way)."""
    label = "on" if settings.batching else "off"
    ready_file = work_dir / f"serving-{label}.ready"
    ready_file.unlink(missing_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPLITSTACK_SERVING_")}
    env.update({
        "SPLITSTACK_SERVING_MODEL_DIR": str(model_dir), "SPLITSTACK_SERVING_MODELS": model,
        "SPLITSTACK_SERVING_GRPC_HOST": "127.0.0.1", "SPLITSTACK_SERVING_GRPC_PORT": "0",
        "SPLITSTACK_SERVING_METRICS_PORT": "0", "SPLITSTACK_SERVING_READY_FILE": str(ready_file),
        "SPLITSTACK_SERVING_ORT_INTRA_OP_THREADS": "1", "SPLITSTACK_SERVING_ORT_INTER_OP_THREADS": "1",
        "SPLITSTACK_SERVING_MODEL_INSTANCES": "1",
        "SPLITSTACK_SERVING_BATCHING": "true" if settings.batching else "false",
        "SPLITSTACK_SERVING_MAX_BATCH_SIZE": str(settings.max_batch_size),
        "SPLITSTACK_SERVING_MAX_QUEUE_DELAY_US": str(settings.max_queue_delay_us),
    })
    if server_src is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(server_src), env.get("PYTHONPATH", "")]))
    log_path = work_dir / f"serving-{label}.log"
    proc = _spawn([sys.executable, "-m", "splitstack_serving.main"], log_path, env, cpus)
    deadline = time.monotonic() + START_TIMEOUT_S
    while not ready_file.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            raise ServerStartError(f"splitstack-serving did not start:\n{log_path.read_text(errors='replace')}")
        time.sleep(0.05)
    port = json.loads(ready_file.read_text())["grpc_port"]
    server = ServerProcess(f"splitstack-serving (batching {label})", proc, port, log_path, has_statistics=True)
    _wait_ready(server, model)
    return server


def ensure_kserve_venv(venv: Path, log: Path) -> Path:
    """KServe's own venv (created once, reused after); returns its python. ServerStartError if it cannot be made."""
    python = venv / "bin" / "python"
    marker = venv / ".requirements"
    wanted = " ".join(KSERVE_REQUIREMENTS)
    if python.exists() and marker.exists() and marker.read_text() == wanted:
        return python
    interpreter = shutil.which("python3.11")
    if interpreter is None:
        raise ServerStartError("cannot create KServe's venv: no python3.11 on PATH (KServe 0.21 supports 3.9-3.12)")
    shutil.rmtree(venv, ignore_errors=True)
    venv.parent.mkdir(parents=True, exist_ok=True)
    with log.open("wb") as out:
        steps = [[interpreter, "-m", "venv", str(venv)],
                 [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", *KSERVE_REQUIREMENTS]]
        for step in steps:
            try:
                code = subprocess.run(step, stdout=out, stderr=subprocess.STDOUT,
                                      timeout=KSERVE_INSTALL_TIMEOUT_S).returncode
            except subprocess.TimeoutExpired:
                code = -1
            if code != 0:
                tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:])
                raise ServerStartError(f"creating KServe's venv failed at `{' '.join(step[:4])}...` "
                                       f"(exit {code}):\n{tail}")
    marker.write_text(wanted)
    return python


def start_kserve(work_dir: Path, python: Path, model_path: Path, model: str,
                 cpus: list[int] | None = None) -> ServerProcess:
    """KServe's ModelServer serving `model_path` as `model` over gRPC v2 (and REST) on free ports."""
    grpc_port, http_port = free_port(), free_port()
    env = {**os.environ, "ORT_DISABLE_TELEMETRY": "1"}
    env.pop("PYTHONPATH", None)
    log_path = work_dir / "kserve.log"
    proc = _spawn([str(python), str(HERE / "kserve_model.py"), "--model-path", str(model_path), "--name", model,
                   "--grpc-port", str(grpc_port), "--http-port", str(http_port)], log_path, env, cpus)
    server = ServerProcess("KServe 0.21", proc, grpc_port, log_path)
    _wait_ready(server, model)
    return server
