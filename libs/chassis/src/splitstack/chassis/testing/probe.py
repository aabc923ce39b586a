"""A minimal real service on the chassis runtime, for tests of the runtime and of process supervisors.

`python -m splitstack.chassis.testing.probe` serves, configured only by SPLITSTACK_PROBE_* variables
(ChassisSettings), health + reflection and `splitstack.testing.Probe`, whose methods carry raw bytes
(no proto needed; call them with identity serializers):

- `Echo(b)` -> `b`
- `Sleep(b"1.5")` -> sleeps that many seconds, then `b"done"` (graceful shutdown of in-flight calls)
- `Fail(b"NotFound")` -> raises the domain error of that class name (`InvalidName` too); any other
  name raises a RuntimeError, which clients see as INTERNAL
"""

from __future__ import annotations

import asyncio
import logging

import grpc

from splitstack.chassis import errors
from splitstack.chassis.config import ChassisSettings, load_settings
from splitstack.chassis.server import ServiceRuntime, run_service
from splitstack.contracts.names import InvalidName

PROBE_SERVICE = "splitstack.testing.Probe"
SERVICE_NAME = "probe"

log = logging.getLogger(__name__)


async def echo(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    """Return the request."""
    return request


async def sleep(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    """Sleep float(request) seconds, then answer b"done"."""
    try:
        seconds = float(request.decode())
    except ValueError:
        raise errors.InvalidArgument(f"Sleep wants a number of seconds, got {request!r}") from None
    log.info("Sleep(%.3f) started", seconds)
    await asyncio.sleep(seconds)
    return b"done"


def error_named(name: str) -> Exception:
    """An instance of the domain error class called `name` (or a RuntimeError for other names)."""
    message = f"probe raised {name}"
    if name == "InvalidName":
        return InvalidName(message)
    found = getattr(errors, name, None)
    if isinstance(found, type) and issubclass(found, errors.DomainError):
        return found(message)
    return RuntimeError(message)


async def fail(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    """Raise the error named by the request."""
    raise error_named(request.decode())


def probe_handler() -> grpc.GenericRpcHandler:
    """The generic handler of `splitstack.testing.Probe` (raw bytes in and out)."""
    return grpc.method_handlers_generic_handler(PROBE_SERVICE, {
        "Echo": grpc.unary_unary_rpc_method_handler(echo),
        "Sleep": grpc.unary_unary_rpc_method_handler(sleep),
        "Fail": grpc.unary_unary_rpc_method_handler(fail),
    })


def build_runtime(settings: ChassisSettings) -> ServiceRuntime:
    """A runtime serving the probe service with `settings`."""
    runtime = ServiceRuntime(settings, SERVICE_NAME)
    runtime.add_generic_handler(probe_handler(), PROBE_SERVICE)
    return runtime


async def main() -> None:
    """Serve the probe until SIGTERM/SIGINT."""
    await build_runtime(load_settings(ChassisSettings, SERVICE_NAME)).serve()


if __name__ == "__main__":
    run_service(main)
