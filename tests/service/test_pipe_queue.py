"""The queue a worker process uses through a pipe keeps the API process's queue's delivery rules."""

from __future__ import annotations

import multiprocessing
import threading

import pytest

from app.queue import EditChanged, MemoryQueue, QueueUnavailable, RedisQueue
from app.queue.pipe import PipeQueue, QueueServer


@pytest.fixture
def api_queue():
    return MemoryQueue(claim_idle_ms=60_000)


@pytest.fixture
def connect(api_queue):
    """A PipeQueue answered by a thread serving ``api_queue``, as the API process serves its worker."""
    made: list[tuple[PipeQueue, threading.Thread]] = []

    def new(extra=None, on_lost=None) -> PipeQueue:
        ours, theirs = multiprocessing.Pipe()
        server = QueueServer(api_queue, extra=extra)

        def serve() -> None:
            while server.answer(ours, 0.05):
                pass

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        made.append((PipeQueue(theirs, on_lost=on_lost), thread))
        return made[-1][0]

    yield new
    for queue, thread in made:
        queue.close()
        thread.join(5)


def test_work_goes_through_the_api_queue(api_queue, connect):
    worker = connect()
    api_queue.enqueue("e1")
    taken = worker.take("w", 100)
    assert (taken.edit_id, taken.deliveries) == ("e1", 1)
    assert worker.pending() == api_queue.pending() == 1
    assert worker.queued_edit_ids() == {"e1"}
    worker.touch(taken, "w")
    worker.ack(taken)
    assert api_queue.pending() == 0 and worker.take("w", 10) is None
    assert worker.claim_sweep("w", 1000)
    assert worker.enqueue("e2") and api_queue.queued_edit_ids() == {"e2"}


def test_events_reach_the_api_processes_subscribers(api_queue, connect):
    subscription = api_queue.subscribe()
    try:
        connect().publish(EditChanged("e1", "active").to_dict())
        assert EditChanged.from_dict(subscription.get(timeout=2)) == EditChanged("e1", "active")
    finally:
        subscription.close()


def test_a_dead_workers_messages_are_delivered_again_at_once_and_counted(api_queue, connect):
    dead, alive = connect(), connect()
    api_queue.enqueue("e1")
    dead.take("dead", 100)
    assert alive.take("alive", 10) is None  # another worker's, and not idle long enough
    assert api_queue.release("dead") == 1
    again = alive.take("alive", 10)
    assert (again.edit_id, again.deliveries) == ("e1", 2)
    assert api_queue.release("dead") == 0


def test_redis_leaves_a_dead_consumer_to_its_own_reclaiming(redis_url, redis_prefix):
    queue = RedisQueue(redis_url, prefix=redis_prefix)
    try:
        queue.enqueue("e1")
        queue.take("dead", 100)
        assert queue.release("dead") == 0
    finally:
        queue.close()


def test_failures_of_the_api_side_reach_the_worker_as_an_unavailable_queue(connect):
    def broken(*_args):
        raise RuntimeError("disk full")

    worker = connect(extra={"metric": broken})
    with pytest.raises(QueueUnavailable, match="RuntimeError: disk full"):
        worker.call("metric")
    with pytest.raises(QueueUnavailable, match="unknown call"):
        worker.call("__del__")
    assert worker.take("w", 10) is None  # the connection still answers


def test_a_worker_whose_api_process_is_gone_is_told_once():
    ours, theirs = multiprocessing.Pipe()
    lost = threading.Event()
    worker = PipeQueue(theirs, on_lost=lost.set)
    ours.close()
    with pytest.raises(QueueUnavailable, match="gone"):
        worker.take("w", 5000)
    assert lost.is_set()
    with pytest.raises(QueueUnavailable, match="gone"):
        worker.ping()
