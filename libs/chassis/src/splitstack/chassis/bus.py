"""The JetStream bus every service talks through: connect, declare streams, publish, consume.

`connect_bus(settings, producer=...)` waits for NATS to come up (bounded by the settings' connect
timeout), authenticates with whatever credentials the settings carry, and reconnects forever once
connected. A `Bus` publishes contract events inside the envelope (the event id doubles as the
`Nats-Msg-Id`, so JetStream drops duplicates) and runs the two kinds of consumers of the design:
work consumers (one durable shared by a pool's replicas) and fan-out consumers (every replica sees
every message). The consumer loops themselves live in `splitstack.chassis.consumers`.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import uuid
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import nats.errors
import nats.js.errors
from google.protobuf.message import Message
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, RetentionPolicy, StorageType, StreamConfig

from splitstack.chassis.config import ChassisSettings
from splitstack.chassis.consumers import (ConsumerLoop, DeadLetterCallback, Delivery, DeliveryRules, Handler,
                                          ReconnectSignal, Subscription, Terminate)
from splitstack.contracts.envelope import MSG_ID_HEADER, Event, unwrap, wrap
from splitstack.contracts.events import STREAMS, ConsumerDef, StreamDef

__all__ = ["Bus", "BusConnectError", "Delivery", "Handler", "PublishResult", "Subscription", "Terminate",
           "connect_bus"]

log = logging.getLogger(__name__)

RECONNECT_WAIT_SECONDS = 1.0         # pause between reconnect attempts after a connection is lost
PORT_POLL_SECONDS = 0.1              # pause between probes of a server that is not up yet
FANOUT_INACTIVE_SECONDS = 300.0      # the server deletes an abandoned fan-out consumer after this
STREAM_EXISTS_DIFFERENTLY = 10058    # JetStream: stream name already in use with a different config


class BusConnectError(ConnectionError):
    """NATS could not be reached in time or refused the credentials; the message names the URL."""


@dataclass(frozen=True)
class PublishResult:
    """Where JetStream stored a message; `duplicate` when its event id was already stored."""

    stream: str
    seq: int
    duplicate: bool


def _servers(url: str) -> list[str]:
    return [part.strip() for part in url.split(",") if part.strip()]


def _host_port(server: str) -> tuple[str, int]:
    parsed = urlsplit(server if "://" in server else f"nats://{server}")
    return parsed.hostname or "127.0.0.1", parsed.port or 4222


async def _any_port_open(servers: Sequence[str], timeout: float) -> bool:
    """True when some server accepts a TCP connection (probing avoids nats-py's retry noise)."""
    for server in servers:
        try:
            _, writer = await asyncio.wait_for(asyncio.open_connection(*_host_port(server)), timeout)
        except (OSError, asyncio.TimeoutError):
            continue
        writer.close()
        return True
    return False


def _credentials(settings: ChassisSettings) -> dict:
    """nats-py connect options for the credentials and TLS CA the settings carry."""
    options: dict = {}
    if settings.nats_user:
        options.update(user=settings.nats_user, password=settings.nats_password)
    if settings.nats_token:
        options["token"] = settings.nats_token
    if settings.nats_nkey_seed_file:
        if not Path(settings.nats_nkey_seed_file).is_file():
            raise BusConnectError(f"NATS nkey seed file {settings.nats_nkey_seed_file} does not exist")
        options["nkeys_seed"] = settings.nats_nkey_seed_file
    if settings.nats_tls_ca_file:
        options["tls"] = ssl.create_default_context(cafile=settings.nats_tls_ca_file)
    return options


def _callbacks(nc: NATS, url: str, reconnects: ReconnectSignal, connected: list[bool]) -> dict:
    """Connection callbacks that log; errors before the first connect are only debug noise."""

    async def on_error(exc: Exception) -> None:
        if isinstance(exc, nats.errors.SlowConsumerError):
            log.error("NATS slow consumer on %s: messages were dropped", exc.subject)
        elif connected[0]:
            log.warning("NATS error (%s): %s", url, exc or type(exc).__name__)
        else:
            log.debug("NATS connect attempt to %s: %s", url, exc or type(exc).__name__)

    async def on_disconnected() -> None:
        if connected[0] and not (nc.is_draining or nc.is_closed):  # not our own close()
            log.warning("disconnected from NATS at %s; reconnecting", url)

    async def on_reconnected() -> None:
        log.info("reconnected to NATS at %s", url)
        reconnects.fire()

    return dict(error_cb=on_error, disconnected_cb=on_disconnected, reconnected_cb=on_reconnected)


async def _connect(settings: ChassisSettings, producer: str, reconnects: ReconnectSignal) -> NATS:
    """Connect once the server is up; give up at the connect timeout or on an auth rejection."""
    url, servers = settings.nats_url, _servers(settings.nats_url)
    options = _credentials(settings)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + settings.nats_connect_timeout_seconds
    last_error = "nothing accepted connections"
    while (remaining := deadline - loop.time()) > 0:
        if not await _any_port_open(servers, min(1.0, remaining)):
            await asyncio.sleep(min(PORT_POLL_SECONDS, remaining))
            continue
        connected = [False]
        nc = NATS()
        try:
            # No reconnects inside the first connect: a refused login must fail here, not loop.
            await nc.connect(servers, name=f"{producer}-{settings.instance}", allow_reconnect=False,
                             max_reconnect_attempts=-1, reconnect_time_wait=RECONNECT_WAIT_SECONDS,
                             connect_timeout=max(1.0, min(remaining, 5.0)),
                             **_callbacks(nc, url, reconnects, connected), **options)
        except Exception as exc:  # noqa: BLE001  any failure is retried until the deadline
            await _close_quietly(nc)
            if "authorization" in str(exc).lower():
                raise BusConnectError(f"NATS at {url} rejected the connection: authorization violation "
                                      "(check the nats_user/nats_password, nats_token or nkey settings)") from exc
            last_error = str(exc) or type(exc).__name__
            await asyncio.sleep(PORT_POLL_SECONDS)
            continue
        connected[0] = True
        nc.options["allow_reconnect"] = True  # from now on, reconnect forever
        return nc
    raise BusConnectError(f"could not connect to NATS at {url} within "
                          f"{settings.nats_connect_timeout_seconds:g}s: {last_error}")


async def _close_quietly(nc: NATS) -> None:
    try:
        await asyncio.wait_for(nc.close(), 1.0)
    except Exception as exc:  # noqa: BLE001
        log.debug("closing a failed NATS connection: %s", exc)


async def connect_bus(settings: ChassisSettings, *, producer: str) -> Bus:
    """Connect to `settings.nats_url` (waiting for it to come up) and return a Bus for `producer`."""
    reconnects = ReconnectSignal()
    nc = await _connect(settings, producer, reconnects)
    log.info("connected to NATS at %s as %s", nc.connected_url.netloc if nc.connected_url else "?", producer)
    return Bus(nc, producer, reconnects=reconnects)


def _stream_config(stream: StreamDef) -> StreamConfig:
    return StreamConfig(name=stream.name, description=stream.description, subjects=list(stream.subjects),
                        retention=RetentionPolicy(stream.retention), storage=StorageType(stream.storage),
                        duplicate_window=stream.duplicate_window_seconds,
                        max_age=stream.max_age_days * 86400)


def _check_limits(concurrency: int, max_deliver: int, ack_wait: float) -> None:
    if concurrency < 1 or max_deliver < 1 or ack_wait <= 0:
        raise ValueError(f"concurrency ({concurrency}) and max_deliver ({max_deliver}) must be >= 1 "
                         f"and ack_wait ({ack_wait}) > 0")


class Bus:
    """A NATS connection with JetStream, publishing as `producer`; `close()` ends everything."""

    def __init__(self, nc: NATS, producer: str, *, reconnects: ReconnectSignal | None = None) -> None:
        self.nc = nc
        self.js = nc.jetstream()
        self.producer = producer
        self.reconnects = reconnects or ReconnectSignal()
        self._subscriptions: list[Subscription] = []
        self._closed = False

    async def __aenter__(self) -> Bus:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def ensure_streams(self, streams: Iterable[StreamDef] = STREAMS.values()) -> None:
        """Create each stream, or update it where its definition changed (idempotent)."""
        for stream in streams:
            config = _stream_config(stream)
            try:
                await self.js.add_stream(config)
            except nats.js.errors.BadRequestError as exc:
                if exc.err_code != STREAM_EXISTS_DIFFERENTLY:
                    raise
                log.info("updating stream %s to its contract definition", stream.name)
                await self.js.update_stream(config)

    async def publish(self, subject: str, payload: Message, *, event_id: str | None = None,
                      trace_context: dict | None = None) -> PublishResult:
        """Publish a contract event (wrapped in the envelope) to JetStream."""
        envelope = wrap(payload, producer=self.producer, event_id=event_id, trace_context=trace_context)
        return await self.publish_raw(subject, envelope.SerializeToString(), event_id=envelope.event_id)

    async def publish_raw(self, subject: str, data: bytes, *, event_id: str) -> PublishResult:
        """Publish serialized envelope bytes, de-duplicated by `event_id` (the outbox relay's path)."""
        ack = await self.js.publish(subject, data, headers={MSG_ID_HEADER: event_id})
        return PublishResult(stream=ack.stream, seq=ack.seq, duplicate=bool(ack.duplicate))

    async def publish_core(self, subject: str, payload: Message) -> None:
        """Publish on core NATS (not persisted; e.g. training progress)."""
        await self.nc.publish(subject, wrap(payload, producer=self.producer).SerializeToString())

    async def subscribe_core(self, subject: str, handler: Callable[[Event], Awaitable[None]]) -> Subscription:
        """Receive core-NATS events on `subject`; handler errors and undecodable messages are logged."""
        self._check_open()

        async def on_message(msg: Msg) -> None:
            try:
                await handler(unwrap(msg.data))
            except ValueError as exc:
                log.warning("ignoring undecodable message on %s: %s", msg.subject, exc)
            except Exception:  # noqa: BLE001  one bad event must not end the subscription
                log.exception("handler for %s failed", msg.subject)

        sub = await self.nc.subscribe(subject, cb=on_message)

        async def stop(timeout: float) -> None:
            try:
                await asyncio.wait_for(sub.unsubscribe(), timeout)
            except Exception as exc:  # noqa: BLE001
                    log.debug("unsubscribing from %s: %s", subject, exc)

        return self._track(Subscription(f"core {subject}", [stop]))

    async def work_consumer(self, consumer: ConsumerDef, handler: Handler, *, max_deliver: int = 5,
                            ack_wait: float = 30.0, concurrency: int = 4, nak_delay: float = 1.0,
                            on_dead_letter: DeadLetterCallback | None = None) -> Subscription:
        """Handle messages of a durable consumer shared by every replica (each message handled once)."""
        self._check_open()
        _check_limits(concurrency, max_deliver, ack_wait)
        config = ConsumerConfig(name=consumer.durable, durable_name=consumer.durable,
                                deliver_policy=DeliverPolicy.ALL, ack_policy=AckPolicy.EXPLICIT,
                                max_deliver=max_deliver, ack_wait=ack_wait,
                                filter_subjects=list(consumer.filter_subjects))
        rules = DeliveryRules(consumer.durable, max_deliver, ack_wait, nak_delay, concurrency, on_dead_letter)
        loop = ConsumerLoop(self, consumer.stream, config, handler, rules, ephemeral=False)
        return await self._start(f"work consumer {consumer.durable}", [loop])

    async def fanout_consumer(self, subjects: Sequence[str], handler: Handler, *, deliver_new_only: bool = True,
                              concurrency: int = 1, max_deliver: int = 5, ack_wait: float = 30.0,
                              nak_delay: float = 1.0, on_dead_letter: DeadLetterCallback | None = None,
                              name: str | None = None) -> Subscription:
        """Handle every message on `subjects` in this replica (an ephemeral consumer per stream).

        `name` labels metrics and dead letters (default `<service>-fanout`; it must obey the
        naming rule); messages published from now on, or all stored ones when not deliver_new_only.
        """
        self._check_open()
        _check_limits(concurrency, max_deliver, ack_wait)
        label = name or f"{self.producer.split('/')[0]}-fanout"  # producer may be "service/instance"
        rules = DeliveryRules(label, max_deliver, ack_wait, nak_delay, concurrency, on_dead_letter)
        policy = DeliverPolicy.NEW if deliver_new_only else DeliverPolicy.ALL
        loops = []
        for stream, filters in (await self._streams_for(subjects)).items():
            config = ConsumerConfig(name=f"{label}-{uuid.uuid4().hex[:12]}", deliver_policy=policy,
                                    ack_policy=AckPolicy.EXPLICIT, max_deliver=max_deliver, ack_wait=ack_wait,
                                    filter_subjects=filters,
                                    inactive_threshold=max(FANOUT_INACTIVE_SECONDS, 3 * ack_wait))
            loops.append(ConsumerLoop(self, stream, config, handler, rules, ephemeral=True))
        return await self._start(f"fan-out {label} on {', '.join(subjects)}", loops)

    async def _streams_for(self, subjects: Sequence[str]) -> dict[str, list[str]]:
        """Group subjects by the stream the server stores them in."""
        if not subjects:
            raise ValueError("a fan-out consumer needs at least one subject")
        by_stream: dict[str, list[str]] = {}
        for subject in subjects:
            try:
                stream = await self.js.find_stream_name_by_subject(subject)
            except nats.js.errors.NotFoundError:
                raise ValueError(f"no JetStream stream stores {subject!r} (call ensure_streams first)") from None
            by_stream.setdefault(stream, []).append(subject)
        return by_stream

    async def _start(self, description: str, loops: list[ConsumerLoop]) -> Subscription:
        started: list[ConsumerLoop] = []
        try:
            for loop in loops:
                await loop.start()
                started.append(loop)
        except BaseException:
            await asyncio.gather(*(loop.stop(1.0) for loop in started), return_exceptions=True)
            raise
        return self._track(Subscription(description, [loop.stop for loop in loops]))

    def _track(self, subscription: Subscription) -> Subscription:
        self._subscriptions.append(subscription)
        return subscription

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("the bus is closed")

    async def close(self, timeout: float = 5.0) -> None:
        """Stop every consumer (in-flight handlers get `timeout`), then drain the connection."""
        if self._closed:
            return
        self._closed = True
        await asyncio.gather(*(sub.stop(timeout) for sub in self._subscriptions), return_exceptions=True)
        try:
            await asyncio.wait_for(self.nc.drain(), timeout)
        except Exception as exc:  # noqa: BLE001  a stuck drain must not block shutdown
            if not self.nc.is_closed:
                log.warning("draining the NATS connection: %s; closing it", exc or type(exc).__name__)
            await _close_quietly(self.nc)
