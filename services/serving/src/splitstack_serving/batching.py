"""The dynamic batcher: one per loaded model version, on the event loop, running the model in threads.

`submit` queues a request's inputs (already checked against the model) and returns a future of
its outputs. Requests are stacked along dim 0 into one model run when that helps:

- a run starts when a model instance is free and either the queued rows reach `max_batch_size`
  or the oldest queued request has waited `max_queue_delay_us` (0: start at once with whatever is
  queued, which still batches the requests that arrived while the previous run computed);
- with `batching` off (or a model that cannot batch) each request runs alone;
- a request carrying several rows (client-batched) stays whole in one run; its rows are split
  back out of the outputs, so every caller gets exactly its own rows;
- a full queue (`max_queue_size` requests) refuses new requests at once (ResourceExhausted);
- a request whose deadline passed before its run starts is never computed (DeadlineExceeded),
  nor is one whose caller went away (its future is cancelled);
- when a shared run fails (say, one request's values make the model raise), each of its requests
  runs again alone, so only the requests that fail by themselves get the error (ExecutionFailed).

Runs happen on the version's own thread pool (`instances` threads); ONNX Runtime releases the
GIL, so the event loop keeps accepting requests while the model computes. Per request the hot
path allocates one small `Pending` and a future, and logs nothing.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import NamedTuple

import grpc
import numpy as np

from splitstack.chassis.errors import DeadlineExceeded, DomainError, ResourceExhausted, Unavailable

from splitstack_serving.metrics import ModelMetrics
from splitstack_serving.stats import InferenceStats

log = logging.getLogger(__name__)

RunModel = Callable[[dict[str, np.ndarray]], list[np.ndarray]]


class ExecutionFailed(DomainError):
    """The model run failed (the runtime's message says why); every request of that run fails."""

    code = grpc.StatusCode.INTERNAL


@dataclass(frozen=True)
class BatchPolicy:
    """How one model version schedules its requests."""

    max_batch_size: int = 64          # rows per run and per request; 0: the model does not batch
    max_queue_delay_us: int = 500     # how long the oldest request may wait for a fuller batch
    max_queue_size: int = 1024        # queued requests beyond which new ones are refused
    batching: bool = True             # False: every request runs alone (e.g. for a benchmark)
    instances: int = 1                # runs of this version that may compute at once


class RunResult(NamedTuple):
    """One request's own run, after the shared run it was part of failed."""

    outputs: list[np.ndarray] | None
    error: Exception | None


class Pending:
    """One queued request."""

    __slots__ = ("arrays", "rows", "key", "deadline", "future", "enqueued", "expiry")

    def __init__(self, arrays: list[np.ndarray], rows: int, key: object, deadline: float | None,
                 future: asyncio.Future, enqueued: float) -> None:
        self.arrays = arrays
        self.rows = rows
        self.key = key
        self.deadline = deadline
        self.future = future
        self.enqueued = enqueued
        self.expiry: asyncio.TimerHandle | None = None


class DynamicBatcher:
    """Queues, batches and runs the requests of one model version (create it on the event loop)."""

    def __init__(self, label: str, run: RunModel, input_names: Sequence[str], policy: BatchPolicy,
                 stats: InferenceStats, metrics: ModelMetrics) -> None:
        self.label = label
        self.policy = policy
        self._run = run
        self._input_names = tuple(input_names)
        self._stats = stats
        self._metrics = metrics
        self._loop = asyncio.get_running_loop()
        self._queue: deque[Pending] = deque()
        self._queued_rows = 0
        self._instances = max(policy.instances, 1)
        self._idle = self._instances
        self._all_idle = asyncio.Event()
        self._all_idle.set()
        self._solo = not policy.batching or policy.max_batch_size <= 0
        self._delay = 0.0 if self._solo else policy.max_queue_delay_us / 1e6
        self._max_rows = max(policy.max_batch_size, 1)
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = math.inf
        self._closed = False
        self._executor = ThreadPoolExecutor(self._instances, thread_name_prefix=f"infer-{label}")

    @property
    def pending(self) -> int:
        """Requests queued and not yet running (cancelled or expired ones included until dropped)."""
        return len(self._queue)

    def submit(self, arrays: list[np.ndarray], rows: int, key: object = None,
               deadline: float | None = None, enforce_deadline: bool = False) -> asyncio.Future:
        """Queue one request; its future gets the outputs (this request's rows, in output order).

        `deadline` is in `loop.time()` seconds: past it the request is never computed. With
        `enforce_deadline` the future also fails at the deadline while queued (for deadlines the
        transport does not enforce itself, unlike gRPC's, which cancels the call)."""
        if self._closed:
            raise Unavailable(f"{self.label} is unloading; retry (the model's current version takes it)")
        if len(self._queue) >= self.policy.max_queue_size and not self._purge_finished():
            raise ResourceExhausted(f"{self.label}: queue full ({len(self._queue)} requests waiting, "
                                    f"max_queue_size {self.policy.max_queue_size}); retry later")
        loop = self._loop
        pending = Pending(arrays, rows, key, deadline, loop.create_future(), loop.time())
        if enforce_deadline and deadline is not None:
            pending.expiry = loop.call_at(deadline, self._expire, pending)
        self._queue.append(pending)
        self._queued_rows += rows
        self._schedule()
        return pending.future

    def _purge_finished(self) -> bool:
        """Drop queued requests whose callers went away; True if that freed room."""
        live = deque(p for p in self._queue if not p.future.done())
        self._queued_rows = sum(p.rows for p in live)
        freed = len(live) < len(self._queue)
        self._queue = live
        return freed and len(live) < self.policy.max_queue_size

    def _expire(self, pending: Pending) -> None:
        if not pending.future.done():
            pending.future.set_exception(self._deadline_error())

    def _deadline_error(self) -> DeadlineExceeded:
        return DeadlineExceeded(f"{self.label}: the request's deadline passed while it was queued; "
                                "it was not computed")

    def _schedule(self) -> None:
        """Start runs while an instance is free and a batch is due; otherwise wake up when one is."""
        queue = self._queue
        while self._idle and queue:
            if self._delay and self._queued_rows < self._max_rows:
                due = queue[0].enqueued + self._delay
                if due > self._loop.time():
                    self._wake_at(due)
                    return
            batch, rows = self._take_batch()
            if batch:
                self._launch(batch, rows)

    def _wake_at(self, due: float) -> None:
        if due >= self._timer_at:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self._loop.call_at(due, self._on_timer)
        self._timer_at = due

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = math.inf
        self._schedule()

    def _take_batch(self) -> tuple[list[Pending], int]:
        """Pop the next run's requests: in arrival order, same batching key, at most max rows."""
        queue = self._queue
        now = self._loop.time()
        batch: list[Pending] = []
        rows = 0
        while queue:
            head = queue[0]
            if not head.future.done() and head.deadline is not None and head.deadline <= now:
                head.future.set_exception(self._deadline_error())
            if head.future.done():
                queue.popleft()
                self._queued_rows -= head.rows
                continue
            if batch and (self._solo or rows + head.rows > self._max_rows or head.key != batch[0].key):
                break
            queue.popleft()
            self._queued_rows -= head.rows
            batch.append(head)
            rows += head.rows
        return batch, rows

    def _launch(self, batch: list[Pending], rows: int) -> None:
        self._idle -= 1
        self._all_idle.clear()
        now = self._loop.time()
        queue_seconds = self._metrics.queue_seconds
        waited = 0.0
        for pending in batch:
            if pending.expiry is not None:
                pending.expiry.cancel()
            queue_seconds.observe(now - pending.enqueued)
            waited += now - pending.enqueued
        self._stats.queue.add(len(batch), int(waited * 1e9))
        self._metrics.batch_rows.observe(rows)
        work = self._executor.submit(self._execute, batch)
        work.add_done_callback(partial(self._done_in_thread, batch, rows))

    def _execute(self, batch: list[Pending]) -> tuple[list[np.ndarray] | list[RunResult], int, int]:
        """In a worker thread: stack the inputs, run the model; return the outputs (or, when a shared
        run failed, one result per request from running each alone) and the durations (ns)."""
        started = time.perf_counter_ns()
        if len(batch) == 1:
            feeds = dict(zip(self._input_names, batch[0].arrays))
        else:
            feeds = {name: np.concatenate([p.arrays[i] for p in batch])
                     for i, name in enumerate(self._input_names)}
        stacked = time.perf_counter_ns()
        try:
            outputs = self._run(feeds)
        except Exception:
            if len(batch) == 1:
                raise
            outputs = [self._run_alone(pending) for pending in batch]
        return outputs, stacked - started, time.perf_counter_ns() - stacked

    def _run_alone(self, pending: Pending) -> RunResult:
        try:
            return RunResult(self._run(dict(zip(self._input_names, pending.arrays))), None)
        except Exception as exc:  # noqa: BLE001 - reported to this request only
            return RunResult(None, exc)

    def _done_in_thread(self, batch: list[Pending], rows: int, work: Future) -> None:
        try:
            self._loop.call_soon_threadsafe(self._finish, batch, rows, work)
        except RuntimeError:  # the loop closed under a run that outlived shutdown
            log.debug("%s: a run finished after the event loop closed", self.label)

    def _finish(self, batch: list[Pending], rows: int, work: Future) -> None:
        """On the loop: hand every request its own rows of the outputs, record stats, go on."""
        self._idle += 1
        try:
            outputs, input_ns, infer_ns = work.result()
        except Exception as exc:  # noqa: BLE001 - a failed run fails its requests, not the batcher
            self._fail(batch, exc)
        else:
            self._deliver(batch, rows, outputs, input_ns, infer_ns)
        if self._idle == self._instances:
            self._all_idle.set()
        self._schedule()

    def _deliver(self, batch: list[Pending], rows: int, outputs: list[np.ndarray] | list[RunResult],
                 input_ns: int, infer_ns: int) -> None:
        started = time.perf_counter_ns()
        if len(batch) == 1:
            if not batch[0].future.done():
                batch[0].future.set_result(outputs)
        elif isinstance(outputs[0], RunResult):
            self._deliver_alone(batch, outputs)  # type: ignore[arg-type]
        else:
            start = 0
            for pending in batch:
                stop = start + pending.rows
                if not pending.future.done():
                    pending.future.set_result([output[start:stop] for output in outputs])
                start = stop
        self._stats.record_execution(rows, len(batch), input_ns, infer_ns, time.perf_counter_ns() - started)

    def _deliver_alone(self, batch: list[Pending], results: list[RunResult]) -> None:
        failed = sum(result.error is not None for result in results)
        log.warning("%s: a shared run of %d requests failed; rerun alone, %d of them failed", self.label,
                    len(batch), failed)
        for pending, result in zip(batch, results):
            if pending.future.done():
                continue
            if result.error is None:
                pending.future.set_result(result.outputs)
            else:
                pending.future.set_exception(ExecutionFailed(f"{self.label}: model run failed: {result.error}"))

    def _fail(self, batch: list[Pending], exc: Exception) -> None:
        log.warning("%s: a run of %d request(s) failed: %s", self.label, len(batch), exc)
        error = ExecutionFailed(f"{self.label}: model run failed: {exc}")
        for pending in batch:
            if not pending.future.done():
                pending.future.set_exception(error)

    async def close(self, timeout: float) -> None:
        """Refuse new requests, fail queued ones (Unavailable), wait for running ones, stop threads."""
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        while self._queue:
            pending = self._queue.popleft()
            if not pending.future.done():
                pending.future.set_exception(Unavailable(f"{self.label} was unloaded before the request ran"))
        self._queued_rows = 0
        try:
            await asyncio.wait_for(self._all_idle.wait(), timeout)
        except TimeoutError:
            log.error("%s: a model run did not finish within %.1fs of unloading", self.label, timeout)
        self._executor.shutdown(wait=False)
