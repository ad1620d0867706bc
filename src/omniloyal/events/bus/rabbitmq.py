"""The RabbitMQ bus (pika, blocking connections, one per thread).

Topology, every name after the optional ``prefix``:

* ``omniloyal.events``: a durable topic exchange; the routing key is the event type.
* ``omniloyal.<consumer>``: one durable queue per consumer, bound to the patterns it wants
  (``#`` = everything); its dead-letter exchange is ``omniloyal.<consumer>.dlx`` (fanout) with
  the queue ``omniloyal.<consumer>.dead`` behind it.

Publishing: persistent messages on a channel in confirm mode; ``publish`` returns only when the
broker confirmed every message, otherwise raises ``BusUnavailable`` (with how many were
confirmed), and the dispatcher keeps the rest in the outbox.

Consuming: prefetch = batch size, manual acks after the handler returned. A failed batch is
retried message by message; a failed message is published again to the end of its queue with
its attempt count in the ``x-omniloyal-attempts`` header (then acked), and after ``max_attempts``
rejected without requeue, which the broker routes to the dead letters. A connection lost before
an ack makes the broker deliver again: handlers are idempotent on the event id.

pika's blocking connection is not thread-safe: each thread gets its own (``threading.local``);
the queues and bindings every subscriber needs are declared on each new connection, so the
publisher never routes an event to a queue that does not exist yet.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import pika
from pika.adapters.blocking_connection import BlockingChannel
from pika.exceptions import AMQPConnectionError, AMQPError, ChannelClosedByBroker
from pydantic import ValidationError

from omniloyal.events.bus import DEFAULT_MAX_ATTEMPTS, BusUnavailable, Consumed, Handler
from omniloyal.events.envelope import EventEnvelope

log = logging.getLogger("omniloyal.bus")
# pika logs a traceback at ERROR for every failed connection attempt: during an outage the
# workers retry every few seconds and say so once each (``omniloyal.bus``/``omniloyal.consumers``
# warnings). Configure the "pika" logger yourself to see its messages.
if logging.getLogger("pika").level == logging.NOTSET:
    logging.getLogger("pika").setLevel(logging.CRITICAL)

ATTEMPTS_HEADER = "x-omniloyal-attempts"
# pika's own defaults wait long on a dead broker; a dispatcher should notice within seconds.
_PIKA_DEFAULTS = {
    "socket_timeout": "5",
    "stack_timeout": "10",
    "blocked_connection_timeout": "30",
    "connection_attempts": "1",
    "heartbeat": "30",
}
_ERRORS = (AMQPError, OSError)


def _split_url(url: str) -> tuple[str, dict[str, str]]:
    """The URL for pika (with our timeouts unless given) and our own query parameters."""
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query))
    ours: dict[str, str] = {k: query.pop(k) for k in ("prefix", "max_attempts") if k in query}
    for key, value in _PIKA_DEFAULTS.items():
        query.setdefault(key, value)
    return urlunsplit(parts._replace(query=urlencode(query))), ours


@dataclass
class _Consumer:
    channel: BlockingChannel
    buffer: deque[tuple[Any, Any, bytes]] = field(default_factory=deque)


@dataclass
class _Publisher:
    """A confirm-mode channel whose messages are streamed, then their confirms awaited together
    (one round trip per batch instead of one per message, as pika's blocking publish does)."""

    channel: BlockingChannel
    next_tag: int = 1
    outstanding: set[int] = field(default_factory=set)
    nacked: set[int] = field(default_factory=set)
    ready: bool = False

    def on_select_ok(self, _: Any) -> None:
        self.ready = True

    def on_confirm(self, frame: Any) -> None:
        method = frame.method
        tag = int(method.delivery_tag)
        tags = {t for t in self.outstanding if t <= tag} if method.multiple else {tag}
        self.outstanding -= tags
        if isinstance(method, pika.spec.Basic.Nack):
            self.nacked |= tags


@dataclass
class _State:
    connection: pika.BlockingConnection
    publisher: _Publisher | None = None
    declared: set[str] = field(default_factory=set)
    consumers: dict[str, _Consumer] = field(default_factory=dict)


class RabbitMQBus:
    def __init__(self, url: str, *, prefix: str | None = None, max_attempts: int | None = None) -> None:
        pika_url, ours = _split_url(url)
        self.parameters = pika.URLParameters(pika_url)
        self.prefix = prefix if prefix is not None else ours.get("prefix", "")
        self.max_attempts = max_attempts or int(ours.get("max_attempts", DEFAULT_MAX_ATTEMPTS))
        self.exchange = f"{self.prefix}omniloyal.events"
        self.confirm_timeout = 10.0
        self._subscriptions: dict[str, tuple[str, ...]] = {}
        self._lock = threading.Lock()
        self._local = threading.local()
        self._states: list[_State] = []

    # ------------------------------------------------------------ names

    def queue_name(self, consumer: str) -> str:
        return f"{self.prefix}omniloyal.{consumer}"

    def dead_exchange(self, consumer: str) -> str:
        return f"{self.prefix}omniloyal.{consumer}.dlx"

    def dead_queue(self, consumer: str) -> str:
        return f"{self.prefix}omniloyal.{consumer}.dead"

    # ------------------------------------------------------------ connections

    def _state(self) -> _State:
        state: _State | None = getattr(self._local, "state", None)
        if state is None or not state.connection.is_open:
            if state is not None:
                self._drop(state)
            state = _State(pika.BlockingConnection(self.parameters))
            self._local.state = state
            with self._lock:
                self._states.append(state)
        return state

    def _drop(self, state: _State) -> None:
        with self._lock:
            if state in self._states:
                self._states.remove(state)
        if getattr(self._local, "state", None) is state:
            self._local.state = None
        try:
            if state.connection.is_open:
                state.connection.close()
        except Exception:  # the connection is already gone: nothing to release
            log.debug("closing a broken connection failed", exc_info=True)

    def _reset(self) -> None:
        state: _State | None = getattr(self._local, "state", None)
        if state is not None:
            self._drop(state)

    def _declare(self, channel: BlockingChannel, state: _State) -> None:
        """The exchange and every subscribed consumer's queues, once per connection."""
        if "" not in state.declared:
            channel.exchange_declare(self.exchange, exchange_type="topic", durable=True)
            state.declared.add("")
        with self._lock:
            wanted = [(c, t) for c, t in self._subscriptions.items() if c not in state.declared]
        for consumer, types in wanted:
            dlx, dead, queue = (
                self.dead_exchange(consumer),
                self.dead_queue(consumer),
                self.queue_name(consumer),
            )
            channel.exchange_declare(dlx, exchange_type="fanout", durable=True)
            channel.queue_declare(dead, durable=True)
            channel.queue_bind(dead, dlx)
            channel.queue_declare(queue, durable=True, arguments={"x-dead-letter-exchange": dlx})
            for pattern in types:
                channel.queue_bind(queue, self.exchange, routing_key=pattern)
            state.declared.add(consumer)

    def _publisher(self) -> tuple[_State, _Publisher]:
        state = self._state()
        publisher = state.publisher
        if publisher is None or not publisher.channel.is_open:
            channel = state.connection.channel()
            publisher = _Publisher(channel)
            impl = channel._impl  # the asynchronous channel under the blocking one
            impl.confirm_delivery(ack_nack_callback=publisher.on_confirm, callback=publisher.on_select_ok)
            _wait(state, channel, lambda: publisher.ready, self.confirm_timeout)
            if not publisher.ready:
                raise TimeoutError("RabbitMQ did not enable publisher confirms")
            state.publisher = publisher
        self._declare(publisher.channel, state)
        return state, publisher

    # ------------------------------------------------------------ the protocol

    def subscribe(self, consumer: str, types: Sequence[str] = ("#",)) -> None:
        with self._lock:
            known = self._subscriptions.get(consumer, ())
            self._subscriptions[consumer] = tuple(dict.fromkeys([*known, *types]))
        # New bindings are declared by each connection on its next use.
        with self._lock:
            for state in self._states:
                state.declared.discard(consumer)

    def publish(self, envelopes: Sequence[EventEnvelope]) -> None:
        self.publish_json([(e.id, e.type, e.model_dump_json()) for e in envelopes])

    def publish_json(self, messages: Sequence[tuple[str, str, str]]) -> None:
        """``publish`` for envelopes already serialised, as (id, type, JSON text): the
        dispatcher hands over the outbox's JSON as it is, neither parsed nor dumped again."""
        done = 0
        for attempt in (1, 2):
            try:
                done += self._publish_confirmed(messages[done:])
                return
            except _Unconfirmed as exc:
                done += exc.published
                self._reset()
                cause = exc.__cause__ or exc
                # A connection idle past its heartbeat is found closed on first use: retry once.
                if attempt == 2 or not _is_connection_error(cause):
                    raise BusUnavailable(f"RabbitMQ did not confirm: {cause!r}", published=done) from cause

    def _publish_confirmed(self, messages: Sequence[tuple[str, str, str]]) -> int:
        """Streams the messages, then waits for the broker to confirm all of them."""
        tags: list[int] = []
        publisher: _Publisher | None = None
        try:
            state, publisher = self._publisher()
            impl = publisher.channel._impl
            for event_id, event_type, body in messages:
                impl.basic_publish(
                    self.exchange,
                    event_type,
                    body.encode(),
                    pika.BasicProperties(
                        content_type="application/json",
                        delivery_mode=pika.DeliveryMode.Persistent,
                        message_id=event_id,
                        type=event_type,
                    ),
                )
                tags.append(publisher.next_tag)
                publisher.outstanding.add(publisher.next_tag)
                publisher.next_tag += 1
            _wait(state, publisher.channel, lambda: not publisher.outstanding, self.confirm_timeout)
            if publisher.outstanding:
                raise TimeoutError(f"{len(publisher.outstanding)} messages not confirmed in time")
            if publisher.nacked:
                raise _Unconfirmed(_confirmed_prefix(tags, publisher), "the broker refused (nack) messages")
            return len(tags)
        except (*_ERRORS, TimeoutError) as exc:
            confirmed = _confirmed_prefix(tags, publisher) if publisher is not None else 0
            raise _Unconfirmed(confirmed, str(exc)) from exc

    def _consumer(self, consumer: str, max_batch: int) -> tuple[_State, _Consumer]:
        with self._lock:
            if consumer not in self._subscriptions:
                raise KeyError(f"consumer {consumer!r} is not subscribed")
        state = self._state()
        entry = state.consumers.get(consumer)
        if entry is None or not entry.channel.is_open:
            channel = state.connection.channel()
            channel.confirm_delivery()  # retries are published again on this channel
            self._declare(channel, state)
            channel.basic_qos(prefetch_count=max_batch)
            entry = _Consumer(channel)

            def on_message(
                _: Any, method: Any, properties: Any, body: bytes, buffer: Any = entry.buffer
            ) -> None:
                buffer.append((method, properties, body))

            channel.basic_consume(self.queue_name(consumer), on_message)
            state.consumers[consumer] = entry
        else:
            self._declare(entry.channel, state)
        return state, entry

    def consume(
        self,
        consumer: str,
        handler: Handler,
        *,
        max_batch: int = 100,
        timeout: float = 1.0,
        linger: float = 0.0,
    ) -> Consumed:
        try:
            state, entry = self._consumer(consumer, max_batch)
            deadline = time.monotonic() + timeout
            while not entry.buffer:
                left = deadline - time.monotonic()
                if left <= 0:
                    return Consumed()
                state.connection.process_data_events(time_limit=left)
            state.connection.process_data_events(time_limit=0)
            filled = time.monotonic() + linger
            while len(entry.buffer) < max_batch:
                left = filled - time.monotonic()
                if left <= 0:
                    break
                state.connection.process_data_events(time_limit=min(left, 0.05))
            batch = [entry.buffer.popleft() for _ in range(min(max_batch, len(entry.buffer)))]
        except _ERRORS as exc:
            self._reset()
            raise BusUnavailable(f"RabbitMQ unavailable: {exc!r}") from exc
        channel = entry.channel
        try:
            messages: list[tuple[Any, Any, EventEnvelope]] = []
            for method, properties, body in batch:
                try:
                    messages.append((method, properties, EventEnvelope.model_validate_json(body)))
                except ValidationError:
                    log.error("consumer %s: not an event envelope, dead-lettered: %r", consumer, body[:200])
                    channel.basic_nack(method.delivery_tag, requeue=False)
            if not messages:
                return Consumed(len(batch), len(batch))
            try:
                handler([m[2] for m in messages])
                channel.basic_ack(messages[-1][0].delivery_tag, multiple=True)
                return Consumed(len(batch), len(batch) - len(messages))
            except Exception:
                log.exception("consumer %s failed on a batch of %d", consumer, len(messages))
            failures = messages if len(messages) == 1 else []
            if len(messages) > 1:  # find the culprits: the others are handled and acked
                for message in messages:
                    try:
                        handler([message[2]])
                        channel.basic_ack(message[0].delivery_tag)
                    except Exception:
                        log.exception("consumer %s failed on event %s", consumer, message[2].id)
                        failures.append(message)
            for method, properties, envelope in failures:
                self._retry(channel, consumer, method, properties, envelope)
            return Consumed(len(batch), len(batch) - len(messages) + len(failures))
        except _ERRORS as exc:
            # The handler's work is done; the broker delivers the unacked messages again and the
            # idempotent handler skips them.
            self._reset()
            raise BusUnavailable(f"RabbitMQ unavailable: {exc!r}") from exc

    def _retry(
        self, channel: BlockingChannel, consumer: str, method: Any, properties: Any, envelope: EventEnvelope
    ) -> None:
        headers = dict(properties.headers or {})
        attempts = int(headers.get(ATTEMPTS_HEADER, 0)) + 1
        if attempts >= self.max_attempts:
            log.error(
                "consumer %s: event %s dead-lettered after %d attempts", consumer, envelope.id, attempts
            )
            channel.basic_nack(method.delivery_tag, requeue=False)
            return
        headers[ATTEMPTS_HEADER] = attempts
        channel.basic_publish(
            "",
            self.queue_name(consumer),
            envelope.model_dump_json().encode(),
            pika.BasicProperties(
                content_type="application/json",
                delivery_mode=pika.DeliveryMode.Persistent,
                message_id=envelope.id,
                type=envelope.type,
                headers=headers,
            ),
        )
        channel.basic_ack(method.delivery_tag)

    def _count(self, queue: str) -> int:
        try:
            state = self._state()
            channel = state.connection.channel()
            try:
                return int(channel.queue_declare(queue, passive=True).method.message_count)
            finally:
                if channel.is_open:
                    channel.close()
        except ChannelClosedByBroker:
            return 0  # no such queue (yet)
        except _ERRORS as exc:
            self._reset()
            raise BusUnavailable(f"RabbitMQ unavailable: {exc!r}") from exc

    def pending(self, consumer: str) -> int:
        return self._count(self.queue_name(consumer))

    def dead_letters(self, consumer: str) -> int:
        return self._count(self.dead_queue(consumer))

    def replay_dead_letters(self, consumer: str) -> int:
        moved = 0
        try:
            state = self._state()
            channel = state.connection.channel()
            channel.confirm_delivery()
            try:
                while True:
                    method, properties, body = channel.basic_get(self.dead_queue(consumer))
                    if method is None:
                        return moved
                    headers = {k: v for k, v in (properties.headers or {}).items() if k != ATTEMPTS_HEADER}
                    headers.pop("x-death", None)
                    channel.basic_publish(
                        "",
                        self.queue_name(consumer),
                        body,
                        pika.BasicProperties(
                            content_type=properties.content_type,
                            delivery_mode=pika.DeliveryMode.Persistent,
                            message_id=properties.message_id,
                            type=properties.type,
                            headers=headers,
                        ),
                    )
                    channel.basic_ack(method.delivery_tag)
                    moved += 1
            finally:
                if channel.is_open:
                    channel.close()
        except ChannelClosedByBroker:
            return moved
        except _ERRORS as exc:
            self._reset()
            raise BusUnavailable(f"RabbitMQ unavailable: {exc!r}") from exc

    def close(self) -> None:
        """Closes every connection this bus opened (call it once the threads using them stopped)."""
        with self._lock:
            states = list(self._states)
        for state in states:
            self._drop(state)

    def destroy(self, consumers: Sequence[str] | None = None) -> None:
        """Deletes the exchange and the consumers' queues and dead letters (tests, teardown)."""
        with self._lock:
            names = list(consumers if consumers is not None else self._subscriptions)
        try:
            channel = self._state().connection.channel()
            for consumer in names:
                channel.queue_delete(self.queue_name(consumer))
                channel.queue_delete(self.dead_queue(consumer))
                channel.exchange_delete(self.dead_exchange(consumer))
            channel.exchange_delete(self.exchange)
            channel.close()
        finally:
            self.close()


def _wait(state: _State, channel: BlockingChannel, done: Callable[[], bool], timeout: float) -> None:
    """Processes I/O until ``done()`` or ``timeout`` seconds passed; raises if the connection
    or channel closed meanwhile. (pika's ``process_data_events`` would sleep the whole time
    limit: confirms arrive on the asynchronous channel, which it does not watch.)"""
    expired: list[bool] = []
    timer = state.connection.call_later(timeout, lambda: expired.append(True))
    try:
        channel._flush_output(lambda: done() or bool(expired))
    finally:
        if state.connection.is_open:
            state.connection.remove_timeout(timer)
    if not done() and (state.connection.is_closed or channel.is_closed):
        raise AMQPConnectionError("the connection closed while waiting for the broker")


class _Unconfirmed(Exception):
    def __init__(self, published: int, message: str) -> None:
        super().__init__(message)
        self.published = published


def _confirmed_prefix(tags: list[int], publisher: _Publisher) -> int:
    """How many of the batch, from its start, the broker confirmed (those need no resend)."""
    count = 0
    for tag in tags:
        if tag in publisher.outstanding or tag in publisher.nacked:
            break
        count += 1
    return count


def _is_connection_error(exc: BaseException) -> bool:
    from pika.exceptions import ConnectionWrongStateError

    return isinstance(exc, AMQPConnectionError | ConnectionWrongStateError | OSError)
