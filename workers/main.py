"""``scen worker``: a long-lived process consuming the Redis queue.

First SIGTERM/SIGINT: finish the current edit, then stop (warm). Second: exit at once
(cold); the unacknowledged message is reclaimed by another worker.
"""

from __future__ import annotations

import logging
import os
import signal
import threading

from app.settings import Settings, get_settings
from workers.runtime import build_live, configure_logging, open_database, open_queue
from workers.worker import EditWorker

log = logging.getLogger(__name__)


def run(settings: Settings | None = None) -> None:
    settings = settings or get_settings()
    configure_logging(settings)
    if settings.redis_url is None:
        raise SystemExit(
            "scen worker needs SCEN_REDIS_URL: without Redis the worker runs inside `scen serve` instead"
        )
    db = open_database(settings)
    queue = open_queue(settings)
    live = build_live(settings, db)
    worker = EditWorker(live, db, queue, max_deliveries=settings.max_deliveries,
                        claim_idle_ms=settings.claim_idle_ms,
                        requeue_after_s=settings.requeue_after_s)
    stop = threading.Event()

    def on_signal(signum, _frame):
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
