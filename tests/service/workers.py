"""Standalone workers for tests: own model, own queue connection, optional crash point."""

from __future__ import annotations

import contextlib
import threading

from app.live import build_served_model, open_database, open_queue
from app.settings import Settings
from tests.utils.tiny_models import tiny_model
from workers.worker import build_worker


class SimulatedCrash(BaseException):
    """Ends a worker thread the way a killed process ends: no ack, no cleanup, no commit."""


@contextlib.contextmanager
def start_worker(settings: Settings, name: str | None = None, after_save=None, block_ms: int = 100):
    db = open_database(settings)
    queue = open_queue(settings)
    served = build_served_model(settings, db, tiny_model("llama"))
    worker = build_worker(settings, served, db, queue, name=name, block_ms=block_ms, after_save=after_save)
    stop = threading.Event()

    def run():
        try:
            worker.run(stop)
        except SimulatedCrash:
            pass

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    worker.thread = thread
    try:
        yield worker
    finally:
        stop.set()
        thread.join(10)
        queue.close()
        db.close()
