"""The domain error vocabulary: what a service's core raises when a request cannot be served.

Core code raises these (it knows nothing of gRPC); the server's interceptor turns each into a
gRPC status with `str(exc)` as the message the client sees. Anything else escaping a handler is
a bug: the client gets INTERNAL and the server log gets the traceback.
"""

from __future__ import annotations

import grpc

from splitstack.contracts.limits import OutOfBounds
from splitstack.contracts.names import InvalidName


class DomainError(Exception):
    """A request that cannot be served; `code` is the gRPC status the client receives."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN


class NotFound(DomainError):
    """The named thing does not exist."""

    code = grpc.StatusCode.NOT_FOUND


class InvalidArgument(DomainError):
    """The request is malformed, whatever the state of the system."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class AlreadyExists(DomainError):
    """The thing to create exists already (with different content)."""

    code = grpc.StatusCode.ALREADY_EXISTS


class FailedPrecondition(DomainError):
    """The system is not in the state the request needs (e.g. promoting an unconverted version)."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class ResourceExhausted(DomainError):
    """A quota, queue or memory bound was hit; retry later or with less."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class DeadlineExceeded(DomainError):
    """The work did not finish within its time budget."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Unavailable(DomainError):
    """A dependency or the service itself is temporarily unable to serve; retry."""

    code = grpc.StatusCode.UNAVAILABLE


class Aborted(DomainError):
    """A concurrent change won (compare-and-set failed); retry from a fresh read."""

    code = grpc.StatusCode.ABORTED


class PermissionDenied(DomainError):
    """The caller may not do this."""

    code = grpc.StatusCode.PERMISSION_DENIED


class Cancelled(DomainError):
    """The work was cancelled before it finished."""

    code = grpc.StatusCode.CANCELLED


DOMAIN_ERRORS: tuple[type[DomainError], ...] = (
    NotFound, InvalidArgument, AlreadyExists, FailedPrecondition, ResourceExhausted,
    DeadlineExceeded, Unavailable, Aborted, PermissionDenied, Cancelled,
)


def status_for(exc: Exception) -> grpc.StatusCode | None:
    """The gRPC status a domain exception maps to, or None when `exc` is not a domain error."""
    if isinstance(exc, DomainError):
        return exc.code
    if isinstance(exc, (InvalidName, OutOfBounds)):
        return grpc.StatusCode.INVALID_ARGUMENT
    return None
