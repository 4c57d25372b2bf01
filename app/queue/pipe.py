"""A queue used from another process through a ``multiprocessing`` connection.

The embedded worker process of ``scen serve`` holds no queue of its own: every call it makes
(take, touch, ack, publish, ...) is answered by the API process's queue, through
``QueueServer`` there. The messages and their delivery counts thus stay in the API process and
outlive a worker process that crashes, and the events the worker publishes reach the API's
live-sync thread exactly as from a worker thread.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

from app.queue.base import Delivery, EditQueue, QueueUnavailable, Subscription

log = logging.getLogger(__name__)

# What a worker process may ask of the API's queue.
QUEUE_CALLS = frozenset({"enqueue", "take", "touch", "ack", "publish", "ping", "pending", "queued_edit_ids",
                         "claim_sweep"})


class PipeQueue(EditQueue):
    """The worker process's side: each call is one request and one answer on ``conn``."""

    kind = "pipe"
    # Messages live in the API process, which outlives this one.
    durable = True

    def __init__(self, conn: Connection, on_lost: Callable[[], None] | None = None):
        self._conn = conn
        # The worker loop and its heartbeat thread share the one connection.
        self._lock = threading.Lock()
        # Called once the API process is gone: nothing is left to work for.
        self._on_lost = on_lost
        self._lost = False

    def call(self, name: str, *args: Any) -> Any:
        with self._lock:
            if self._lost:
                raise QueueUnavailable("the API process is gone")
            try:
                self._conn.send((name, args))
                status, value = self._conn.recv()
            except (EOFError, OSError) as exc:
                self._lost = True
                if self._on_lost is not None:
                    self._on_lost()
                raise QueueUnavailable(f"the API process is gone ({type(exc).__name__})") from exc
        if status == "error":
            raise QueueUnavailable(value)
        return value

    def enqueue(self, edit_id: str) -> str:
        return str(self.call("enqueue", edit_id))

    def take(self, consumer: str, block_ms: int) -> Delivery | None:
        delivery = self.call("take", consumer, block_ms)
        return delivery if isinstance(delivery, Delivery) else None

    def touch(self, delivery: Delivery, consumer: str) -> None:
        self.call("touch", delivery, consumer)

    def ack(self, delivery: Delivery) -> None:
        self.call("ack", delivery)

    def publish(self, event: dict[str, Any]) -> None:
        self.call("publish", event)

    def subscribe(self) -> Subscription:
        raise QueueUnavailable("a worker process does not follow events")

    def ping(self) -> None:
        self.call("ping")

    def pending(self) -> int:
        return int(self.call("pending"))

    def queued_edit_ids(self) -> set[str]:
        return set(self.call("queued_edit_ids"))

    def claim_sweep(self, consumer: str, ttl_ms: int) -> bool:
        return bool(self.call("claim_sweep", consumer, ttl_ms))

    def close(self) -> None:
        self._conn.close()


class QueueServer:
    """The API process's side: answers one worker process's calls with ``queue``.

    ``extra``: further calls by name (the worker's metrics, say), answered the same way.
    """

    def __init__(self, queue: EditQueue, extra: dict[str, Callable[..., Any]] | None = None):
        self.queue = queue
        self.extra = dict(extra or {})

    def answer(self, conn: Connection, timeout: float) -> bool:
        """Answer the next call if one comes within ``timeout`` seconds. False once the other end
        has closed (the worker process ended); raises nothing else."""
        try:
            if not conn.poll(timeout):
                return True
            name, args = conn.recv()
        except (EOFError, OSError):
            return False
        try:
            reply: tuple[str, Any] = ("ok", self._call(name, args))
        except Exception as exc:
            # The worker sees a queue it cannot use, as with Redis down, and retries.
            reply = ("error", f"{type(exc).__name__}: {exc}")
        try:
            conn.send(reply)
        except (EOFError, OSError):
            return False
        return True

    def _call(self, name: str, args: tuple[Any, ...]) -> Any:
        if name in QUEUE_CALLS:
            return getattr(self.queue, name)(*args)
        handler = self.extra.get(name)
        if handler is None:
            raise ValueError(f"unknown call {name!r}")
        return handler(*args)
