"""The gRPC server lifecycle every service shares: build, serve, and one shutdown path.

A service's `main.py` builds its core, then:

    runtime = ServiceRuntime(settings, "registry")
    store = await runtime.exit_stack.enter_async_context(open_store(settings))
    runtime.add_service(registry_pb2_grpc.add_RegistryServicer_to_server, servicer,
                        "splitstack.registry.v1.Registry")
    runtime.start_task(consume_events(...))
    await runtime.serve()

`serve()` starts the server (health, reflection, Prometheus, ready file), waits for SIGTERM/SIGINT
and stops: health NOT_SERVING -> in-flight RPCs finish within the grace period -> background
tasks cancelled -> `on_shutdown` callbacks (last registered first) -> `exit_stack` closed.
A service with work to do before it can serve (e.g. models to load and warm) calls
`defer_readiness()` before starting and `mark_ready()` once it is done: until then the whole
server's health is NOT_SERVING and no ready file exists.
Every RPC passes one interceptor that maps domain errors to statuses (errors.py), turns any
other exception into INTERNAL with the traceback logged, and records metrics (metrics.py). A request
whose bytes do not parse as its message (bad wire format, invalid UTF-8 in a string, nesting past
protobuf's recursion limit) gets INVALID_ARGUMENT naming the message, not gRPC's UNKNOWN.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import logging
import os
import signal
import time
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from splitstack.chassis import logs, tls
from splitstack.chassis.config import ChassisSettings, ConfigError
from splitstack.chassis.decoding import decoded, tolerant
from splitstack.chassis.errors import status_for
from splitstack.chassis.metrics import MetricsEndpoint, MethodMetrics, start_metrics_server

log = logging.getLogger(__name__)

_CANCELLED = grpc.StatusCode.CANCELLED.name
Behavior = Callable[..., Any]


def _code_name(code: grpc.StatusCode | None) -> str:
    return "OK" if code is None else code.name


def _status_and_message(exc: Exception, method: str) -> tuple[grpc.StatusCode, str]:
    """The status and client-facing message for an exception escaping `method`'s handler."""
    if isinstance(exc, grpc.aio.AioRpcError):
        # A peer service's error reaches the caller as that service said it (code and message).
        log.debug("%s -> %s from a peer: %s", method, exc.code().name, exc.details())
        return exc.code(), exc.details() or exc.code().name
    code = status_for(exc)
    if code is None:
        log.error("unexpected %s in %s", type(exc).__name__, method, exc_info=exc)
        return grpc.StatusCode.INTERNAL, f"internal error ({type(exc).__name__}); see server log"
    log.debug("%s -> %s: %s", method, code.name, exc)
    return code, str(exc)


def _guard_coroutine(behavior: Behavior, observer: MethodMetrics, method: str, streaming: bool) -> Behavior:
    """Wrap a coroutine handler (unary response, or streaming through context.write)."""

    async def guarded(request: Any, context: grpc.aio.ServicerContext) -> Any:
        started = time.perf_counter()
        code = _CANCELLED
        try:
            response = await behavior(decoded(request, streaming), context)
            code = _code_name(context.code())
            return response
        except grpc.aio.AbortError:
            code = _code_name(context.code())
            raise
        except Exception as exc:  # noqa: BLE001 - every escape becomes a status
            status, message = _status_and_message(exc, method)
            code = status.name
            await context.abort(status, message)
        finally:
            observer.observe(code, time.perf_counter() - started)

    return guarded


def _guard_async_generator(behavior: Behavior, observer: MethodMetrics, method: str, streaming: bool) -> Behavior:
    """Wrap an async-generator handler (streaming response)."""

    async def guarded(request: Any, context: grpc.aio.ServicerContext) -> Any:
        started = time.perf_counter()
        code = _CANCELLED
        try:
            async for response in behavior(decoded(request, streaming), context):
                yield response
            code = _code_name(context.code())
        except grpc.aio.AbortError:
            code = _code_name(context.code())
            raise
        except Exception as exc:  # noqa: BLE001 - every escape becomes a status
            status, message = _status_and_message(exc, method)
            code = status.name
            await context.abort(status, message)
        finally:
            observer.observe(code, time.perf_counter() - started)

    return guarded


