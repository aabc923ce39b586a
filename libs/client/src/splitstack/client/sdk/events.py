"""Platform events from NATS: subscribe to contract subjects and decode envelope + payload.

`EventSubscription` runs its own nats-py connection on a background thread (the SDK is sync): it
is subscribed (and the server has the interest) before the constructor returns, so a caller can
subscribe, then act, and not miss the event its action causes. Subjects are NATS patterns; only
platform event subjects (`splitstack.contracts.events`) are subscribed, as the intersection of
each pattern with each contract subject. With `since_start`, stored (JetStream) subjects are read
from the start of their stream through ordered consumers; core subjects are always live only.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import socket
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from urllib.parse import urlparse

import nats
from google.protobuf.message import Message
from nats.js.api import DeliverPolicy

from splitstack.contracts import envelope
from splitstack.contracts.events import SUBJECTS, stream_for

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_SECONDS = 10.0
CLOSE_TIMEOUT_SECONDS = 5.0


@dataclass(frozen=True)
class Event:
    """One platform event: where it was published, its envelope's metadata and decoded payload."""

    subject: str
    event_id: str
    producer: str
    occurred_at: datetime
    payload: Message
    trace_context: dict[str, str] = field(default_factory=dict)

    @property
    def type_name(self) -> str:
        """The payload's message name, e.g. `ModelDeployed`."""
        return self.payload.DESCRIPTOR.name


def decode(subject: str, data: bytes) -> Event | None:
    """The event in a message, or None when it is not a platform envelope."""
    try:
        event = envelope.unwrap(data)
    except ValueError as exc:
        log.debug("ignoring a message on %s that is not an event: %s", subject, exc)
        return None
    return Event(subject, event.event_id, event.producer, event.occurred_at.ToDatetime(tzinfo=timezone.utc),
                 event.payload, dict(event.trace_context))


def intersect(a: str, b: str) -> str | None:
    """The NATS pattern matching exactly the subjects both patterns match, or None when none."""
    x, y = a.split("."), b.split(".")
    out: list[str] = []
    for i in range(max(len(x), len(y))):
        s, t = (x[i] if i < len(x) else None), (y[i] if i < len(y) else None)
        if s == ">" or t == ">":
            rest = y[i:] if s == ">" else x[i:]
            return ".".join(out + rest) if rest else None
        if s is None or t is None:
            return None
        if s != "*" and t != "*" and s != t:
            return None
        out.append(t if s == "*" else s)
    return ".".join(out)


def plan_subscriptions(subjects: Iterable[str], since_start: bool) -> tuple[list[str], list[tuple[str, str]]]:
    """(core subjects, [(stream, filter)]) covering the platform events that `subjects` match."""
    core: list[str] = []
    stored: list[tuple[str, str]] = []
    for pattern in subjects:
        for definition in SUBJECTS.values():
            common = intersect(pattern, definition.wildcard())
            if common is None:
                continue
            stream = stream_for(definition.wildcard()) if definition.transport == "jetstream" else None
            if since_start and stream is not None:
                if (stream.name, common) not in stored:
                    stored.append((stream.name, common))
            elif common not in core:
                core.append(common)
    if not core and not stored:
        raise ValueError(f"subjects {', '.join(subjects)} match no platform event subject "
                         f"(known: {', '.join(d.pattern for d in SUBJECTS.values())})")
    return core, stored


def check_reachable(nats_url: str, timeout: float) -> None:
    """ValueError at once when nothing listens at the URL (nats-py would keep retrying)."""
    parsed = urlparse(nats_url if "://" in nats_url else f"nats://{nats_url}")
    try:
        with socket.create_connection((parsed.hostname or "127.0.0.1", parsed.port or 4222), timeout=timeout):
            return
    except OSError as exc:
        raise ValueError(f"cannot reach NATS at {nats_url}: {exc}") from None


