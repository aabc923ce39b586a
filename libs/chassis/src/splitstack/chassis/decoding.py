"""Requests whose bytes do not parse as their message: refused with INVALID_ARGUMENT, not gRPC's UNKNOWN.

grpc.aio answers `UNKNOWN: Unexpected <class DecodeError>` when a request deserializer raises (bad wire
format, invalid UTF-8 in a string field, nesting past protobuf's recursion limit): a client's bad input
reported as a server failure. The chassis wraps every guarded method's deserializer with `tolerant`, which
returns an `UndecodableRequest` instead of raising; `decoded` (in the guarded handler, where domain errors
become statuses) turns it, or the first such message of a client stream, into `InvalidArgument`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

from splitstack.chassis.errors import InvalidArgument


class UndecodableRequest:
    """What a guarded request deserializer returns for bytes that do not parse as the request message."""

    def __init__(self, method: str, error: Exception) -> None:
        self.method = method
        self.error = error

    def refusal(self) -> InvalidArgument:
        return InvalidArgument(f"the request is not a valid {self.method.rsplit('/', 1)[-1]} request message: "
                               f"{self.error}")


def tolerant(deserializer: Callable[[bytes], Any] | None, method: str) -> Callable[[bytes], Any] | None:
    """`deserializer` returning an UndecodableRequest instead of raising (gRPC would answer UNKNOWN)."""
    if deserializer is None:
        return None

    def deserialize(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception as exc:  # noqa: BLE001 - protobuf's DecodeError is a bare Exception subclass
            return UndecodableRequest(method, exc)

    return deserialize


async def decoded_stream(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
    """A client stream that raises InvalidArgument at the first message that did not parse."""
    async for request in requests:
        if isinstance(request, UndecodableRequest):
            raise request.refusal()
        yield request


def decoded(request: Any, streaming: bool) -> Any:
    """The request (or client stream) a handler may see: an undecodable one is refused."""
    if streaming:
        return decoded_stream(request)
    if isinstance(request, UndecodableRequest):
        raise request.refusal()
    return request
