"""``scen worker``: a long-lived process consuming the Redis queue.

First SIGTERM/SIGINT: finish the current edit, then stop (warm). Second: exit at once
(cold); the unacknowledged message is reclaimed by another worker.

While its loop turns it keeps a heartbeat file fresh (``scen worker --check`` reads it: the
container's healthcheck), and with ``SCEN_WORKER_METRICS_PORT`` it serves its Prometheus metrics
(training, failures, heartbeat, process) there.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from types import FrameType

from prometheus_client import GC_COLLECTOR, PLATFORM_COLLECTOR, PROCESS_COLLECTOR, CollectorRegistry, start_http_server

from app.live import build_served_model, open_database, open_queue
from app.settings import Settings
from workers.worker import build_worker

log = logging.getLogger(__name__)


def run(settings: Settings) -> None:
    if settings.redis_url is None:
        raise SystemExit(
            "scen worker needs SCEN_REDIS_URL: without Redis the worker runs inside `scen serve` instead"
        )
    registry = CollectorRegistry()
    for collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
        registry.register(collector)
    if settings.worker_metrics_port is not None:
        start_http_server(settings.worker_metrics_port, addr=settings.worker_metrics_host, registry=registry)
        log.info("worker metrics on http://%s:%d/metrics", settings.worker_metrics_host, settings.worker_metrics_port)
    db = open_database(settings)
    queue = open_queue(settings)
    worker = build_worker(settings, build_served_model(settings, db), db, queue, registry=registry, heartbeat=True)
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
        settings.heartbeat_path.unlink(missing_ok=True)  # a stopped worker is not alive
        queue.close()
        db.close()
