"""Closed-loop load generators for the Open Inference Protocol's ModelInfer, and the trivial echo server.

Both clients keep a fixed number of requests outstanding (send, await the answer, send again),
warm up, then record every call that starts inside one measurement window: its latency, errors,
and the client's own CPU time, so the report can show the client had CPU to spare. The request
is serialized once, before a run, and sent as bytes; answers are not parsed per call.

- `H2LoadClient`: nghttp2's h2load (C) posting gRPC-framed requests over h2c; the cheapest client
  here (about 20 us of CPU per call), used when h2load is on PATH.
- `PythonClient`: several spawned client processes, each one grpc.aio channel with its share of
  the concurrency; no system package needed, but about 100 us of CPU per call.

`python loadgen.py --echo PORT_FILE [--response-file F]` runs the trivial server used to measure
a client's ceiling: grpc.aio answering ModelInfer with a fixed, prebuilt response.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing
import os
import re
import resource
import struct
import subprocess
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from collections.abc import Callable
from pathlib import Path

import numpy as np

MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
CHANNEL_OPTIONS = [("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                   ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)]
CALL_TIMEOUT_S = 30.0
MAX_ERRORS = 1000          # a process stops sending after this many failed calls (a dead server)
READY_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class RunOrder:
    """One process's part of a run: where, what, how many outstanding, and the shared window."""

    target: str
    request: bytes
    slots: int
    measure_from_ns: int
    measure_until_ns: int


@dataclass
class ProcessReport:
    """What one client process measured inside the window."""

    latencies_ns: np.ndarray
    errors: int
    first_error: str
    cpu_seconds: float
    sample_response: bytes


@dataclass
class LoadResult:
    """One point of the sweep: the calls that started inside the measurement window."""

    client: str
    concurrency: int
    rows_per_request: int
    seconds: float
    latencies_ns: np.ndarray
    errors: int
    first_error: str
    client_cpu_seconds: float      # over `client_cpu_window` seconds
    client_cpu_window: float
    client_cores: int              # the cores the client could use
    sample_response: bytes = b""

    @property
    def requests(self) -> int:
        return len(self.latencies_ns)

    @property
    def requests_per_s(self) -> float:
        return self.requests / self.seconds

    @property
    def rows_per_s(self) -> float:
        return self.requests_per_s * self.rows_per_request

    def percentile_ms(self, q: float) -> float:
        return float(np.percentile(self.latencies_ns, q)) / 1e6 if self.requests else float("nan")

    @property
    def client_cpu_share(self) -> float:
        """The client's CPU time as a share of the cores it could use (1.0 = all of them busy)."""
        return self.client_cpu_seconds / (self.client_cpu_window * self.client_cores)

    @property
    def client_cpu_us_per_request(self) -> float:
        calls = self.requests_per_s * self.client_cpu_window
        return self.client_cpu_seconds / calls * 1e6 if calls else float("nan")


WindowWatcher = Callable[[int, int], None]  # called with the window's (start, stop) monotonic ns; returns after stop


async def _drive(order: RunOrder) -> ProcessReport:
    import grpc

    async with grpc.aio.insecure_channel(order.target, options=CHANNEL_OPTIONS) as channel:
        await asyncio.wait_for(channel.channel_ready(), READY_TIMEOUT_S)
        call = channel.unary_unary(MODEL_INFER)  # no (de)serializers: bytes in, bytes out
        latencies: list[int] = []
        errors: list[str] = []
        sample: list[bytes] = []
        cpu = asyncio.ensure_future(_cpu_over_window(order))
        await asyncio.gather(*(_slot(call, order, latencies, errors, sample) for _ in range(order.slots)))
        cpu_seconds = await cpu
    return ProcessReport(np.asarray(latencies, np.int64), len(errors), errors[0] if errors else "",
                         cpu_seconds, sample[0] if sample else b"")


async def _slot(call, order: RunOrder, latencies: list[int], errors: list[str],  # noqa: ANN001
                sample: list[bytes]) -> None:
    import grpc

    clock = time.monotonic_ns
    request, start, stop = order.request, order.measure_from_ns, order.measure_until_ns
    while len(errors) < MAX_ERRORS:
        sent = clock()
        if sent >= stop:
            return
        try:
            answer = await call(request, timeout=CALL_TIMEOUT_S)
        except grpc.aio.AioRpcError as exc:
            errors.append(f"{exc.code().name}: {exc.details()}")
            continue
        if sent >= start:
            latencies.append(clock() - sent)
            if not sample:
                sample.append(answer)


