"""ServiceRuntime against real gRPC servers on free ports: health, reflection, error mapping for
every handler kind, metrics, ready file, the shutdown path, and SIGTERM to a probe subprocess."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from splitstack.chassis import errors
from splitstack.chassis.config import ChassisSettings
from splitstack.chassis.server import ServiceRuntime, guard_handler
from splitstack.chassis.testing.probe import PROBE_SERVICE, build_runtime, error_named

KINDS_SERVICE = "splitstack.testing.Kinds"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING

# Every error a handler may raise, and the status the client must see.
EXPECTED_STATUS = {cls.__name__: cls.code for cls in errors.DOMAIN_ERRORS}
EXPECTED_STATUS["InvalidName"] = grpc.StatusCode.INVALID_ARGUMENT
EXPECTED_STATUS["Crash"] = grpc.StatusCode.INTERNAL


def _raise_named(name: bytes) -> None:
    if name != b"ok":
        raise error_named(name.decode())


async def unary_unary(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    _raise_named(request)
    return b"ok"


async def unary_stream(request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
    yield b"first"
    _raise_named(request)
    yield b"ok"


async def unary_stream_write(request: bytes, context: grpc.aio.ServicerContext) -> None:
    await context.write(b"first")
    _raise_named(request)
    await context.write(b"ok")


async def stream_unary(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> bytes:
    async for request in requests:
        _raise_named(request)
    return b"ok"


async def stream_stream(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
    async for request in requests:
        yield b"first"
        _raise_named(request)
        yield b"ok"


def kinds_handler() -> grpc.GenericRpcHandler:
    return grpc.method_handlers_generic_handler(KINDS_SERVICE, {
        "UnaryUnary": grpc.unary_unary_rpc_method_handler(unary_unary),
        "UnaryStream": grpc.unary_stream_rpc_method_handler(unary_stream),
        "UnaryStreamWrite": grpc.unary_stream_rpc_method_handler(unary_stream_write),
        "StreamUnary": grpc.stream_unary_rpc_method_handler(stream_unary),
        "StreamStream": grpc.stream_stream_rpc_method_handler(stream_stream),
    })


@pytest.fixture
async def runtime(tmp_path: Path) -> AsyncIterator[ServiceRuntime]:
    settings = ChassisSettings(metrics_port=0, ready_file=str(tmp_path / "run" / "probe.json"),
                               shutdown_grace_seconds=5.0)
    runtime = build_runtime(settings)
    runtime.add_generic_handler(kinds_handler(), KINDS_SERVICE)
    await runtime.start()
    yield runtime
    await runtime.stop()


@pytest.fixture
async def channel(runtime: ServiceRuntime) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{runtime.port}") as channel:
        yield channel


async def _call(channel: grpc.aio.Channel, kind: str, payload: bytes) -> list[bytes]:
    """Call one Kinds method; the responses received (raises AioRpcError on a non-OK status)."""
    method = f"/{KINDS_SERVICE}/{kind}"
    if kind == "UnaryUnary":
        return [await channel.unary_unary(method)(payload, timeout=10)]
    if kind.startswith("UnaryStream"):
        return [r async for r in channel.unary_stream(method)(payload, timeout=10)]
    if kind == "StreamUnary":
        return [await channel.stream_unary(method)(iter([payload]), timeout=10)]
    return [r async for r in channel.stream_stream(method)(iter([payload]), timeout=10)]


async def _health(channel: grpc.aio.Channel, service: str) -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    return (await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)).status


async def test_health_reports_serving_overall_and_per_service(channel: grpc.aio.Channel) -> None:
    assert await _health(channel, "") == SERVING
    assert await _health(channel, PROBE_SERVICE) == SERVING
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await _health(channel, "no.such.Service")
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


async def test_set_serving_changes_health(runtime: ServiceRuntime, channel: grpc.aio.Channel) -> None:
    runtime.set_serving(False, PROBE_SERVICE)
    assert await _health(channel, PROBE_SERVICE) == NOT_SERVING
    assert await _health(channel, "") == SERVING
    runtime.set_serving(True, PROBE_SERVICE)
    assert await _health(channel, PROBE_SERVICE) == SERVING


async def _reflect(channel: grpc.aio.Channel, request: reflection_pb2.ServerReflectionRequest
                   ) -> reflection_pb2.ServerReflectionResponse:
    call = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(timeout=10)
    await call.write(request)
    response = await call.read()
    await call.done_writing()
    return response


async def test_reflection_lists_services_and_serves_descriptors(channel: grpc.aio.Channel) -> None:
    listed = await _reflect(channel, reflection_pb2.ServerReflectionRequest(list_services=""))
    names = {s.name for s in listed.list_services_response.service}
    assert {PROBE_SERVICE, KINDS_SERVICE, "grpc.health.v1.Health",
            "grpc.reflection.v1alpha.ServerReflection"} <= names
    found = await _reflect(channel, reflection_pb2.ServerReflectionRequest(
        file_containing_symbol="grpc.health.v1.Health"))
    assert found.file_descriptor_response.file_descriptor_proto, found


def test_every_domain_error_class_is_listed() -> None:
    declared = {cls for cls in vars(errors).values()
                if isinstance(cls, type) and issubclass(cls, errors.DomainError) and cls is not errors.DomainError}
    assert declared == set(errors.DOMAIN_ERRORS)
    assert len({cls.code for cls in declared}) == len(declared)


@pytest.mark.parametrize("kind", ["UnaryUnary", "UnaryStream", "UnaryStreamWrite", "StreamUnary", "StreamStream"])
async def test_errors_map_to_status_for_every_handler_kind(channel: grpc.aio.Channel, kind: str) -> None:
    assert (await _call(channel, kind, b"ok"))[-1] == b"ok"
    for name, status in EXPECTED_STATUS.items():
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await _call(channel, kind, name.encode())
        assert caught.value.code() == status, name
        if status == grpc.StatusCode.INTERNAL:
            assert caught.value.details() == "internal error (RuntimeError); see server log"
        else:
            assert caught.value.details() == f"probe raised {name}"


async def _typed_echo(request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext) -> bytes:
    return request.service.encode()


async def _typed_count(requests: AsyncIterator[health_pb2.HealthCheckRequest],
                       context: grpc.aio.ServicerContext) -> bytes:
    return str(len([r async for r in requests])).encode()


@pytest.mark.parametrize("payload", [b"\xff\xff\xff", b"\x0a\x02\xc3\x28", b"\x0a\x05ab"],
                         ids=["wire-garbage", "invalid-utf8", "truncated"])
async def test_a_request_that_does_not_parse_is_invalid_argument_not_unknown(payload: bytes) -> None:
    """grpc.aio alone answers UNKNOWN ("Unexpected DecodeError") to bytes that are not the request message."""
    parse = health_pb2.HealthCheckRequest.FromString
    handlers = {"Unary": guard_handler(grpc.unary_unary_rpc_method_handler(_typed_echo, request_deserializer=parse),
                                       "/test.Typed/Unary"),
                "Stream": guard_handler(grpc.stream_unary_rpc_method_handler(_typed_count, request_deserializer=parse),
                                        "/test.Typed/Stream")}
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("test.Typed", handlers),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    good = health_pb2.HealthCheckRequest(service="ok").SerializeToString()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as client:
            assert await client.unary_unary("/test.Typed/Unary")(good, timeout=10) == b"ok"
            assert await client.stream_unary("/test.Typed/Stream")(iter([good, good]), timeout=10) == b"2"
            for call in (client.unary_unary("/test.Typed/Unary")(payload, timeout=10),
                         client.stream_unary("/test.Typed/Stream")(iter([good, payload]), timeout=10)):
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await call
                assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert "is not a valid" in caught.value.details() and "request message" in caught.value.details()
    finally:
        await server.stop(None)


async def test_a_peer_services_error_reaches_the_caller_unchanged(runtime: ServiceRuntime) -> None:
    async def relay(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{runtime.port}") as peer:
            return await peer.unary_unary(f"/{PROBE_SERVICE}/Fail")(request, timeout=10)

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await relay_call(relay, b"NotFound")
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert caught.value.details() == "probe raised NotFound"


async def relay_call(relay, payload: bytes) -> bytes:
    """Call `relay` as a guarded handler the way the interceptor would wrap it."""
    from splitstack.chassis.server import guard_handler

    handler = guard_handler(grpc.unary_unary_rpc_method_handler(relay), "/test.Relay/Call")
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("test.Relay", {"Call": handler}),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as client:
            return await client.unary_unary("/test.Relay/Call")(payload, timeout=10)
    finally:
        await server.stop(None)


async def test_unexpected_exception_is_logged_with_traceback(channel: grpc.aio.Channel,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    with pytest.raises(grpc.aio.AioRpcError):
        await channel.unary_unary(f"/{PROBE_SERVICE}/Fail")(b"Crash", timeout=10)
    crash = [r for r in caplog.records if r.name == "splitstack.chassis.server" and r.exc_info]
    assert crash and "Fail" in crash[0].getMessage()
    assert isinstance(crash[0].exc_info[1], RuntimeError)


def _scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(body) for s in family.samples}


def _handled(method: str, code: str) -> tuple[str, tuple[tuple[str, str], ...]]:
    return "splitstack_grpc_server_handled_total", (("code", code), ("method", method), ("service", PROBE_SERVICE))


async def test_metrics_count_rpcs_by_code_and_time_them(runtime: ServiceRuntime, channel: grpc.aio.Channel) -> None:
    assert runtime.metrics_port
    before = await asyncio.to_thread(_scrape, runtime.metrics_port)
    for _ in range(3):
        await channel.unary_unary(f"/{PROBE_SERVICE}/Echo")(b"x", timeout=10)
    for _ in range(2):
        with pytest.raises(grpc.aio.AioRpcError):
            await channel.unary_unary(f"/{PROBE_SERVICE}/Fail")(b"NotFound", timeout=10)
    after = await asyncio.to_thread(_scrape, runtime.metrics_port)
    assert after[_handled("Echo", "OK")] - before.get(_handled("Echo", "OK"), 0) == 3
    assert after[_handled("Fail", "NOT_FOUND")] - before.get(_handled("Fail", "NOT_FOUND"), 0) == 2
    count = ("splitstack_grpc_server_handling_seconds_count", (("method", "Echo"), ("service", PROBE_SERVICE)))
    assert after[count] - before.get(count, 0) == 3


async def test_cancelled_call_is_counted(runtime: ServiceRuntime, channel: grpc.aio.Channel) -> None:
    key = _handled("Sleep", "CANCELLED")
    before = (await asyncio.to_thread(_scrape, runtime.metrics_port)).get(key, 0)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await channel.unary_unary(f"/{PROBE_SERVICE}/Sleep")(b"30", timeout=0.3)
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    deadline = time.monotonic() + 10
    while (await asyncio.to_thread(_scrape, runtime.metrics_port)).get(key, 0) == before:
        assert time.monotonic() < deadline, "the cancelled handler was never counted"
        await asyncio.sleep(0.05)


async def test_ready_file_names_the_ports_and_goes_away_at_stop(runtime: ServiceRuntime) -> None:
    ready = Path(runtime.settings.ready_file)
    assert json.loads(ready.read_text()) == {"pid": os.getpid(), "grpc_port": runtime.port,
                                             "metrics_port": runtime.metrics_port, "service": "probe"}
    assert [p.name for p in ready.parent.iterdir()] == [ready.name]
    await runtime.stop()
    assert not ready.exists()



async def test_deferred_readiness_keeps_health_and_ready_file_back_until_mark_ready(tmp_path: Path) -> None:
    ready = tmp_path / "run" / "deferred.json"
    runtime = build_runtime(ChassisSettings(ready_file=str(ready), shutdown_grace_seconds=5.0))
    runtime.defer_readiness()
    runtime.set_serving(False, PROBE_SERVICE)
    await runtime.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{runtime.port}") as channel:
            assert await _health(channel, "") == NOT_SERVING
            assert await _health(channel, PROBE_SERVICE) == NOT_SERVING
            assert not ready.exists(), "a deferred service must not claim ready at start"
            runtime.set_serving(True, PROBE_SERVICE)
            runtime.mark_ready()
            runtime.mark_ready()  # idempotent
            assert await _health(channel, "") == SERVING
            assert await _health(channel, PROBE_SERVICE) == SERVING
            assert json.loads(ready.read_text())["grpc_port"] == runtime.port
        with pytest.raises(RuntimeError, match="before start"):
            runtime.defer_readiness()
    finally:
        await runtime.stop()
    assert not ready.exists()
    runtime.mark_ready()  # after shutdown: ignored, writes nothing
    assert not ready.exists()

async def test_stop_lets_in_flight_calls_finish_then_runs_teardown_in_order(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="splitstack.chassis.testing.probe")
    runtime = build_runtime(ChassisSettings(shutdown_grace_seconds=5.0))
    order: list[str] = []
    background_cancelled = asyncio.Event()

    async def background() -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            background_cancelled.set()
            raise

    async def record(name: str) -> None:
        order.append(name)

    runtime.exit_stack.push_async_callback(record, "exit stack")
    runtime.on_shutdown(lambda: record("first registered"))
    runtime.on_shutdown(lambda: record("second registered"))
    await runtime.start()
    runtime.start_task(background())
    async with grpc.aio.insecure_channel(f"127.0.0.1:{runtime.port}") as channel:
        await channel.unary_unary(f"/{PROBE_SERVICE}/Echo")(b"warm", timeout=10)
        in_flight = asyncio.ensure_future(channel.unary_unary(f"/{PROBE_SERVICE}/Sleep")(b"0.5", timeout=10))
        while not any("Sleep(0.500) started" in r.getMessage() for r in caplog.records):
            assert not in_flight.done(), in_flight
            await asyncio.sleep(0.01)
        await asyncio.gather(runtime.stop(), runtime.stop())
        assert await in_flight == b"done"
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await channel.unary_unary(f"/{PROBE_SERVICE}/Echo")(b"late", timeout=5)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    assert background_cancelled.is_set()
    assert order == ["second registered", "first registered", "exit stack"]
    await runtime.stop()
    assert order == ["second registered", "first registered", "exit stack"]


async def test_failing_background_task_shuts_the_service_down() -> None:
    runtime = build_runtime(ChassisSettings(shutdown_grace_seconds=2.0))

    async def consumer() -> None:
        raise ConnectionError("bus gone")

    serving = asyncio.ensure_future(runtime.serve())
    while runtime.port == 0:
        assert not serving.done(), serving
        await asyncio.sleep(0.01)
    runtime.start_task(consumer(), name="consumer")
    with pytest.raises(RuntimeError, match="consumer"):
        await asyncio.wait_for(serving, 10)


async def test_taken_port_fails_start_and_stop_still_cleans_up(runtime: ServiceRuntime) -> None:
    second = build_runtime(ChassisSettings(grpc_port=runtime.port))
    closed = []

    async def close_resources() -> None:
        closed.append(True)

    second.on_shutdown(close_resources)
    with pytest.raises(OSError, match=str(runtime.port)):
        await second.start()
    await second.stop()
    assert closed == [True]


def test_add_service_after_start_is_refused(runtime: ServiceRuntime) -> None:
    with pytest.raises(RuntimeError):
        runtime.add_generic_handler(kinds_handler(), "late.Service")


# -- the probe as a real process --------------------------------------------------------------


def _start_probe(tmp_path: Path, **settings: str) -> tuple[subprocess.Popen, Path]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPLITSTACK_PROBE_")}
    env.update({f"SPLITSTACK_PROBE_{k.upper()}": v for k, v in settings.items()})
    log_path = tmp_path / "probe.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "splitstack.chassis.testing.probe"], env=env,
                                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    return proc, log_path


async def _wait_until(condition, what: str, proc: subprocess.Popen, log_path: Path, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"{what}: probe rc={proc.poll()}, log:\n{log_path.read_text()}")
        await asyncio.sleep(0.02)


async def test_sigterm_lets_in_flight_call_finish_and_refuses_new_ones(tmp_path: Path) -> None:
    ready = tmp_path / "probe.json"
    # The in-flight call outlasts how long a loaded machine may take to act on SIGTERM.
    proc, log_path = _start_probe(tmp_path, ready_file=str(ready), shutdown_grace_seconds="20")
    try:
        await _wait_until(ready.exists, "no ready file", proc, log_path)
        port = json.loads(ready.read_text())["grpc_port"]
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            sleep = asyncio.ensure_future(channel.unary_unary(f"/{PROBE_SERVICE}/Sleep")(b"4", timeout=30))
            await _wait_until(lambda: "Sleep(4.000) started" in log_path.read_text(), "Sleep never started",
                              proc, log_path)
            sent = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            refused = await _first_refusal(channel, port)
            assert not sleep.done(), "a new call was accepted until the in-flight one finished"
            # GOAWAY (UNAVAILABLE), or CANCELLED for a call that raced the server's shutdown.
            assert refused in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
            assert await sleep == b"done"
        rc = await asyncio.to_thread(proc.wait, 20)
        assert rc == 0, log_path.read_text()
        assert time.monotonic() - sent < 20
        assert not ready.exists()
        assert "SIGTERM received" in log_path.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


async def _first_refusal(channel: grpc.aio.Channel, port: int) -> grpc.StatusCode:
    """Poll with new calls until the server refuses one; that call's status."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            await channel.unary_unary(f"/{PROBE_SERVICE}/Echo")(b"new", timeout=2)
        except grpc.aio.AioRpcError as exc:
            return exc.code()
        await asyncio.sleep(0.01)
    pytest.fail(f"the probe on {port} kept accepting new calls after SIGTERM")


