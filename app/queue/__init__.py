"""Work and news between API processes and workers."""

from __future__ import annotations

from app.queue.base import Delivery, EditQueue, QueueUnavailable, Subscription
from app.queue.events import EditChanged
from app.queue.memory import MemoryQueue
from app.queue.redis_streams import RedisQueue


def make_queue(redis_url: str | None, prefix: str = "scen:", claim_idle_ms: int = 60_000) -> EditQueue:
    if redis_url is None:
        return MemoryQueue(claim_idle_ms=claim_idle_ms)
    return RedisQueue(redis_url, prefix=prefix, claim_idle_ms=claim_idle_ms)


__all__ = [
    "Delivery", "EditChanged", "EditQueue", "MemoryQueue", "QueueUnavailable", "RedisQueue", "Subscription",
    "make_queue",
]