class EventSubscription:
    """Decoded events on `subjects`; iterate it, or `get(timeout)`; `close()` (or `with`) ends it."""

    def __init__(self, nats_url: str, subjects: Iterable[str] = (">",), *, since_start: bool = False,
                 connect_timeout: float = CONNECT_TIMEOUT_SECONDS) -> None:
        self.nats_url = nats_url
        self.core, self.stored = plan_subscriptions(list(subjects), since_start)
        check_reachable(nats_url, connect_timeout)
        self._events: queue.Queue[Event] = queue.Queue()
        self._ready = threading.Event()
        self._closed = threading.Event()
        self._error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=asyncio.run, args=(self._main(connect_timeout),),
                                        name="splitstack-events", daemon=True)
        self._thread.start()
        if not self._ready.wait(connect_timeout + CLOSE_TIMEOUT_SECONDS):
            self.close()
            raise TimeoutError(f"could not subscribe to events at {nats_url} within {connect_timeout:g}s")
        if self._error is not None:
            self.close()
            raise ValueError(f"cannot subscribe to events at {nats_url}: {self._error}") from None

    async def _main(self, connect_timeout: float) -> None:
        self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
        try:
            nc = await nats.connect(self.nats_url, connect_timeout=connect_timeout, max_reconnect_attempts=-1,
                                    allow_reconnect=True, error_cb=self._log_error)
        except Exception as exc:   # nats-py raises several unrelated types for "cannot connect"
            self._error = exc
            self._ready.set()
            return
        try:
            await self._subscribe(nc)
        except Exception as exc:
            self._error = exc
        self._ready.set()
        if self._error is None:
            await self._stop.wait()
        try:
            await asyncio.wait_for(nc.close(), CLOSE_TIMEOUT_SECONDS)
        except Exception as exc:   # closing is best effort (a timeout included)
            log.debug("closing the events connection: %s", exc)

    async def _subscribe(self, nc: nats.NATS) -> None:
        async def deliver(msg: nats.aio.msg.Msg) -> None:
            event = decode(msg.subject, msg.data)
            if event is not None:
                self._events.put(event)
        for subject in self.core:
            await nc.subscribe(subject, cb=deliver)
        js = nc.jetstream()
        for stream, subject in self.stored:
            await js.subscribe(subject, stream=stream, cb=deliver, ordered_consumer=True,
                               deliver_policy=DeliverPolicy.ALL)
        await nc.flush(timeout=CONNECT_TIMEOUT_SECONDS)   # the server has our interest from here on

    @staticmethod
    async def _log_error(exc: Exception) -> None:
        log.debug("events connection: %s", exc)

    def get(self, timeout: float | None = None) -> Event | None:
        """The next event, or None when none came within `timeout` seconds (or after close)."""
        try:
            return self._events.get(timeout=timeout)
        except queue.Empty:
            return None

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    def __iter__(self) -> Iterator[Event]:
        while not self._closed.is_set():
            event = self.get(timeout=0.2)
            if event is not None:
                yield event

    def close(self) -> None:
        """Unsubscribe and disconnect (idempotent)."""
        self._closed.set()
        if self._loop is not None and self._stop is not None and not self._loop.is_closed():
            try:
                self._loop.call_soon_threadsafe(self._stop.set)
            except RuntimeError:   # the loop ended meanwhile
                pass
        self._thread.join(CLOSE_TIMEOUT_SECONDS * 2)

    def __enter__(self) -> "EventSubscription":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class EventTail:
    """An iterator over a subscription's events until `stop` is set; closing it (or losing it) unsubscribes."""

    def __init__(self, subscription: EventSubscription, stop: threading.Event | None = None) -> None:
        self.subscription, self.stop = subscription, stop

    def __iter__(self) -> "EventTail":
        return self

    def __next__(self) -> Event:
        while self.stop is None or not self.stop.is_set():
            if self.subscription.closed:
                break
            event = self.subscription.get(timeout=0.2)
            if event is not None:
                return event
        self.close()
        raise StopIteration

    def close(self) -> None:
        self.subscription.close()

    def __enter__(self) -> "EventTail":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()
