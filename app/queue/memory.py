"""An in-process queue with the same delivery rules as the Redis Streams one.

Used by the embedded default: the worker is a thread of the API process, so the
queue only has to survive as long as that process (queued edits are re-enqueued
from the database at start-up).
"""

from __future__ import annotations

import collections
import itertools
import queue as stdlib_queue
import threading
import time
from typing import Any

from app.queue.base import Delivery, EditQueue, Subscription


class _Pending:
    __slots__ = ("edit_id", "consumer", "since", "deliveries")

    def __init__(self, edit_id: str, consumer: str, deliveries: int):
        self.edit_id = edit_id
        self.consumer = consumer
        self.since = time.monotonic()
        self.deliveries = deliveries


class _MemorySubscription(Subscription):
    def __init__(self, owner: MemoryQueue):
        self._owner = owner
        self._events: stdlib_queue.Queue[dict[str, Any]] = stdlib_queue.Queue()

    def get(self, timeout: float) -> dict[str, Any] | None:
        try:
            return self._events.get(timeout=timeout)
        except stdlib_queue.Empty:
            return None

    def close(self) -> None:
        self._owner._unsubscribe(self)


class MemoryQueue(EditQueue):
    kind = "memory"
    durable = False

    def __init__(self, claim_idle_ms: int = 60_000):
        self.claim_idle_s = claim_idle_ms / 1000
        self._cond = threading.Condition()
        self._new: collections.deque[tuple[str, str]] = collections.deque()
        self._pending: dict[str, _Pending] = {}
        self._ids = itertools.count(1)
        self._subscribers: list[_MemorySubscription] = []

    def enqueue(self, edit_id: str) -> str:
        with self._cond:
            message_id = f"{next(self._ids)}-0"
            self._new.append((message_id, edit_id))
            self._cond.notify_all()
        return message_id

    def take(self, consumer: str, block_ms: int) -> Delivery | None:
        deadline = time.monotonic() + block_ms / 1000
        with self._cond:
            while True:
                now = time.monotonic()
                for message_id, p in self._pending.items():
                    if now - p.since >= self.claim_idle_s:
                        p.consumer, p.since, p.deliveries = consumer, now, p.deliveries + 1
                        return Delivery(message_id, p.edit_id, p.deliveries)
                if self._new:
                    message_id, edit_id = self._new.popleft()
                    self._pending[message_id] = _Pending(edit_id, consumer, 1)
                    return Delivery(message_id, edit_id, 1)
                remaining = deadline - now
                if remaining <= 0:
                    return None
                # Wake for new work, or when the oldest pending message becomes claimable.
                wait = remaining
                if self._pending:
                    oldest = min(p.since for p in self._pending.values())
                    wait = min(wait, max(0.0, oldest + self.claim_idle_s - now) + 0.001)
                self._cond.wait(wait)

    def touch(self, delivery: Delivery, consumer: str) -> None:
        with self._cond:
            p = self._pending.get(delivery.message_id)
            if p is not None and p.consumer == consumer:
                p.since = time.monotonic()

    def ack(self, delivery: Delivery) -> None:
        with self._cond:
            self._pending.pop(delivery.message_id, None)

    def release(self, consumer: str) -> int:
        with self._cond:
            released = 0
            for p in self._pending.values():
                if p.consumer == consumer:
                    p.since = float("-inf")
                    released += 1
            if released:
                self._cond.notify_all()
            return released

    def publish(self, event: dict[str, Any]) -> None:
        with self._cond:
            subscribers = list(self._subscribers)
        for sub in subscribers:
            sub._events.put(dict(event))

    def subscribe(self) -> Subscription:
        sub = _MemorySubscription(self)
        with self._cond:
            self._subscribers.append(sub)
        return sub

    def _unsubscribe(self, sub: _MemorySubscription) -> None:
        with self._cond:
            if sub in self._subscribers:
                self._subscribers.remove(sub)

    def ping(self) -> None:
        pass

    def pending(self) -> int:
        with self._cond:
            return len(self._pending)

    def queued_edit_ids(self) -> set[str]:
        with self._cond:
            return {edit_id for _, edit_id in self._new} | {p.edit_id for p in self._pending.values()}
