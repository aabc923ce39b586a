"""The serving process: SIGTERM under load completes every accepted request, then exits 0; a startup
model that cannot load stops the process with a message naming it."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import urllib.request

import grpc
from serving_support import assert_outputs_match, infer_request, response_arrays, rows, start_server_process

from inference import grpc_service_pb2_grpc as pb_grpc

QUEUED = 12
LOOPING_CLIENTS = 4
PENDING_METRIC = 'splitstack_serving_pending_requests{model="mlp",version="2"}'


def _pending(metrics_port: int) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as response:
        for line in response.read().decode().splitlines():
            if line.startswith(PENDING_METRIC):
                return float(line.split()[-1])
    return 0.0


async def test_sigterm_completes_in_flight_requests(model_template, tmp_path, oracle) -> None:
    # A 1 s queue delay keeps every accepted request in flight when SIGTERM arrives.
    env = {"SPLITSTACK_SERVING_MODELS": "mlp", "SPLITSTACK_SERVING_MAX_QUEUE_DELAY_US": "1000000",
           "SPLITSTACK_SERVING_SHUTDOWN_GRACE_SECONDS": "20"}
    server = await asyncio.to_thread(start_server_process, tmp_path, model_template, env)
    try:
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            inputs = [rows(7000 + i, 1 + i % 3) for i in range(QUEUED)]
            queued = [asyncio.ensure_future(stub.ModelInfer(infer_request("mlp", x=x), timeout=30)) for x in inputs]

            async def looping(i: int) -> list[str]:
                """Send requests back to back until the server refuses one."""
                x = rows(8000 + i, 2)
                outcomes: list[str] = []
                while True:
                    try:
                        response = await stub.ModelInfer(infer_request("mlp", x=x), timeout=30)
                    except grpc.aio.AioRpcError as exc:
                        return [*outcomes, exc.code().name]
                    assert_outputs_match(response_arrays(response), oracle.run("mlp", "2", x=x))
                    outcomes.append("OK")

            loops = [asyncio.ensure_future(looping(i)) for i in range(LOOPING_CLIENTS)]
            async with asyncio.timeout(30):
                while await asyncio.to_thread(_pending, server.metrics_port) < QUEUED + LOOPING_CLIENTS:
                    await asyncio.sleep(0.01)
            server.proc.send_signal(signal.SIGTERM)
            async with asyncio.timeout(30):
                responses = await asyncio.gather(*queued)
                loop_outcomes = await asyncio.gather(*loops)
        for x, response in zip(inputs, responses):
            assert_outputs_match(response_arrays(response), oracle.run("mlp", "2", x=x))
        for outcomes in loop_outcomes:
            assert outcomes[0] == "OK", "the request in flight at SIGTERM completed"
            assert set(outcomes[:-1]) == {"OK"} and outcomes[-1] == "UNAVAILABLE", outcomes
        assert await asyncio.to_thread(server.proc.wait, 30) == 0, server.log_text()
        assert "SIGTERM received" in server.log_text()
    finally:
        await asyncio.to_thread(server.stop)


def test_startup_model_that_cannot_load_stops_the_process(model_template, tmp_path) -> None:
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("SPLITSTACK_SERVING_")},
           "SPLITSTACK_SERVING_MODEL_DIR": str(model_template), "SPLITSTACK_SERVING_MODELS": "mlp,absent"}
    done = subprocess.run([sys.executable, "-m", "splitstack_serving.main"], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert "no model 'absent'" in done.stderr