def _guard(behavior: Behavior, observer: MethodMetrics, method: str, streaming: bool) -> Behavior:
    if inspect.isasyncgenfunction(behavior):
        return _guard_async_generator(behavior, observer, method, streaming)
    if inspect.iscoroutinefunction(behavior):
        return _guard_coroutine(behavior, observer, method, streaming)
    log.warning("%s has a synchronous handler: no error mapping or metrics for it", method)
    return behavior


def _split_method(full_method: str) -> tuple[str, str]:
    """'/pkg.Service/Method' -> ('pkg.Service', 'Method')."""
    service, _, method = full_method.lstrip("/").partition("/")
    return service, method


def guard_handler(handler: grpc.RpcMethodHandler, full_method: str) -> grpc.RpcMethodHandler:
    """`handler` with error mapping and metrics around whichever of the four kinds it is (and, for an
    async one, an undecodable request refused with INVALID_ARGUMENT: see decoding.py)."""
    observer = MethodMetrics(*_split_method(full_method))
    behavior = handler.unary_unary or handler.unary_stream or handler.stream_unary or handler.stream_stream
    guarded = inspect.iscoroutinefunction(behavior) or inspect.isasyncgenfunction(behavior)
    serdes = {"request_deserializer": tolerant(handler.request_deserializer, full_method) if guarded
              else handler.request_deserializer, "response_serializer": handler.response_serializer}
    streaming = bool(handler.request_streaming)
    wrapped = _guard(behavior, observer, full_method, streaming)
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(wrapped, **serdes)
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(wrapped, **serdes)
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(wrapped, **serdes)
    return grpc.stream_stream_rpc_method_handler(wrapped, **serdes)


