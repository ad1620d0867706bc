"""The event bus: fan-out of envelopes to named consumers, at least once.

Two backends behind one protocol, chosen by ``OMNILOYAL_BUS_URL``:

* ``memory://`` (default): thread-safe in-process queues, one per consumer. Nothing to run;
  messages in flight are lost with the process (the outbox already marked them published),
  so production uses RabbitMQ.
* ``amqp://user:pass@host:5672/vhost?prefix=...``: RabbitMQ. A topic exchange
  ``omniloyal.events`` (routing key = event type), one durable queue per consumer
  (``omniloyal.<consumer>``) bound to the types it wants, a dead-letter exchange and queue
  per consumer, persistent messages, publisher confirms, manual acks after the handler.

Semantics shared by both: every consumer subscribed to a type receives every event of that
type (fan-out); a delivery may repeat (after a crash, a lost ack, a retry), so handlers are
idempotent on the envelope id (``events.consumers.idempotent``); a message whose handler keeps
failing goes to the consumer's dead letters after ``max_attempts`` deliveries.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple, Protocol

from omniloyal.events.envelope import EventEnvelope

Handler = Callable[[list[EventEnvelope]], None]

DEFAULT_MAX_ATTEMPTS = 5


class Consumed(NamedTuple):
    """What one ``consume`` call did: messages received, and how many of them failed (retried
    later or, after ``max_attempts``, dead-lettered)."""

    received: int = 0
    failed: int = 0


class BusUnavailable(Exception):
    """The bus could not take (or confirm) the messages; ``published`` is how many of the
    batch, in order, were confirmed before it failed (those need not be sent again)."""

    def __init__(self, message: str, published: int = 0) -> None:
        super().__init__(message)
        self.published = published


class Bus(Protocol):
    """What the dispatcher and the consumer workers need from a bus."""

    def publish(self, envelopes: Sequence[EventEnvelope]) -> None:
        """Returns once the bus has durably taken every envelope; raises ``BusUnavailable``.

        A bus that carries JSON may also offer ``publish_json(messages)``, the same for
        envelopes already serialised as ``(id, type, JSON text)``: the dispatcher then hands it
        the outbox's payloads as they are (RabbitMQ does; the in-process bus takes envelopes)."""

    def subscribe(self, consumer: str, types: Sequence[str] = ("#",)) -> None:
        """Creates the consumer's queue (idempotent) bound to ``types`` (topic patterns:
        ``*`` one word, ``#`` any number of words; ``#`` alone is everything)."""

    def consume(
        self,
        consumer: str,
        handler: Handler,
        *,
        max_batch: int = 100,
        timeout: float = 1.0,
        linger: float = 0.0,
    ) -> Consumed:
        """Waits up to ``timeout`` seconds for messages, hands up to ``max_batch`` of them to
        ``handler`` at once and acknowledges them once it returned. Once a first message is
        there, waits up to ``linger`` seconds more for the batch to fill: a consumer with a fixed
        cost per batch (a warehouse transaction) then pays it once for many messages at low rates.
        A failing batch is retried message by message; a message failing ``max_attempts`` times
        goes to dead letters. Raises ``BusUnavailable`` when the bus is unreachable."""

    def pending(self, consumer: str) -> int:
        """Messages waiting in the consumer's queue (not counting a batch being handled)."""

    def dead_letters(self, consumer: str) -> int:
        """How many messages sit in the consumer's dead letters."""

    def replay_dead_letters(self, consumer: str) -> int:
        """Moves the consumer's dead letters back to its queue; returns how many."""

    def close(self) -> None:
        """Releases connections (the queues and their messages stay)."""


def topic_matches(pattern: str, routing_key: str) -> bool:
    """AMQP topic matching: words separated by dots, ``*`` one word, ``#`` zero or more words."""

    def match(p: list[str], k: list[str]) -> bool:
        if not p:
            return not k
        head, rest = p[0], p[1:]
        if head == "#":
            return any(match(rest, k[i:]) for i in range(len(k) + 1))
        if not k:
            return False
        return (head == "*" or head == k[0]) and match(rest, k[1:])

    return match(pattern.split("."), routing_key.split("."))


def bus_from_url(url: str, *, prefix: str | None = None, max_attempts: int | None = None) -> Bus:
    """``memory://`` or ``amqp://...`` (``amqps://`` for TLS). Query parameters of ours:
    ``prefix`` (put before every exchange and queue name: several deployments or test runs on
    one broker) and ``max_attempts``; the others go to pika (``heartbeat``, ``socket_timeout``...)."""
    scheme = url.split(":", 1)[0].lower()
    if scheme == "memory":
        from omniloyal.events.bus.memory import MemoryBus

        return MemoryBus(max_attempts=max_attempts or DEFAULT_MAX_ATTEMPTS)
    if scheme in ("amqp", "amqps"):
        from omniloyal.events.bus.rabbitmq import RabbitMQBus

        return RabbitMQBus(url, prefix=prefix, max_attempts=max_attempts)
    raise ValueError(f"Unsupported bus URL {url!r}: use memory:// or amqp://user:password@host:5672/")


__all__ = [
    "DEFAULT_MAX_ATTEMPTS",
    "Bus",
    "BusUnavailable",
    "Consumed",
    "Handler",
    "bus_from_url",
    "topic_matches",
]
