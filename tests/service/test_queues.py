"""Both queue implementations keep the same delivery rules."""

from __future__ import annotations

import time

import pytest

from app.queue import MemoryQueue, RedisQueue


@pytest.fixture(params=["memory", "redis"])
def make_queue(request):
    if request.param == "memory":
        shared = MemoryQueue(claim_idle_ms=150)
        yield lambda: shared
        return
    url = request.getfixturevalue("redis_url")
    prefix = request.getfixturevalue("redis_prefix")
    made = []

    def new():
        made.append(RedisQueue(url, prefix=prefix, claim_idle_ms=150))
        return made[-1]

    yield new
    for q in made:
        q.close()


def test_take_ack(make_queue):
    q = make_queue()
    assert q.take("a", 10) is None
    q.enqueue("e1")
    q.enqueue("e2")
    first, second = q.take("a", 100), q.take("a", 100)
    assert (first.edit_id, first.deliveries, second.edit_id) == ("e1", 1, "e2")
    assert q.pending() == 2
    q.ack(first)
    q.ack(second)
    assert q.pending() == 0 and q.take("a", 10) is None


def test_unacked_message_is_reclaimed_and_counted(make_queue):
    dead, alive = make_queue(), make_queue()
    dead.enqueue("e1")
    taken = dead.take("dead", 100)
    assert alive.take("alive", 10) is None  # not idle long enough yet
    time.sleep(0.2)
    again = alive.take("alive", 10)
    assert (again.edit_id, again.message_id, again.deliveries) == ("e1", taken.message_id, 2)
    time.sleep(0.2)
    third = alive.take("alive", 10)
    assert third.deliveries == 3
    alive.ack(third)
    assert alive.pending() == 0


def test_blocking_take_wakes_on_enqueue(make_queue):
    import threading

    q, producer = make_queue(), make_queue()
    late = threading.Timer(0.05, producer.enqueue, args=("late",))
    late.start()
    start = time.monotonic()
    got = q.take("a", 2000)
    late.join()  # the producer may still be reading XADD's reply when the consumer wakes
    assert got.edit_id == "late" and time.monotonic() - start < 1.0


def test_events_reach_subscribers(make_queue):
    q = make_queue()
    sub = q.subscribe()
    try:
        time.sleep(0.05)
        q.publish({"type": "edit_changed", "id": "e1"})
        deadline = time.monotonic() + 2
        event = None
        while event is None and time.monotonic() < deadline:
            event = sub.get(timeout=0.2)
        assert event == {"type": "edit_changed", "id": "e1"}
    finally:
        sub.close()


def test_touch_keeps_a_message_from_being_reclaimed(make_queue):
    busy, other = make_queue(), make_queue()
    busy.enqueue("e1")
    taken = busy.take("busy", 100)
    for _ in range(3):
        time.sleep(0.08)
        busy.touch(taken, "busy")
        assert other.take("other", 0 if isinstance(other, MemoryQueue) else 1) is None
    busy.ack(taken)
    assert other.pending() == 0


def test_queued_edit_ids_cover_new_and_delivered_messages(make_queue):
    q = make_queue()
    q.enqueue("e1")
    q.enqueue("e2")
    delivered = q.take("a", 100)
    assert q.queued_edit_ids() == {"e1", "e2"}
    q.ack(delivered)
    assert q.queued_edit_ids() == {"e2"}


def test_one_sweeper_at_a_time(redis_url, redis_prefix):
    a, b = RedisQueue(redis_url, prefix=redis_prefix), RedisQueue(redis_url, prefix=redis_prefix)
    try:
        assert a.claim_sweep("a", 200) and not b.claim_sweep("b", 200)
        time.sleep(0.25)
        assert b.claim_sweep("b", 200)
    finally:
        a.close()
        b.close()
