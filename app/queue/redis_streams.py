"""Redis Streams queue: one stream of edit ids, one consumer group of workers, pub/sub for events."""

from __future__ import annotations

import json
import logging
from typing import Any, cast

import redis
from redis import exceptions as rx

from app.queue.base import Delivery, EditQueue, QueueUnavailable, Subscription

log = logging.getLogger(__name__)

GROUP = "workers"
_DOWN = (rx.ConnectionError, rx.TimeoutError)

# Stream entries as this client returns them: it decodes replies (decode_responses=True),
# which redis-py's annotations (bytes | str) cannot express; hence the casts below.
_Entry = tuple[str, dict[str, str]]


class _RedisSubscription(Subscription):
    def __init__(self, client: redis.Redis, channel: str):
        self._pubsub = client.pubsub(ignore_subscribe_messages=True)
        self._pubsub.subscribe(channel)

    def get(self, timeout: float) -> dict[str, Any] | None:
        try:
            message = self._pubsub.get_message(timeout=timeout)
        except _DOWN as exc:
            raise QueueUnavailable(str(exc)) from exc
        if message is None or message.get("type") != "message":
            return None
        try:
            event = json.loads(message["data"])
        except (TypeError, ValueError):
            event = None
        if not isinstance(event, dict):
            log.warning("ignoring malformed event %r", message["data"])
            return None
        return event

    def close(self) -> None:
        try:
            self._pubsub.close()
        except _DOWN:
            pass


class RedisQueue(EditQueue):
    kind = "redis"
    durable = True

    def __init__(self, url: str, prefix: str = "scen:", claim_idle_ms: int = 60_000):
        self.client = redis.Redis.from_url(url, decode_responses=True, health_check_interval=30)
        self.stream = f"{prefix}edits"
        self.channel = f"{prefix}events"
        self.sweep_key = f"{prefix}sweep"
        self.claim_idle_ms = claim_idle_ms
        self._group_ready = False

    def _ensure_group(self) -> None:
        if self._group_ready:
            return
        try:
            # From "0": messages added before any worker existed are still delivered.
            self.client.xgroup_create(self.stream, GROUP, id="0", mkstream=True)
        except rx.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        self._group_ready = True

    def enqueue(self, edit_id: str) -> str:
        try:
            self._ensure_group()
            return cast(str, self.client.xadd(self.stream, {"edit_id": edit_id}))
        except _DOWN as exc:
            raise QueueUnavailable(str(exc)) from exc

    def take(self, consumer: str, block_ms: int) -> Delivery | None:
        try:
            self._ensure_group()
            return self._reclaim(consumer) or self._read_new(consumer, block_ms)
        except rx.ResponseError as exc:
            if "NOGROUP" in str(exc):  # the stream was deleted under us
                self._group_ready = False
                return None
            raise
        except _DOWN as exc:
            raise QueueUnavailable(str(exc)) from exc

    def _reclaim(self, consumer: str) -> Delivery | None:
        cursor = "0-0"
        # COUNT 1: every message claimed counts a delivery, so claim only what we will work on.
        for _ in range(100):
            cursor, messages, _deleted = self.client.xautoclaim(
                self.stream, GROUP, consumer, min_idle_time=self.claim_idle_ms, start_id=cursor, count=1
            )
            for message_id, fields in messages:
                if not fields or "edit_id" not in fields:
                    self.client.xack(self.stream, GROUP, message_id)
                    continue
                return Delivery(message_id, fields["edit_id"], self._times_delivered(message_id))
            if cursor == "0-0":
                return None
        return None

    def _times_delivered(self, message_id: str) -> int:
        entries = self.client.xpending_range(self.stream, GROUP, min=message_id, max=message_id, count=1)
        return int(entries[0]["times_delivered"]) if entries else 1

    def _read_new(self, consumer: str, block_ms: int) -> Delivery | None:
        response = cast(
            list[tuple[str, list[_Entry]]] | None,
            self.client.xreadgroup(GROUP, consumer, {self.stream: ">"}, count=1, block=block_ms or None),
        )
        for _stream, messages in response or []:
            for message_id, fields in messages:
                return Delivery(message_id, fields.get("edit_id", ""), 1)
        return None

    def touch(self, delivery: Delivery, consumer: str) -> None:
        try:
            # JUSTID resets the idle time without counting another delivery.
            self.client.xclaim(self.stream, GROUP, consumer, min_idle_time=0,
                               message_ids=[delivery.message_id], justid=True)
        except _DOWN as exc:
            raise QueueUnavailable(str(exc)) from exc

    def ack(self, delivery: Delivery) -> None:
        try:
            with self.client.pipeline(transaction=True) as pipe:
                pipe.xack(self.stream, GROUP, delivery.message_id)
                pipe.xdel(self.stream, delivery.message_id)  # keep the stream as long as the work left
                pipe.execute()
        except _DOWN as exc:
            raise QueueUnavailable(str(exc)) from exc

    def publish(self, event: dict[str, Any]) -> None:
        try:
            self.client.publish(self.channel, json.dumps(event))
        except _DOWN as exc:
            # Periodic reconciliation covers a lost event.
            log.warning("could not publish %s: %s", event, exc)

    def subscribe(self) -> Subscription:
        try:
            return _RedisSubscription(self.client, self.channel)
        except _DOWN as exc:
            raise QueueUnavailable(str(exc)) from exc

    def ping(self) -> None:
        try:
            self.client.ping()
        except _DOWN as exc:
            raise QueueUnavailable(str(exc)) from exc

    def pending(self) -> int:
        try:
            self._ensure_group()
            return int(self.client.xpending(self.stream, GROUP)["pending"])
        except _DOWN as exc:
            raise QueueUnavailable(str(exc)) from exc

    def queued_edit_ids(self) -> set[str]:
        # Acknowledged messages are deleted, so the stream holds exactly the outstanding work.
        ids: set[str] = set()
        start = "-"
        try:
            while True:
                page = cast(list[_Entry], self.client.xrange(self.stream, min=start, max="+", count=1000))
                ids |= {fields["edit_id"] for _, fields in page if fields and "edit_id" in fields}
                if len(page) < 1000:
                    return ids
                start = "(" + page[-1][0]
        except _DOWN as exc:
            raise QueueUnavailable(str(exc)) from exc

    def claim_sweep(self, consumer: str, ttl_ms: int) -> bool:
        try:
            return bool(self.client.set(self.sweep_key, consumer, nx=True, px=ttl_ms))
        except _DOWN as exc:
            raise QueueUnavailable(str(exc)) from exc

    def close(self) -> None:
        self.client.close()
