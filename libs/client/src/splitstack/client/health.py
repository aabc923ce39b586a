"""Health of the stack's components, checked from outside the way any client would.

- NATS: the port accepts TCP and a JetStream account-info request succeeds.
- A service: `grpc.health.v1.Health/Check` for the whole server ("") answers SERVING.

Every check has a timeout and never raises for an unhealthy component: it returns a `Health`
whose `detail` says what failed.
"""

from __future__ import annotations

import asyncio
import socket
from dataclasses import dataclass

import grpc
import nats
from grpc_health.v1 import health_pb2, health_pb2_grpc


@dataclass(frozen=True)
class Health:
    """The outcome of one check: healthy or not, and a short human-readable reason."""

    healthy: bool
    detail: str


def split_address(address: str) -> tuple[str, int]:
    """`host:port` → (host, port)."""
    host, _, port = address.rpartition(":")
    return host, int(port)


def port_accepts(address: str, timeout: float = 1.0) -> bool:
    """True when something accepts TCP connections at `host:port`."""
    try:
        with socket.create_connection(split_address(address), timeout=timeout):
            return True
    except OSError:
        return False


async def _jetstream_account(url: str, timeout: float) -> str:
    async def ignore(_exc: Exception) -> None:
        return None  # reported through the raised exception instead of a logged traceback

    nc = await nats.connect(url, connect_timeout=timeout, allow_reconnect=False,
                            max_reconnect_attempts=0, error_cb=ignore)
    try:
        info = await nc.jetstream(timeout=timeout).account_info()
        return f"JetStream ok, {info.streams} streams"
    finally:
        await asyncio.wait_for(nc.close(), timeout)


def check_nats(address: str, timeout: float = 2.0) -> Health:
    """NATS at `host:port` accepts TCP and answers a JetStream account-info request."""
    if not port_accepts(address, timeout):
        return Health(False, f"nothing listens on {address}")
    try:
        detail = asyncio.run(asyncio.wait_for(_jetstream_account(f"nats://{address}", timeout), timeout * 2))
    except Exception as exc:  # any failure of the request means "not healthy"; the detail says which
        return Health(False, f"JetStream not reachable: {type(exc).__name__}: {exc}".rstrip(": "))
    return Health(True, detail)


def check_grpc(address: str, timeout: float = 2.0) -> Health:
    """The gRPC server at `host:port` reports SERVING through grpc.health.v1."""
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout)
        except grpc.RpcError as exc:
            return Health(False, f"health check failed: {exc.code().name}")
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    return Health(reply.status == health_pb2.HealthCheckResponse.SERVING, status)