async def test_probe_with_unknown_setting_exits_2_naming_it(tmp_path: Path) -> None:
    proc, log_path = _start_probe(tmp_path, grpc_prot="1")
    rc = await asyncio.to_thread(proc.wait, 30)
    assert rc == 2
    assert "SPLITSTACK_PROBE_GRPC_PROT" in log_path.read_text()


async def test_one_connection_holds_at_most_max_concurrent_streams(tmp_path: Path) -> None:
    """A client cannot open unbounded concurrent RPCs on one connection: past the bound the next
    call waits (HTTP/2 flow control) until one ends, and then it is served."""
    entered: list[int] = []
    release = asyncio.Event()

    async def hold(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        entered.append(len(entered))
        await release.wait()
        return b"done"

    settings = ChassisSettings(ready_file=str(tmp_path / "probe.json"), max_concurrent_streams=2)
    runtime = build_runtime(settings)
    runtime.add_generic_handler(grpc.method_handlers_generic_handler(
        "splitstack.testing.Hold", {"Hold": grpc.unary_unary_rpc_method_handler(hold)}), "splitstack.testing.Hold")
    await runtime.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{runtime.port}") as channel:
            call = channel.unary_unary("/splitstack.testing.Hold/Hold")
            calls = [asyncio.ensure_future(call(b"", timeout=60)) for _ in range(3)]
            deadline = time.monotonic() + 30
            while len(entered) < 2 and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            assert len(entered) == 2
            await asyncio.sleep(0.5)          # the third stays queued on the client's side
            assert len(entered) == 2
            release.set()
            assert await asyncio.gather(*calls) == [b"done"] * 3
            assert len(entered) == 3
    finally:
        await runtime.stop()
