"""Dynamic batching: every caller gets its own rows, queues are bounded, deadlines are honoured.

Correctness is asserted on results (element by element against in-process ONNX Runtime) and on
the model statistics, never on speed.
"""

from __future__ import annotations

import asyncio

import grpc
import numpy as np
import pytest
from serving_support import assert_outputs_match, infer_request, response_arrays, rows

from inference import grpc_service_pb2 as pb


async def _statistics(running, name: str = "mlp") -> pb.ModelStatistics:  # noqa: ANN001
    return (await running.stub.ModelStatistics(pb.ModelStatisticsRequest(name=name))).model_stats[0]


async def _wait_for_queue(running, count: int, timeout: float = 20.0) -> None:  # noqa: ANN001
    batcher = running.repository.resolve("mlp").batcher
    async with asyncio.timeout(timeout):
        while batcher.pending < count:
            await asyncio.sleep(0.005)


def _batched_rows(stats: pb.ModelStatistics) -> int:
    return sum(b.batch_size * b.compute_infer.count for b in stats.batch_stats)


async def test_concurrent_clients_get_their_own_rows(serve, oracle) -> None:
    running = await serve(models=("mlp",), max_batch_size=64, max_queue_delay_us=100_000)
    # 32 concurrent callers, distinct inputs: 8 send client batches of 7 rows, 24 send one row.
    inputs = [rows(1000 + i, 7 if i % 4 == 0 else 1) for i in range(32)]

    async def call(x: np.ndarray) -> dict[str, np.ndarray]:
        return response_arrays(await running.stub.ModelInfer(infer_request("mlp", x=x), timeout=30))

    results = await asyncio.gather(*(call(x) for x in inputs))
    for x, got in zip(inputs, results):
        assert_outputs_match(got, oracle.run("mlp", "2", x=x))
    stats = await _statistics(running)
    total_rows = sum(len(x) for x in inputs)
    assert stats.inference_count == total_rows == _batched_rows(stats) == 80
    assert stats.inference_stats.success.count == 32
    assert max(b.batch_size for b in stats.batch_stats) <= 64
    assert max(b.batch_size for b in stats.batch_stats) > 7, "requests were stacked into shared runs"
    assert stats.execution_count < 32
    assert stats.inference_stats.queue.count == 32 and stats.inference_stats.compute_infer.count == 32


async def test_batching_off_runs_every_request_alone(serve, oracle) -> None:
    running = await serve(models=("mlp",), batching=False, max_queue_delay_us=100_000)
    inputs = [rows(2000 + i, 7 if i % 4 == 0 else 1) for i in range(16)]
    results = await asyncio.gather(*(running.stub.ModelInfer(infer_request("mlp", x=x), timeout=30) for x in inputs))
    for x, response in zip(inputs, results):
        assert_outputs_match(response_arrays(response), oracle.run("mlp", "2", x=x))
    stats = await _statistics(running)
    assert stats.execution_count == 16
    assert {b.batch_size for b in stats.batch_stats} == {1, 7}
    config = (await running.stub.ModelConfig(pb.ModelConfigRequest(name="mlp"))).config
    assert not config.HasField("dynamic_batching")


async def test_full_queue_refuses_at_once_with_resource_exhausted(serve, oracle) -> None:
    running = await serve(models=("mlp",), max_queue_size=4, max_queue_delay_us=1_000_000)
    inputs = [rows(3000 + i, 2) for i in range(4)]
    queued = [asyncio.ensure_future(running.stub.ModelInfer(infer_request("mlp", x=x), timeout=30)) for x in inputs]
    await _wait_for_queue(running, 4)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await running.stub.ModelInfer(infer_request("mlp", x=rows(1, 1)), timeout=30)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "queue full" in caught.value.details() and "max_queue_size 4" in caught.value.details()
    assert not any(task.done() for task in queued), "refused at once, while the queue still waited"
    for x, response in zip(inputs, await asyncio.gather(*queued)):
        assert_outputs_match(response_arrays(response), oracle.run("mlp", "2", x=x))
    stats = await _statistics(running)
    assert (stats.execution_count, stats.inference_count) == (1, 8)


async def test_expired_requests_are_never_computed(serve, oracle) -> None:
    running = await serve(models=("mlp",), max_queue_delay_us=1_000_000)
    stub = running.stub
    # A: a gRPC deadline (0.2 s) shorter than the queue delay (1 s); 3 rows.
    by_deadline = asyncio.ensure_future(stub.ModelInfer(infer_request("mlp", x=rows(1, 3)), timeout=0.2))
    # B: Triton's `timeout` request parameter (microseconds), enforced by the server; 5 rows.
    by_parameter = infer_request("mlp", x=rows(2, 5))
    by_parameter.parameters["timeout"].int64_param = 200_000
    by_parameter_call = asyncio.ensure_future(stub.ModelInfer(by_parameter, timeout=30))
    # C: no deadline; 1 row.
    x = rows(3, 1)
    patient = asyncio.ensure_future(stub.ModelInfer(infer_request("mlp", x=x), timeout=30))

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await by_deadline
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await by_parameter_call
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "not computed" in caught.value.details()
    assert not patient.done(), "the server answered B at its deadline, before the batch ran"
    assert_outputs_match(response_arrays(await patient), oracle.run("mlp", "2", x=x))

    stats = await _statistics(running)
    assert (stats.execution_count, stats.inference_count) == (1, 1), "only C was computed"
    assert stats.inference_stats.fail.count == 2 and stats.inference_stats.success.count == 1


async def test_client_batch_larger_than_remaining_room_waits_for_the_next_run(serve, oracle) -> None:
    running = await serve(models=("mlp",), max_batch_size=8, max_queue_delay_us=200_000)
    inputs = [rows(4000 + i, n) for i, n in enumerate((5, 5, 3, 8, 1))]
    results = await asyncio.gather(*(running.stub.ModelInfer(infer_request("mlp", x=x), timeout=30) for x in inputs))
    for x, response in zip(inputs, results):
        assert_outputs_match(response_arrays(response), oracle.run("mlp", "2", x=x))
    stats = await _statistics(running)
    assert stats.inference_count == 22 and max(b.batch_size for b in stats.batch_stats) <= 8


async def test_a_failing_request_does_not_fail_the_others_in_its_batch(serve) -> None:
    running = await serve(models=("lookup",), max_queue_delay_us=200_000)
    indexes = [np.array([[1], [4]], np.int64), np.array([[9]], np.int64), np.array([[0]], np.int64)]
    calls = [running.stub.ModelInfer(infer_request("lookup", index=i), timeout=30) for i in indexes]
    good, bad, other = await asyncio.gather(*calls, return_exceptions=True)
    np.testing.assert_array_equal(response_arrays(good)["row"], [[[2, 3]], [[8, 9]]])
    np.testing.assert_array_equal(response_arrays(other)["row"], [[[0, 1]]])
    assert isinstance(bad, grpc.aio.AioRpcError) and bad.code() == grpc.StatusCode.INTERNAL
    assert "model 'lookup' version 1: model run failed" in bad.details()
    stats = await _statistics(running, "lookup")
    assert stats.execution_count == 1, "the three shared one run"
    assert (stats.inference_stats.success.count, stats.inference_stats.fail.count) == (2, 1)
