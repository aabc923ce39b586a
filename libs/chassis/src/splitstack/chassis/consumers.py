"""JetStream consumer loops behind `Bus.work_consumer` and `Bus.fanout_consumer`.

A `ConsumerLoop` pulls from one JetStream pull consumer in batches sized to its free handler
slots, runs each message's handler in its own task (sending in-progress acks while it runs), and
settles the message by the handler's outcome: return -> ack; raise -> nak with a delay, or, on
the last allowed delivery, terminate and dead-letter; raise `Terminate` or an undecodable envelope
-> terminate and dead-letter at once. A dead letter is logged, counted and published as an
`events.v1.DeadLetter` event. When the consumer disappears (server restart without its state,
inactivity clean-up) the loop recreates it, resuming where it stopped; errors are logged and
retried with back-off until `stop()`.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import nats.js.errors
from nats.aio.msg import Msg
from nats.js.api import ConsumerConfig, DeliverPolicy
from prometheus_client import Counter

from splitstack.contracts.envelope import MSG_ID_HEADER, Event, unwrap
from splitstack.contracts.events import definition_for, subject
from splitstack.events.v1 import events_pb2

if TYPE_CHECKING:
    from splitstack.chassis.bus import Bus

log = logging.getLogger(__name__)

HANDLED = Counter("splitstack_bus_handled", "Messages a bus consumer handled and acked", ["consumer"])
FAILED = Counter("splitstack_bus_failed", "Handler failures (each one naks or terminates a message)",
                 ["consumer"])
DEAD_LETTERS = Counter("splitstack_bus_dead_letters", "Messages a bus consumer gave up on", ["consumer"])

FETCH_TIMEOUT_SECONDS = 5.0          # how long one pull request waits on the server
BACKOFF_SECONDS = (0.2, 5.0)         # first and largest pause after a loop error
MAX_ERROR_TEXT = 2000                # characters of the handler error kept in a DeadLetter
STREAM_NOT_FOUND = 10059             # JetStream error code: the stream itself does not exist


class Terminate(Exception):
    """Raise from a handler to give up on a message at once (no redelivery); it is dead-lettered
    with the message."""


@dataclass
class Delivery:
    """One delivery of a JetStream message to a handler."""

    subject: str
    event: Event
    num_delivered: int
    stream_sequence: int
    _msg: Msg = field(repr=False, compare=False)

    async def in_progress(self) -> None:
        """Tell the server the message is still being worked on (resets its ack timer)."""
        await self._msg.in_progress()


Handler = Callable[[Delivery], Awaitable[None]]
DeadLetterCallback = Callable[[events_pb2.DeadLetter], Awaitable[None] | None]


@dataclass(frozen=True)
class DeliveryRules:
    """How a consumer treats handler outcomes; `consumer` labels metrics and dead letters."""

    consumer: str
    max_deliver: int
    ack_wait: float
    nak_delay: float
    concurrency: int
    on_dead_letter: DeadLetterCallback | None = None


class ReconnectSignal:
    """Wakes every waiter once per reconnect (the server may have lost pull requests)."""

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def fire(self) -> None:
        self._event.set()
        self._event = asyncio.Event()

    async def wait(self) -> None:
        await self._event.wait()


class _Reconnected(Exception):
    """A fetch was interrupted by a reconnect."""


class Subscription:
    """A running subscription or consumer; `stop()` ends it (idempotent, bounded by `timeout`)."""

    def __init__(self, description: str, stoppers: Sequence[Callable[[float], Awaitable[None]]]) -> None:
        self.description = description
        self._stoppers = list(stoppers)
        self._stopped = False

    async def stop(self, timeout: float = 5.0) -> None:
        if self._stopped:
            return
        self._stopped = True
        await asyncio.gather(*(stop(timeout) for stop in self._stoppers))

    def __repr__(self) -> str:
        return f"Subscription({self.description})"


class _Backoff:
    """Doubling pauses between retries, reset by a success."""

    def __init__(self) -> None:
        self._next = BACKOFF_SECONDS[0]

    def reset(self) -> None:
        self._next = BACKOFF_SECONDS[0]

    def next(self) -> float:
        pause, self._next = self._next, min(self._next * 2, BACKOFF_SECONDS[1])
        return pause


class ConsumerLoop:
    """Pulls one JetStream consumer and runs a handler per message, at most `concurrency` at once.

    `ephemeral` consumers (fan-out) are recreated from the first unfinished stream sequence when
    they disappear and deleted on stop; durable ones are recreated with their own config.
    """

    def __init__(self, bus: Bus, stream: str, config: ConsumerConfig, handler: Handler,
                 rules: DeliveryRules, *, ephemeral: bool) -> None:
        self._bus = bus
        self._stream = stream
        self._config = config
        self._handler = handler
        self._rules = rules
        self._ephemeral = ephemeral
        self._dead_letter_subject = subject("dead_letter", consumer=rules.consumer)
        self._in_flight: dict[asyncio.Task, int] = {}
        self._resume_seq = 1
        self._suspect = False
        self._task: asyncio.Task | None = None
        self._psub = None
        self._stopped = False

    @property
    def name(self) -> str:
        return self._config.durable_name or self._config.name

    async def start(self) -> None:
        """Create (or update) the consumer, bind a pull subscription and start pulling."""
        await self._create_consumer(self._config)
        self._psub = await self._bus.js.pull_subscribe_bind(consumer=self.name, stream=self._stream)
        self._task = asyncio.create_task(self._run(), name=f"consumer-{self.name}")

    async def _create_consumer(self, config: ConsumerConfig) -> None:
        info = await self._bus.js.add_consumer(self._stream, config)
        self._resume_seq = max(self._resume_seq, info.delivered.stream_seq + 1)
        log.info("consumer %s on %s ready (filter %s)", self.name, self._stream,
                 info.config.filter_subjects or info.config.filter_subject)

    async def _ensure_consumer(self) -> None:
        """Recreate the consumer if the server no longer has it."""
        try:
            await self._bus.js.consumer_info(self._stream, self.name)
            return
        except nats.js.errors.NotFoundError as exc:
            if exc.err_code == STREAM_NOT_FOUND:  # nothing to recreate the consumer on (yet)
                raise
        config = self._config
        if self._ephemeral:
            start = min([*self._in_flight.values(), self._resume_seq])
            config = config.evolve(deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=start)
        log.warning("consumer %s on %s disappeared; recreating it", self.name, self._stream)
        await self._create_consumer(config)

    async def _run(self) -> None:
        backoff = _Backoff()
        while True:
            await self._wait_for_free_slot()
            try:
                if self._suspect:
                    await self._ensure_consumer()
                    self._suspect = False
                msgs = await self._fetch(self._rules.concurrency - len(self._in_flight))
            except asyncio.TimeoutError:
                continue
            except _Reconnected:
                self._suspect = True
                continue
            except Exception as exc:  # noqa: BLE001  the loop must outlive any server trouble
                if self._bus.nc.is_closed:
                    log.info("consumer %s on %s: the connection is closed; stopping", self.name, self._stream)
                    return
                self._suspect = True
                pause = backoff.next()
                log.warning("consumer %s on %s: %s; retrying in %.1fs", self.name, self._stream,
                            exc or type(exc).__name__, pause)
                await asyncio.sleep(pause)
                continue
            backoff.reset()
            for msg in msgs:
                self._dispatch(msg)

    async def _wait_for_free_slot(self) -> None:
        while len(self._in_flight) >= self._rules.concurrency:
            await asyncio.wait(list(self._in_flight), return_when=asyncio.FIRST_COMPLETED)

    async def _fetch(self, batch: int) -> list[Msg]:
        """One pull request, abandoned early when the connection is re-established."""
        fetch = asyncio.ensure_future(self._psub.fetch(batch, timeout=FETCH_TIMEOUT_SECONDS))
        woken = asyncio.ensure_future(self._bus.reconnects.wait())
        try:
            await asyncio.wait({fetch, woken}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (fetch, woken):
                task.cancel()
            await asyncio.gather(fetch, woken, return_exceptions=True)
        if fetch.cancelled():
            raise _Reconnected
        return fetch.result()

    def _dispatch(self, msg: Msg) -> None:
        seq = msg.metadata.sequence.stream
        self._resume_seq = max(self._resume_seq, seq + 1)
        task = asyncio.create_task(self._settle(msg), name=f"handle-{self.name}-{seq}")
        self._in_flight[task] = seq
        task.add_done_callback(lambda t: self._in_flight.pop(t, None))

    async def _settle(self, msg: Msg) -> None:
        """Run the handler on one message and ack, nak or terminate it by the outcome."""
        meta = msg.metadata
        try:
            event = unwrap(msg.data)
            _check_contract_message(msg.subject, event)
        except ValueError as exc:
            FAILED.labels(self._rules.consumer).inc()
            await self._dead_letter(msg, (msg.headers or {}).get(MSG_ID_HEADER, ""), str(exc))
            return
        delivery = Delivery(msg.subject, event, meta.num_delivered, meta.sequence.stream, msg)
        try:
            await self._run_handler(delivery)
        except asyncio.CancelledError:
            await _quietly(msg.nak(), "nak on cancel")
            raise
        except Terminate as exc:
            FAILED.labels(self._rules.consumer).inc()
            await self._dead_letter(msg, event.event_id, f"terminated by handler: {exc}")
        except Exception as exc:  # noqa: BLE001  any handler failure is settled, never propagated
            FAILED.labels(self._rules.consumer).inc()
            await self._after_failure(msg, delivery, exc)
        else:
            HANDLED.labels(self._rules.consumer).inc()
            await _quietly(msg.ack(), f"ack of {msg.subject}")

    async def _run_handler(self, delivery: Delivery) -> None:
        """The handler, with in-progress acks every ack_wait/3 while it runs."""
        keep_alive = asyncio.create_task(self._keep_alive(delivery))
        try:
            await self._handler(delivery)
        finally:
            keep_alive.cancel()
            await asyncio.gather(keep_alive, return_exceptions=True)

    async def _keep_alive(self, delivery: Delivery) -> None:
        while True:
            await asyncio.sleep(self._rules.ack_wait / 3)
            await _quietly(delivery.in_progress(), "in-progress ack")

    async def _after_failure(self, msg: Msg, delivery: Delivery, exc: Exception) -> None:
        error = f"{type(exc).__name__}: {exc}"
        if delivery.num_delivered >= self._rules.max_deliver:
            await self._dead_letter(msg, delivery.event.event_id, error)
            return
        log.warning("consumer %s: handler failed on %s (seq %d, delivery %d/%d): %s; redelivering",
                    self._rules.consumer, msg.subject, delivery.stream_sequence, delivery.num_delivered,
                    self._rules.max_deliver, error, exc_info=exc)
        await _quietly(msg.nak(delay=self._rules.nak_delay), f"nak of {msg.subject}")

    async def _dead_letter(self, msg: Msg, event_id: str, error: str) -> None:
        """Give up on a message: log, count, publish a DeadLetter event, terminate, call back."""
        meta = msg.metadata
        letter = events_pb2.DeadLetter(
            consumer=self._rules.consumer, stream=meta.stream, subject=msg.subject, event_id=event_id,
            stream_sequence=meta.sequence.stream, deliveries=meta.num_delivered, error=error[:MAX_ERROR_TEXT])
        letter.at.GetCurrentTime()
        DEAD_LETTERS.labels(self._rules.consumer).inc()
        log.error("consumer %s: dead-lettering %s (stream %s seq %d, event %s) after %d deliveries: %s",
                  self._rules.consumer, msg.subject, meta.stream, meta.sequence.stream, event_id or "-",
                  meta.num_delivered, error)
        letter_id = f"deadletter-{self._rules.consumer}-{meta.stream}-{meta.sequence.stream}"
        await _quietly(self._bus.publish(self._dead_letter_subject, letter, event_id=letter_id),
                       "dead-letter publish")
        await _quietly(msg.term(), f"term of {msg.subject}")
        if self._rules.on_dead_letter is not None:
            await _quietly(_call(self._rules.on_dead_letter, letter), "on_dead_letter callback")

    async def stop(self, timeout: float) -> None:
        """Stop pulling, let in-flight handlers finish (cancelled after `timeout`), unsubscribe."""
        if self._stopped:
            return
        self._stopped = True
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._in_flight:
            _, late = await asyncio.wait(list(self._in_flight), timeout=timeout)
            for task in late:
                task.cancel()
            if late:
                log.warning("consumer %s: cancelled %d handlers still running after %.1fs",
                            self.name, len(late), timeout)
                await asyncio.wait(late, timeout=1.0)
        if self._psub is not None:
            await _quietly(asyncio.wait_for(self._psub.unsubscribe(), 1.0), "unsubscribe")
        if self._ephemeral:
            await _quietly(asyncio.wait_for(self._bus.js.delete_consumer(self._stream, self.name), 1.0),
                           f"delete of consumer {self.name}")


def _check_contract_message(subject_text: str, event: Event) -> None:
    """ValueError when a contract subject carries another message than its contract's (poison)."""
    try:
        expected = definition_for(subject_text).message
    except KeyError:
        return  # not a contract subject (tests, ad-hoc streams): the handler decides
    if event.type_name != expected:
        raise ValueError(f"{subject_text[:120]!r} carries {event.type_name}, not its contract's {expected}")


async def _call(callback: Callable, *args: object) -> None:
    result = callback(*args)
    if inspect.isawaitable(result):
        await result


async def _quietly(action: Awaitable, what: str) -> None:
    """Await a best-effort action; log (never raise) its failure."""
    try:
        await action
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # noqa: BLE001
        log.warning("%s failed: %s", what, exc or type(exc).__name__)
