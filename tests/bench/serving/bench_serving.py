"""Serving benchmark: splitstack-serving vs in-process ONNX Runtime (the limit) vs KServe 0.21 (the peer).

One model (MLP 64-1024-1024-10, INT8 QDQ, built here with random weights), one ONNX Runtime
intra-op thread in every contender. For batch-1 requests and for 64-row client batches:

- (a) in-process ONNX Runtime: `session.run` in one loop, the limit of one model instance;
- (b) splitstack-serving, batching off and on (max_batch_size 64, max_queue_delay_us as given);
- (c) KServe's Python model server (its own venv) running the same file through ONNX Runtime;
- and a trivial echo server (grpc.aio, fixed answer): the client's ceiling and gRPC's floor.

The same closed-loop client (h2load when on PATH, else Python client processes) sweeps the
concurrency against each server; the report (docs/bench/serving.md) gives throughput, p50/p99,
client and server CPU, and the ratios and per-request overhead the serving issue asks for.

    .venv/bin/python tests/bench/serving/bench_serving.py [--quick] [--out PATH] [--client h2load|python]
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[2]
sys.path.insert(0, str(HERE))

import numpy as np  # noqa: E402

import report  # noqa: E402
from bench_model import (INPUT_NAME, OUTPUT_NAME, build_models, input_rows, measure_in_process,  # noqa: E402
                         open_session)
from inference import grpc_service_pb2 as pb  # noqa: E402
from loadgen import H2LoadClient, PythonClient  # noqa: E402
from servers import (BatchingSettings, ServerProcess, ServerStartError, ensure_kserve_venv, running,  # noqa: E402
                     start_echo, start_kserve, start_splitstack)
from sweep import Sweep, response_outputs, run_sweep  # noqa: E402

MODEL = "mlp_int8"
ROW_SIZES = (1, 64)
CONTENDERS = ("echo", "off", "on", "kserve")
TOLERANCE = 1e-4


def _cpu_list(text: str) -> list[int]:
    return [int(cpu) for cpu in text.split(",")]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 concurrency levels, short points (under a minute)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "bench" / "serving.md")
    parser.add_argument("--client", choices=("auto", "h2load", "python"), default="auto")
    parser.add_argument("--client-processes", type=int, default=min(os.cpu_count() or 1, 4),
                        help="Python client processes (--client python)")
    parser.add_argument("--concurrency", type=lambda s: [int(c) for c in s.split(",")])
    parser.add_argument("--seconds", type=float, help="measurement window per point")
    parser.add_argument("--queue-delays", type=lambda s: [int(c) for c in s.split(",")],
                        help="max_queue_delay_us of each batching-on run (default 0,200; quick 200)")
    parser.add_argument("--contenders", type=lambda s: s.split(","), default=list(CONTENDERS),
                        help=f"subset of {','.join(CONTENDERS)}")
    parser.add_argument("--server-src", type=Path, help="put this splitstack_serving source tree first (A/B runs)")
    parser.add_argument("--kserve-venv", type=Path, default=ROOT / ".bench" / "kserve-venv")
    parser.add_argument("--client-cpus", type=_cpu_list, help="pin the client to these CPUs, e.g. 2,3")
    parser.add_argument("--server-cpus", type=_cpu_list, help="pin every server to these CPUs, e.g. 0,1")
    args = parser.parse_args(argv)
    args.concurrency = args.concurrency or ([1, 8, 64] if args.quick else [1, 2, 4, 8, 16, 32, 64])
    args.seconds = args.seconds or (1.0 if args.quick else 2.0)
    args.warmup = 0.3 if args.quick else 0.5
    args.queue_delays = args.queue_delays if args.queue_delays is not None else ([200] if args.quick else [0, 200])
    return args


def infer_request(rows: int) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=MODEL)
    request.inputs.add(name=INPUT_NAME, datatype="FP32", shape=[rows, 64])
    request.raw_input_contents.append(input_rows(rows).tobytes())
    return request


def echo_response(rows: int) -> bytes:
    """An answer of the size a model server gives: logits [rows, 10] as raw FP32."""
    response = pb.ModelInferResponse(model_name=MODEL, model_version="1")
    response.outputs.add(name=OUTPUT_NAME, datatype="FP32", shape=[rows, 10])
    response.raw_output_contents.append(np.zeros((rows, 10), np.float32).tobytes())
    return response.SerializeToString()


def make_client(args: argparse.Namespace, work_dir: Path) -> H2LoadClient | PythonClient:
    h2load = shutil.which("h2load")
    if args.client == "h2load" and h2load is None:
        raise SystemExit("--client h2load: h2load is not on PATH (Debian: apt-get install nghttp2-client)")
    if args.client != "python" and h2load is not None:
        return H2LoadClient(h2load, work_dir, cpus=args.client_cpus)
    return PythonClient(args.client_processes, args.client_cpus)


class Bench:
    """Runs every contender and keeps what they gave."""

    def __init__(self, args: argparse.Namespace, work_dir: Path, client: H2LoadClient | PythonClient) -> None:
        self.args = args
        self.work_dir = work_dir
        self.client = client
        self.model_path = build_models(work_dir / "models")[MODEL]
        self.requests = {rows: infer_request(rows) for rows in ROW_SIZES}
        session = open_session(self.model_path)
        self.expected = {rows: session.run(None, {INPUT_NAME: input_rows(rows)})[0] for rows in ROW_SIZES}
        self.sweeps: list[Sweep] = []
        self.notes: list[str] = []

    def in_process(self) -> dict[int, object]:
        return {rows: measure_in_process(self.model_path, rows, self.args.seconds * 2) for rows in ROW_SIZES}

    def run_all(self) -> None:
        wanted = set(self.args.contenders)
        if "echo" in wanted:
            for rows in ROW_SIZES:
                self._guarded("echo (grpc.aio, fixed answer)", [rows],
                              lambda r=rows: start_echo(self.work_dir, echo_response(r), self.args.server_cpus),
                              check=False)
        if "off" in wanted:
            self._server_sweeps("splitstack-serving, batching off", BatchingSettings(batching=False))
        if "on" in wanted:
            for delay in self.args.queue_delays:
                self._server_sweeps(f"splitstack-serving, batching on ({delay} us)",
                                    BatchingSettings(batching=True, max_queue_delay_us=delay))
        if "kserve" in wanted:
            self._guarded("KServe 0.21 (ONNX Runtime in predict)", list(ROW_SIZES), self._start_kserve)

    def _server_sweeps(self, name: str, settings: BatchingSettings) -> None:
        self._guarded(name, list(ROW_SIZES), lambda: start_splitstack(
            self.work_dir, self.model_path.parents[2], MODEL, settings, self.args.server_src, self.args.server_cpus))

    def _start_kserve(self) -> ServerProcess:
        python = ensure_kserve_venv(self.args.kserve_venv, self.work_dir / "kserve-install.log")
        return start_kserve(self.work_dir, python, self.model_path, MODEL, self.args.server_cpus)

    def _guarded(self, name: str, row_sizes: list[int], start, check: bool = True) -> None:  # noqa: ANN001
        """Start the server, check its answers, sweep each request size; failures become the sweeps' errors."""
        sweeps = [Sweep(name, rows) for rows in row_sizes]
        self.sweeps.extend(sweeps)
        print(f"== {name}", flush=True)
        try:
            server = start()
        except ServerStartError as exc:
            for sweep in sweeps:
                sweep.error = f"could not start: {exc}"
            print(f"   could not start: {exc}", flush=True)
            return
        with running(server):
            for sweep in sweeps:
                self._sweep(server, sweep, check)

    def _sweep(self, server: ServerProcess, sweep: Sweep, check: bool) -> None:
        request = self.requests[sweep.rows_per_request]
        try:
            sample = server.infer(request)
        except Exception as exc:  # noqa: BLE001 - any failure of the first call is the sweep's result
            sweep.error = f"first call failed: {exc}"
            return
        if check:
            got = response_outputs(sample)
            expected = self.expected[sweep.rows_per_request]
            if len(got) != 1 or got[0].shape != expected.shape or not np.allclose(got[0], expected, atol=TOLERANCE):
                sweep.error = "answers differ from in-process ONNX Runtime"
                return
        if isinstance(self.client, H2LoadClient):
            self.client.expected_response_bytes = len(sample.SerializeToString())
        run_sweep(self.client, server, MODEL, request.SerializeToString(), sweep.rows_per_request,
                  self.args.concurrency, self.args.warmup, self.args.seconds, sweep)
        for point in sweep.points:
            load = point.load
            print(f"   rows={sweep.rows_per_request:<3} c={load.concurrency:<3} {load.requests_per_s:9.0f} req/s "
                  f"p50 {load.percentile_ms(50):7.3f} ms p99 {load.percentile_ms(99):7.3f} ms "
                  f"client cpu {load.client_cpu_share:4.0%} server cpu {point.server_cpu_share:4.2f} cores", flush=True)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.getLogger().setLevel(logging.ERROR)  # the quantizer's advice to pre-process
    started = time.monotonic()
    load_start = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench-serving-") as scratch:
        work_dir = Path(scratch)
        client = make_client(args, work_dir)
        with client if isinstance(client, PythonClient) else contextlib.nullcontext(client):
            bench = Bench(args, work_dir, client)
            limit = bench.in_process()
            bench.run_all()
    text = report.render(report.RunInfo(args=args, client=client.describe(), load_start=load_start,
                                        load_end=os.getloadavg(), seconds=time.monotonic() - started),
                         limit, bench.sweeps, report.existing_summary(args.out))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(f"wrote {args.out} in {time.monotonic() - started:.0f}s", flush=True)


if __name__ == "__main__":
    main()
