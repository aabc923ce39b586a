"""Calls to peers (registry, other services, NATS) that ride out a peer's restart.

A peer that is restarting answers UNAVAILABLE (connection refused) or lets a deadline pass; the
caller should not fail its own work for that. `retry_transient` runs a call again with capped
exponential back-off until it succeeds, fails for a reason a retry cannot fix, or the budget's
total time is spent (then the last error propagates). Writes to the registry carry idempotency
keys, so a call repeated after an unseen success returns the same record.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import grpc

log = logging.getLogger(__name__)

T = TypeVar("T")

TRANSIENT_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})


@dataclass(frozen=True)
class RetryBudget:
    """How long a caller keeps retrying a transient failure, and how it paces the attempts."""

    total_seconds: float = 120.0
    first_pause: float = 0.2
    max_pause: float = 5.0

    def __post_init__(self) -> None:
        if self.total_seconds < 0 or self.first_pause <= 0 or self.max_pause < self.first_pause:
            raise ValueError("RetryBudget needs total_seconds >= 0 and 0 < first_pause <= max_pause")

    def pauses(self):
        """Pauses between attempts: first_pause, doubling, capped at max_pause (endless)."""
        pause = self.first_pause
        while True:
            yield pause
            pause = min(self.max_pause, pause * 2)


def is_transient(exc: BaseException) -> bool:
    """True for failures a later attempt may not see: a peer down or restarting, a lost connection."""
    if isinstance(exc, grpc.RpcError) and hasattr(exc, "code"):
        return exc.code() in TRANSIENT_CODES
    return isinstance(exc, (ConnectionError, asyncio.TimeoutError, TimeoutError))


async def retry_transient(call: Callable[[], Awaitable[T]], *, what: str, budget: RetryBudget,
                          transient: Callable[[BaseException], bool] = is_transient) -> T:
    """`await call()` until it succeeds, fails permanently, or `budget.total_seconds` have passed."""
    deadline = time.monotonic() + budget.total_seconds
    attempt = 0
    for pause in budget.pauses():
        attempt += 1
        try:
            return await call()
        except Exception as exc:
            if not transient(exc) or time.monotonic() + pause > deadline:
                raise
            log.warning("%s failed (attempt %d, %s); retrying in %.1fs", what, attempt, _describe(exc), pause)
        await asyncio.sleep(pause)
    raise AssertionError("unreachable")  # pauses() never ends


def retry_transient_sync(call: Callable[[], T], *, what: str, budget: RetryBudget,
                         transient: Callable[[BaseException], bool] = is_transient) -> T:
    """The blocking form of `retry_transient`, for job processes and threads."""
    deadline = time.monotonic() + budget.total_seconds
    attempt = 0
    for pause in budget.pauses():
        attempt += 1
        try:
            return call()
        except Exception as exc:
            if not transient(exc) or time.monotonic() + pause > deadline:
                raise
            log.warning("%s failed (attempt %d, %s); retrying in %.1fs", what, attempt, _describe(exc), pause)
        time.sleep(pause)
    raise AssertionError("unreachable")


def _describe(exc: BaseException) -> str:
    if isinstance(exc, grpc.RpcError) and hasattr(exc, "code"):
        return f"{exc.code().name}: {exc.details() if hasattr(exc, 'details') else ''}"
    return repr(exc)


__all__ = ["RetryBudget", "TRANSIENT_CODES", "is_transient", "retry_transient", "retry_transient_sync"]
