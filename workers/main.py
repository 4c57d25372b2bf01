"""``scen worker``: a long-lived process consuming the Redis queue.

First SIGTERM/SIGINT: finish the current edit, then stop (warm). Second: exit at once
(cold); the unacknowledged message is reclaimed by another worker.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from types import FrameType

from app.live import build_served_model, open_database, open_queue
from app.settings import Settings
from workers.worker import build_worker

log = logging.getLogger(__name__)


def run(settings: Settings) -> None:
    if settings.redis_url is None:
        raise SystemExit(
            "scen worker needs SCEN_REDIS_URL: without Redis the worker runs inside `scen serve` instead"
        )
    db = open_database(settings)
    queue = open_queue(settings)
    worker = build_worker(settings, build_served_model(settings, db), db, queue)
    stop = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        if stop.is_set():
            log.warning("second signal: exiting now; the current edit will be reclaimed")
            os._exit(1)
        log.info("signal %d: finishing the current edit, then stopping", signum)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        worker.run(stop)
    finally:
        queue.close()
        db.close()
