"""The queue interface: work (edit ids) for workers, and news (events) for API processes.

Two implementations share it: Redis Streams with a consumer group for real
deployments, and an in-process queue for the embedded single-machine default.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any, ClassVar


class QueueUnavailable(Exception):
    """The queue server cannot be reached."""


@dataclass(frozen=True)
class Delivery:
    message_id: str
    edit_id: str
    # How many times this message has been handed to a worker, this time included.
    deliveries: int


class Subscription(abc.ABC):
    @abc.abstractmethod
    def get(self, timeout: float) -> dict[str, Any] | None:
        """The next event's wire form (see ``app.queue.events``), or None after ``timeout`` seconds."""

    @abc.abstractmethod
    def close(self) -> None: ...


class EditQueue(abc.ABC):
    # Shown by /ready.
    kind: ClassVar[str]
    # Whether messages outlive the process that holds the queue object. A queue that does
    # not starts empty after a restart, so the edits waiting in the database must be re-sent.
    durable: ClassVar[bool]

    @abc.abstractmethod
    def enqueue(self, edit_id: str) -> str:
        """Add work; returns the message id. Raises QueueUnavailable."""

    @abc.abstractmethod
    def take(self, consumer: str, block_ms: int) -> Delivery | None:
        """A message left unacknowledged too long by another consumer, else a new one, else None."""

    @abc.abstractmethod
    def touch(self, delivery: Delivery, consumer: str) -> None:
        """Tell the queue the message is still being worked on, so it is not reclaimed meanwhile."""

    @abc.abstractmethod
    def ack(self, delivery: Delivery) -> None:
        """Done with a message; call only after the outcome is committed to the database."""

    @abc.abstractmethod
    def publish(self, event: dict[str, Any]) -> None:
        """Tell every API process that the set of live edits changed. Best effort.

        ``event`` is an event's wire form, e.g. ``EditChanged(...).to_dict()``.
        """

    @abc.abstractmethod
    def subscribe(self) -> Subscription: ...

    @abc.abstractmethod
    def ping(self) -> None:
        """Raise QueueUnavailable when the queue cannot be used."""

    @abc.abstractmethod
    def pending(self) -> int:
        """Messages delivered but not yet acknowledged."""

    @abc.abstractmethod
    def queued_edit_ids(self) -> set[str]:
        """Edit ids that have a message in the queue, delivered or not."""

    def claim_sweep(self, consumer: str, ttl_ms: int) -> bool:
        """True for one caller per ``ttl_ms`` among all workers sharing the queue: the one that
        should look for edits the database holds but the queue lost."""
        return True

    def release(self, consumer: str) -> int:
        """``consumer`` is gone for good (its process died): its messages may be taken again at
        once, each delivery counted. Returns how many. Queues that reclaim idle messages by
        themselves (Redis) leave them to that and return 0."""
        return 0

    def close(self) -> None:  # noqa: B027  (optional: only queues holding connections override it)
        pass
