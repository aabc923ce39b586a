"""How failures reach SDK users: every gRPC failure of a service becomes one `PlatformError`.

`PlatformError` carries the service (`registry`, `trainer`, `converter`, `serving`), the gRPC status
code and the service's own message, so `str(error)` reads `registry: NOT_FOUND: model 'x' not found`.
Bad local input (a missing file, a target without an address, a malformed spec) is a `ValueError`
raised before anything is sent; waiting too long is a `TimeoutError` naming what was waited for.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import grpc

T = TypeVar("T")
SERVICES = ("registry", "trainer", "converter", "serving")


class PlatformError(Exception):
    """A service refused or failed a request: `service`, `code` (grpc.StatusCode), `message`."""

    def __init__(self, service: str, code: grpc.StatusCode, message: str, **details: Any) -> None:
        self.service, self.code, self.message = service, code, message
        self.details = details          # e.g. stage and reason of a failed conversion
        super().__init__(f"{service}: {code.name}: {message}")

    def __str__(self) -> str:
        return f"{self.service}: {self.code.name}: {self.message}"

    @classmethod
    def from_rpc(cls, service: str, error: grpc.RpcError) -> "PlatformError":
        """The service's status and message from a failed call (an unreachable service included)."""
        code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
        message = error.details() if hasattr(error, "details") else str(error)
        return cls(service, code or grpc.StatusCode.UNKNOWN, message or str(error))


def call(service: str, method: Callable[..., T], request: Any, timeout: float | None) -> T:
    """One unary call; a failure becomes a PlatformError of `service`."""
    try:
        return method(request, timeout=timeout)
    except grpc.RpcError as exc:
        raise PlatformError.from_rpc(service, exc) from None


@contextlib.contextmanager
def translating(service: str) -> Iterator[None]:
    """Turn gRPC failures inside the block (e.g. while reading a stream) into PlatformErrors."""
    try:
        yield
    except grpc.RpcError as exc:
        raise PlatformError.from_rpc(service, exc) from None
