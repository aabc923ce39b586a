"""ModelStreamInfer is bounded: a client that sends and never reads cannot grow the serving process.

A real `splitstack-serving` process; the stream's window (`STREAM_MAX_PENDING` requests computing or
answered and not yet written) fills, the server stops reading that stream, and HTTP/2 flow control
holds the client's writes back. The serving process's resident memory (VmRSS) and the exposed
gauge stay under the bound while the client keeps trying to send, and other clients are served.
"""

from __future__ import annotations

import asyncio
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np
from serving_support import assert_outputs_match, infer_request, response_arrays, rows, start_server_process

from inference import grpc_service_pb2 as pb
from inference import grpc_service_pb2_grpc as pb_grpc

WINDOW = 8                    # SPLITSTACK_SERVING_STREAM_MAX_PENDING for the test
ROWS = 64                     # rows per request: 16 KiB in, 68 KiB of answer (hidden 64 KiB + logits)
REQUESTS = 3000               # unbounded, the answers alone would be ~200 MiB
RSS_BUDGET = 64 * 1024 * 1024  # growth allowed over the warmed-up baseline (allocator and transport noise)
PENDING_GAUGE = "splitstack_serving_stream_answers_pending"
PENDING_BYTES_GAUGE = "splitstack_serving_stream_answer_bytes_pending"
# No BDP probing on the test client: its receive window stays at HTTP/2's 64 KiB, so what the server
# holds is what the test measures, not how much the client's transport happens to absorb.
CLIENT_OPTIONS = [("grpc.http2.bdp_probe", 0)]


def vm_rss(pid: int) -> int:
    """Resident memory of a process in bytes, from /proc/<pid>/status."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for process {pid}")


def gauge(metrics_port: int, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as response:
        for line in response.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[-1])
    return -1.0


async def wait_until(condition: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not await asyncio.to_thread(condition):
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        await asyncio.sleep(0.05)


async def successes(stub: pb_grpc.GRPCInferenceServiceStub) -> int:
    stats = await stub.ModelStatistics(pb.ModelStatisticsRequest(name="mlp"), timeout=10)
    return stats.model_stats[0].inference_stats.success.count


async def read_stream(stub: pb_grpc.GRPCInferenceServiceStub, count: int, oracle) -> None:  # noqa: ANN001
    """A well-behaved stream client: `count` requests, every answer read and checked."""
    x = rows(11, 3)
    requests = [infer_request("mlp", x=x) for _ in range(count)]
    answers = [a async for a in stub.ModelStreamInfer(iter(requests), timeout=60)]
    assert len(answers) == count and not any(a.error_message for a in answers)
    assert_outputs_match(response_arrays(answers[0].infer_response), oracle.run("mlp", "2", x=x))


async def test_a_stream_client_that_does_not_read_cannot_grow_serving(model_template, tmp_path, oracle) -> None:
    env = {"SPLITSTACK_SERVING_MODELS": "mlp", "SPLITSTACK_SERVING_STREAM_MAX_PENDING": str(WINDOW),
           "SPLITSTACK_SERVING_MAX_QUEUE_DELAY_US": "0"}
    server = await asyncio.to_thread(start_server_process, tmp_path, model_template, env)
    try:
        async with grpc.aio.insecure_channel(server.address, options=CLIENT_OPTIONS) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            await read_stream(stub, 50, oracle)  # warm the stream path before the baseline
            baseline = vm_rss(server.proc.pid)
            warm = await successes(stub)

            stalled = stub.ModelStreamInfer(timeout=300)
            request = infer_request("mlp", x=rows(12, ROWS))
            written = 0

            async def write_without_reading() -> None:
                nonlocal written
                for _ in range(REQUESTS):
                    await stalled.write(request)
                    written += 1

            writer = asyncio.ensure_future(write_without_reading())
            # The window fills: WINDOW requests admitted, all of them computed, none of them written out.
            answer_bytes = float(WINDOW * (ROWS * (256 + 10) * 4))
            await wait_until(lambda: gauge(server.metrics_port, PENDING_GAUGE) == WINDOW
                             and gauge(server.metrics_port, PENDING_BYTES_GAUGE) >= answer_bytes,
                             "the stream's window is full of computed answers")
            computed = await successes(stub) - warm
            grown = vm_rss(server.proc.pid) - baseline
            assert grown < RSS_BUDGET, f"serving grew by {grown / 2**20:.1f} MiB for a stream nobody reads"
            assert not writer.done(), f"the server kept reading: all {written} requests were taken"
            assert computed < REQUESTS // 10, f"{computed} of the {written} requests written were computed"

            # Other clients are served meanwhile, unary and streaming, on another connection.
            async with grpc.aio.insecure_channel(server.address) as other_channel:
                other = pb_grpc.GRPCInferenceServiceStub(other_channel)
                x = rows(13, 2)
                response = await other.ModelInfer(infer_request("mlp", x=x), timeout=30)
                assert_outputs_match(response_arrays(response), oracle.run("mlp", "2", x=x))
                await read_stream(other, 20, oracle)
            assert gauge(server.metrics_port, PENDING_GAUGE) <= WINDOW
            assert vm_rss(server.proc.pid) - baseline < RSS_BUDGET

            # The stalled client reads a few answers: the stream moves on, within its window.
            first = await stalled.read()
            assert not first.error_message
            np.testing.assert_equal(len(first.infer_response.raw_output_contents), 2)
            stalled.cancel()
            writer.cancel()
            await wait_until(lambda: gauge(server.metrics_port, PENDING_GAUGE) == 0,
                             "a cancelled stream's window is given back")
    finally:
        await asyncio.to_thread(server.stop)