class RpcInterceptor(grpc.aio.ServerInterceptor):
    """Error mapping + metrics for every RPC; the wrapped handler is built once per method."""

    def __init__(self) -> None:
        self._guarded: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    async def intercept_service(self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
                                handler_call_details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        cached = self._guarded.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        guarded = guard_handler(handler, method)
        self._guarded[method] = (handler, guarded)
        return guarded


def _serving_status(serving: bool) -> int:
    return health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING


class ServiceRuntime:
    """One service process's gRPC server, background tasks and resources, with one shutdown path."""

    def __init__(self, settings: ChassisSettings, service: str) -> None:
        logs.apply_level(settings.log_level)
        self.settings = settings
        self.service = service
        self.exit_stack = contextlib.AsyncExitStack()
        self.port = 0
        self.metrics_port: int | None = None
        self._registrations: list[Callable[[grpc.aio.Server], None]] = []
        self._service_names: list[str] = []
        self._serving: dict[str, bool] = {"": True}
        self._shutdown_callbacks: list[Callable[[], Awaitable[None]]] = []
        self._tasks: set[asyncio.Task] = set()
        self._health_updates: set[asyncio.Task] = set()
        self._failed_tasks: list[str] = []
        self._shutdown_requested = asyncio.Event()
        self._server: grpc.aio.Server | None = None
        self._health: health.aio.HealthServicer | None = None
        self._metrics: MetricsEndpoint | None = None
        self._stopping: asyncio.Future | None = None
        self._signals: list[signal.Signals] = []
        self._wrote_ready_file = False
        self._ready_deferred = False
        self._transport = "plaintext"

    def add_service(self, add_fn: Callable[..., None], servicer: Any, service_full_name: str) -> None:
        """Register a servicer with its generated `add_XServicer_to_server(servicer, server)`
        (or `add_fn(server)` when `servicer` is None); the name goes to reflection and health."""
        register = add_fn if servicer is None else (lambda server: add_fn(servicer, server))
        self._register(register, service_full_name)

    def add_generic_handler(self, handler: grpc.GenericRpcHandler, service_full_name: str) -> None:
        """Register a generic handler (e.g. `grpc.method_handlers_generic_handler`) for a service."""
        self._register(lambda server: server.add_generic_rpc_handlers((handler,)), service_full_name)

    def _register(self, register: Callable[[grpc.aio.Server], None], service_full_name: str) -> None:
        if self._server is not None:
            raise RuntimeError(f"add {service_full_name} before start()")
        self._registrations.append(register)
        self._service_names.append(service_full_name)
        self._serving.setdefault(service_full_name, True)

    def on_shutdown(self, fn: Callable[[], Awaitable[None]]) -> None:
        """Call `fn()` after the server stopped and tasks were cancelled (last registered first)."""
        self._shutdown_callbacks.append(fn)

    def start_task(self, coro: Coroutine[Any, Any, Any], name: str | None = None) -> asyncio.Task:
        """Run `coro` in the background until shutdown. If it fails, the service shuts down."""
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if task.cancelled() or task.exception() is None:
            return
        log.error("background task %s failed; shutting down", task.get_name(), exc_info=task.exception())
        self._failed_tasks.append(task.get_name())
        self.request_shutdown()

    def set_serving(self, serving: bool, service_full_name: str = "") -> None:
        """Report `service_full_name` ("" = the whole server) as SERVING or NOT_SERVING."""
        self._serving[service_full_name] = serving
        if self._health is not None:
            update = asyncio.get_running_loop().create_task(
                self._health.set(service_full_name, _serving_status(serving)))
            self._health_updates.add(update)
            update.add_done_callback(self._health_updates.discard)

    def defer_readiness(self) -> None:
        """Opt out of being ready at start (call before `start()`): the whole server ("") reports
        NOT_SERVING and no ready file is written until `mark_ready()`, e.g. while models warm up."""
        if self._server is not None:
            raise RuntimeError("defer readiness before start()")
        self._ready_deferred = True
        self._serving[""] = False

    def mark_ready(self) -> None:
        """End a deferral: report the whole server SERVING and write the ready file (once started;
        before `start()` it simply cancels the deferral). Ignored once shutdown has begun."""
        if self._stopping is not None or self._shutdown_requested.is_set():
            return
        self._ready_deferred = False
        self.set_serving(True)
        if self._server is not None and not self._wrote_ready_file:
            self._write_ready_file()
            log.info("%s ready", self.service)

    async def start(self) -> None:
        """Build and start the gRPC server and metrics endpoint, mark SERVING, write the ready file
        (both only once `mark_ready()` is called when the service chose `defer_readiness()`)."""
        if self._server is not None or self._stopping is not None:
            raise RuntimeError("a ServiceRuntime starts once")
        server = self._server = grpc.aio.server(interceptors=[RpcInterceptor()], options=self._server_options())
        for register in self._registrations:
            register(server)
        self._health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        reflection.enable_server_reflection(
            [*self._service_names, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
        self.port = self._bind(server)
        if self.settings.metrics_port >= 0:
            self._metrics = self._start_metrics()
            self.metrics_port = self._metrics.port
        for name, serving in self._serving.items():
            await self._health.set(name, _serving_status(serving))
        await server.start()
        if not self._ready_deferred:
            self._write_ready_file()
        log.info("%s serving gRPC on %s:%d (%s), metrics port %s", self.service, self.settings.grpc_host,
                 self.port, self._transport, self.metrics_port)

    def _start_metrics(self) -> MetricsEndpoint:
        host, port = self.settings.grpc_host, self.settings.metrics_port
        try:
            return start_metrics_server(host, port)
        except OSError as exc:
            raise OSError(f"{self.service}: cannot serve metrics on {host}:{port}: {exc}") from None

    def _server_options(self) -> list[tuple[str, Any]]:
        size = self.settings.max_message_bytes
        # so_reuseport=0: a second server on a taken port fails instead of silently sharing it.
        return [("grpc.max_send_message_length", size), ("grpc.max_receive_message_length", size),
                ("grpc.max_concurrent_streams", self.settings.max_concurrent_streams), ("grpc.so_reuseport", 0)]

    def _bind(self, server: grpc.aio.Server) -> int:
        host = self.settings.grpc_host
        address = f"[{host}]:{self.settings.grpc_port}" if ":" in host else f"{host}:{self.settings.grpc_port}"
        credentials = tls.server_credentials(self.settings)
        self._transport = "plaintext" if credentials is None else (
            "mTLS" if self.settings.tls_client_ca_file else "TLS")
        try:
            if credentials is None:
                port = server.add_insecure_port(address)
            else:
                port = server.add_secure_port(address, credentials)
        except RuntimeError as exc:
            raise OSError(f"{self.service}: cannot listen for gRPC on {address}: {exc}") from None
        if port == 0:
            raise OSError(f"{self.service}: cannot listen for gRPC on {address}")
        return port

    def _write_ready_file(self) -> None:
        if not self.settings.ready_file:
            return
        path = Path(self.settings.ready_file)
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        staging.write_text(json.dumps({"pid": os.getpid(), "grpc_port": self.port,
                                       "metrics_port": self.metrics_port, "service": self.service}))
        os.replace(staging, path)
        self._wrote_ready_file = True

    def request_shutdown(self) -> None:
        """Make `wait_for_shutdown` return (call from the event loop's thread)."""
        self._shutdown_requested.set()

    async def wait_for_shutdown(self) -> None:
        """Return once SIGTERM/SIGINT arrives or `request_shutdown()` is called."""
        self._install_signal_handlers()
        await self._shutdown_requested.wait()

    def _install_signal_handlers(self) -> None:
        if self._signals:
            return
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                loop.add_signal_handler(sig, self._on_signal, sig)
            except (RuntimeError, ValueError):  # not the main thread: the caller owns signals
                log.debug("cannot install a handler for %s outside the main thread", sig.name)
                continue
            self._signals.append(sig)

    def _on_signal(self, sig: signal.Signals) -> None:
        if self._shutdown_requested.is_set():
            log.info("%s received again; already shutting down", sig.name)
        else:
            log.info("%s received; shutting down %s", sig.name, self.service)
        self.request_shutdown()

    async def stop(self) -> None:
        """The one shutdown path; safe to call more than once and after a failed start."""
        if self._stopping is None:
            self._stopping = asyncio.ensure_future(self._stop_once())
        await asyncio.shield(self._stopping)

    async def _stop_once(self) -> None:
        grace = self.settings.shutdown_grace_seconds
        self.request_shutdown()
        if self._health is not None:
            await self._health.enter_graceful_shutdown()
        if self._server is not None:
            await self._server.stop(grace)
        await self._cancel_tasks(grace)
        for callback in reversed(self._shutdown_callbacks):
            await self._bounded(callback, grace, f"on_shutdown {getattr(callback, '__qualname__', callback)}")
        await self._bounded(self.exit_stack.aclose, grace, "exit stack")
        if self._metrics is not None:
            await asyncio.to_thread(self._metrics.close)
        self._remove_ready_file()
        self._remove_signal_handlers()
        log.info("%s stopped", self.service)

    async def _cancel_tasks(self, timeout: float) -> None:
        tasks = [t for t in self._tasks if not t.done()]
        for task in tasks:
            task.cancel()
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=timeout)
            for task in pending:
                log.error("background task %s ignored cancellation for %.1fs", task.get_name(), timeout)

    @staticmethod
    async def _bounded(step: Callable[[], Awaitable[None]], timeout: float, what: str) -> None:
        try:
            await asyncio.wait_for(step(), timeout)
        except TimeoutError:
            log.error("%s did not finish within %.1fs", what, timeout)
        except Exception:  # noqa: BLE001 - one failing step must not skip the rest of shutdown
            log.exception("%s failed during shutdown", what)

    def _remove_ready_file(self) -> None:
        if self._wrote_ready_file:
            Path(self.settings.ready_file).unlink(missing_ok=True)

    def _remove_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in self._signals:
            loop.remove_signal_handler(sig)
        self._signals.clear()

    async def serve(self) -> None:
        """start(); wait for a signal or request_shutdown(); stop(). Raises if a background task failed."""
        self._install_signal_handlers()
        try:
            await self.start()
            await self.wait_for_shutdown()
        finally:
            await self.stop()
        if self._failed_tasks:
            raise RuntimeError(f"{self.service}: background task(s) failed: {', '.join(self._failed_tasks)}")


def run_service(main: Callable[[], Awaitable[None]]) -> None:
    """Run a service's async `main` with logging configured; exit 2 on a ConfigError, 1 on a crash."""
    logs.configure_logging()
    try:
        asyncio.run(main())
    except ConfigError as exc:
        log.error("configuration error: %s", exc)
        raise SystemExit(2) from None
    except KeyboardInterrupt:  # before the runtime installed its signal handlers
        raise SystemExit(130) from None
    except Exception:
        log.exception("service failed")
        raise SystemExit(1) from None
