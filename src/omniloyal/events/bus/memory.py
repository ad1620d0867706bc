"""The in-process bus: one thread-safe queue per consumer, the same semantics as RabbitMQ.

Every subscribed consumer gets its own copy of each matching event (fan-out); a batch is
removed from the queue when handed out and put back (at the tail, one attempt more) for each
message its handler failed on; after ``max_attempts`` failures a message goes to dead letters.
A full queue refuses the whole batch (``BusUnavailable``): the dispatcher then leaves the events
in the outbox and retries, so a slow consumer applies back-pressure instead of eating memory.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from omniloyal.events.bus import DEFAULT_MAX_ATTEMPTS, BusUnavailable, Consumed, Handler, topic_matches
from omniloyal.events.envelope import EventEnvelope

log = logging.getLogger("omniloyal.bus")

DEFAULT_MAX_QUEUE = 200_000


@dataclass
class _Message:
    """A message handed out before and failed: the envelope and its failed deliveries. A
    message never delivered yet sits in the queue as the bare envelope (no object per event
    on the way in)."""

    envelope: EventEnvelope
    attempts: int = 0


def _message(item: EventEnvelope | _Message) -> _Message:
    return item if isinstance(item, _Message) else _Message(item)


def _envelope(item: EventEnvelope | _Message) -> EventEnvelope:
    return item.envelope if isinstance(item, _Message) else item


@dataclass
class _Queue:
    patterns: set[str]
    items: deque[EventEnvelope | _Message] = field(default_factory=deque)
    dead: list[_Message] = field(default_factory=list)
    in_flight: int = 0
    # Routing decisions by event type (a handful of types; matching topics costs more than the
    # rest of publishing). Emptied when the patterns change.
    routes: dict[str, bool] = field(default_factory=dict)

    def wants(self, event_type: str) -> bool:
        wanted = self.routes.get(event_type)
        if wanted is None:
            wanted = self.routes[event_type] = any(topic_matches(p, event_type) for p in self.patterns)
        return wanted

    def wanted(self, envelopes: Sequence[EventEnvelope]) -> Sequence[EventEnvelope]:
        """The envelopes of the types this queue is bound to (all of them, usually)."""
        types = {e.type for e in envelopes}
        if all(self.wants(t) for t in types):
            return envelopes
        return [e for e in envelopes if self.wants(e.type)]


class MemoryBus:
    def __init__(
        self, *, max_attempts: int = DEFAULT_MAX_ATTEMPTS, max_queue: int = DEFAULT_MAX_QUEUE
    ) -> None:
        self.max_attempts = max_attempts
        self.max_queue = max_queue
        self._cond = threading.Condition()
        self._queues: dict[str, _Queue] = {}
        self._closed = False

    def subscribe(self, consumer: str, types: Sequence[str] = ("#",)) -> None:
        with self._cond:
            queue = self._queues.get(consumer)
            if queue is None:
                self._queues[consumer] = _Queue(set(types))
            else:
                queue.patterns.update(types)
                queue.routes.clear()

    def publish(self, envelopes: Sequence[EventEnvelope]) -> None:
        if not envelopes:
            return
        with self._cond:
            if self._closed:
                raise BusUnavailable("the in-process bus is closed")
            routed = [(q, q.wanted(envelopes)) for q in self._queues.values()]
            for queue, items in routed:
                if items and len(queue.items) + len(items) > self.max_queue:
                    raise BusUnavailable(f"a consumer queue is full ({len(queue.items)} waiting)")
            for queue, items in routed:
                queue.items.extend(items)
            self._cond.notify_all()

    def _queue(self, consumer: str) -> _Queue:
        queue = self._queues.get(consumer)
        if queue is None:
            raise KeyError(f"consumer {consumer!r} is not subscribed")
        return queue

    def consume(
        self,
        consumer: str,
        handler: Handler,
        *,
        max_batch: int = 100,
        timeout: float = 1.0,
        linger: float = 0.0,
    ) -> Consumed:
        deadline = time.monotonic() + timeout
        with self._cond:
            queue = self._queue(consumer)
            while not queue.items and not self._closed:
                left = deadline - time.monotonic()
                if left <= 0:
                    return Consumed()
                self._cond.wait(left)
            filled = time.monotonic() + linger
            while len(queue.items) < max_batch and not self._closed:
                left = filled - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            if self._closed:
                raise BusUnavailable("the in-process bus is closed")
            batch = [queue.items.popleft() for _ in range(min(max_batch, len(queue.items)))]
            queue.in_flight += len(batch)
        try:
            envelopes = [_envelope(m) for m in batch]
            try:
                handler(envelopes)
                return Consumed(len(batch))
            except Exception:
                log.exception("consumer %s failed on a batch of %d", consumer, len(batch))
            failures = batch if len(batch) == 1 else []
            if len(batch) > 1:  # find the culprits: the others are handled
                for message, envelope in zip(batch, envelopes, strict=True):
                    try:
                        handler([envelope])
                    except Exception:
                        log.exception("consumer %s failed on event %s", consumer, envelope.id)
                        failures.append(message)
            for message in failures:
                self._failed(queue, _message(message))
            return Consumed(len(batch), len(failures))
        finally:
            with self._cond:
                queue.in_flight -= len(batch)
                self._cond.notify_all()

    def _failed(self, queue: _Queue, message: _Message) -> None:
        with self._cond:
            message.attempts += 1
            if message.attempts >= self.max_attempts:
                queue.dead.append(message)
            else:
                queue.items.append(message)

    def pending(self, consumer: str) -> int:
        with self._cond:
            queue = self._queue(consumer)
            return len(queue.items) + queue.in_flight

    def dead_letters(self, consumer: str) -> int:
        with self._cond:
            return len(self._queue(consumer).dead)

    def replay_dead_letters(self, consumer: str) -> int:
        with self._cond:
            queue = self._queue(consumer)
            moved = [m.envelope for m in queue.dead]
            queue.dead.clear()
            queue.items.extend(moved)
            self._cond.notify_all()
            return len(moved)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