async def _cpu_over_window(order: RunOrder) -> float:
    """This process's CPU seconds (every thread, gRPC's own included) between the window's ends."""
    await asyncio.sleep(max(order.measure_from_ns - time.monotonic_ns(), 0) / 1e9)
    begin = time.process_time()
    await asyncio.sleep(max(order.measure_until_ns - time.monotonic_ns(), 0) / 1e9)
    return time.process_time() - begin


def _client_process(conn: Connection, cpus: list[int] | None) -> None:
    """A client process: run each order that arrives and send its report back; None ends it."""
    if cpus:
        os.sched_setaffinity(0, cpus)
    conn.send("ready")
    while (order := conn.recv()) is not None:
        try:
            conn.send(asyncio.run(_drive(order)))
        except Exception as exc:  # noqa: BLE001 - reported to the parent, which fails the point
            conn.send(f"{type(exc).__name__}: {exc}")


class PythonClient:
    """Client processes running grpc.aio (use as a context manager; they live until exit)."""

    name = "python"

    def __init__(self, processes: int, cpus: list[int] | None = None) -> None:
        self.processes = processes
        self.cpus = cpus
        self._pipes: list[Connection] = []
        self._workers: list[multiprocessing.process.BaseProcess] = []

    def describe(self) -> str:
        return (f"{self.processes} Python client processes (grpc.aio, one channel each, requests serialized "
                "once and sent as bytes)")

    def __enter__(self) -> PythonClient:
        context = multiprocessing.get_context("spawn")
        for index in range(self.processes):
            parent, child = context.Pipe()
            worker = context.Process(target=_client_process, args=(child, self.cpus), daemon=True,
                                     name=f"loadgen-{index}")
            worker.start()
            self._pipes.append(parent)
            self._workers.append(worker)
        for pipe in self._pipes:
            if not pipe.poll(READY_TIMEOUT_S) or pipe.recv() != "ready":
                raise RuntimeError("a load generator process did not start")
        return self

    def __exit__(self, *exc: object) -> None:
        for pipe in self._pipes:
            with contextlib.suppress(OSError):
                pipe.send(None)
        for worker in self._workers:
            worker.join(5)
            if worker.is_alive():
                worker.kill()

    def run(self, target: str, request: bytes, rows_per_request: int, concurrency: int, warmup_s: float,
            measure_s: float, watch: WindowWatcher | None = None) -> LoadResult:
        """Keep `concurrency` requests outstanding against `target`; measure after `warmup_s`."""
        shares = [concurrency // self.processes + (i < concurrency % self.processes) for i in range(self.processes)]
        start = time.monotonic_ns() + int(warmup_s * 1e9)
        stop = start + int(measure_s * 1e9)
        busy = [(pipe, slots) for pipe, slots in zip(self._pipes, shares) if slots]
        for pipe, slots in busy:
            pipe.send(RunOrder(target, request, slots, start, stop))
        if watch is not None:
            watch(start, stop)
        reports = [self._report(pipe, warmup_s + measure_s + CALL_TIMEOUT_S + READY_TIMEOUT_S) for pipe, _ in busy]
        failed = [r.first_error for r in reports if r.first_error]
        cores = len(self.cpus) if self.cpus else min(os.cpu_count() or 1, len(busy))
        return LoadResult(self.name, concurrency, rows_per_request, measure_s,
                          np.concatenate([r.latencies_ns for r in reports]), sum(r.errors for r in reports),
                          failed[0] if failed else "", sum(r.cpu_seconds for r in reports), measure_s, cores,
                          next((r.sample_response for r in reports if r.sample_response), b""))

    @staticmethod
    def _report(pipe: Connection, timeout: float) -> ProcessReport:
        if not pipe.poll(timeout):
            raise RuntimeError(f"a load generator process sent no report within {timeout:.0f}s")
        report = pipe.recv()
        if isinstance(report, str):
            raise RuntimeError(f"load generator process failed: {report}")
        return report


class H2LoadClient:
    """nghttp2's h2load posting gRPC-framed requests over h2c (HTTP/2 without TLS), one thread.

    Concurrency = connections x streams per connection (at most `max_connections` connections).
    h2load reports HTTP statuses only (gRPC's status travels in trailers), so a failed gRPC call
    is caught by the byte count: every answer must carry at least the expected response bytes."""

    name = "h2load"

    def __init__(self, binary: str, work_dir: Path, max_connections: int = 4, cpus: list[int] | None = None) -> None:
        self.binary = binary
        self.work_dir = work_dir
        self.max_connections = max_connections
        self.cpus = cpus
        self.expected_response_bytes = 0

    def describe(self) -> str:
        return (f"h2load (nghttp2, C, one thread, up to {self.max_connections} HTTP/2 connections with "
                "concurrency/connections streams each), posting length-prefixed gRPC messages over h2c")

    def __enter__(self) -> H2LoadClient:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def command(self, target: str, body: Path, concurrency: int, warmup_s: float, measure_s: float,
                log: Path) -> list[str]:
        connections = max(d for d in range(1, self.max_connections + 1) if concurrency % d == 0)
        command = [self.binary, f"http://{target}{MODEL_INFER}", "-c", str(connections),
                   "-m", str(concurrency // connections), "-t", "1", "-D", f"{int(measure_s * 1000)}ms",
                   "--warm-up-time", f"{int(warmup_s * 1000)}ms", "-d", str(body),
                   "-H", "content-type: application/grpc", "-H", "te: trailers", "--log-file", str(log)]
        return ["taskset", "-c", ",".join(map(str, self.cpus)), *command] if self.cpus else command

    def run(self, target: str, request: bytes, rows_per_request: int, concurrency: int, warmup_s: float,
            measure_s: float, watch: WindowWatcher | None = None) -> LoadResult:
        body, log = self.work_dir / "h2load.request", self.work_dir / "h2load.log"
        body.write_bytes(b"\x00" + struct.pack(">I", len(request)) + request)  # gRPC framing: uncompressed, length
        log.unlink(missing_ok=True)
        cpu_before = _children_cpu()
        launched = time.monotonic_ns()
        proc = subprocess.Popen(self.command(target, body, concurrency, warmup_s, measure_s, log),
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if watch is not None:
            start = launched + int(warmup_s * 1e9)
            watch(start, start + int(measure_s * 1e9))
        output, _ = proc.communicate(timeout=warmup_s + measure_s + CALL_TIMEOUT_S + READY_TIMEOUT_S)
        cpu = _children_cpu() - cpu_before
        if proc.returncode != 0 or not log.exists():
            raise RuntimeError(f"h2load failed (exit {proc.returncode}):\n{output[-2000:]}")
        latencies = np.loadtxt(log, dtype=np.int64, usecols=2, delimiter="\t", ndmin=1) * 1000
        errors, first_error = self._errors(output, len(latencies))
        return LoadResult(self.name, concurrency, rows_per_request, measure_s, latencies, errors, first_error, cpu,
                          warmup_s + measure_s, 1)

    def _errors(self, output: str, measured: int) -> tuple[int, str]:
        counts = re.search(r"requests: (\d+) total, \d+ started, (\d+) done, (\d+) succeeded", output)
        data = re.search(r"\((\d+)\) data", output)
        if counts is None or data is None:
            return measured, f"unreadable h2load output:\n{output[-1000:]}"
        done, succeeded = int(counts.group(2)), int(counts.group(3))
        if succeeded < done:
            return done - succeeded, f"{done - succeeded} of {done} HTTP requests failed:\n{output[-1000:]}"
        # The data count covers warm-up too: it can only fall short when answers carry no message.
        short = measured * (5 + self.expected_response_bytes) - int(data.group(1))
        if self.expected_response_bytes and short > 0:
            missing = -(-short // (5 + self.expected_response_bytes))
            return missing, f"about {missing} answers carried no message (gRPC errors)"
        return 0, ""


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


async def _serve_echo(port_file: Path, response: bytes) -> None:
    import grpc

    async def model_infer(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return response

    handler = grpc.method_handlers_generic_handler(
        "inference.GRPCInferenceService", {"ModelInfer": grpc.unary_unary_rpc_method_handler(model_infer)})
    server = grpc.aio.server(options=CHANNEL_OPTIONS)
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    staging = port_file.with_suffix(".tmp")
    staging.write_text(str(port))
    staging.replace(port_file)
    await server.wait_for_termination()


def main() -> None:
    """`--echo PORT_FILE [--response-file F]`: serve the fixed response until killed."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--echo", type=Path, required=True, help="write the bound port here once serving")
    parser.add_argument("--response-file", type=Path, help="the serialized ModelInferResponse to answer with")
    args = parser.parse_args()
    response = args.response_file.read_bytes() if args.response_file else b""
    asyncio.run(_serve_echo(args.echo, response))


if __name__ == "__main__":
    main()
