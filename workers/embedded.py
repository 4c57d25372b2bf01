"""The worker thread inside an API process (no Redis: one machine, one process)."""

from __future__ import annotations

import threading

from prometheus_client import CollectorRegistry

from app.db.session import Database
from app.live import ServedModel
from app.queue import EditQueue
from app.settings import Settings
from workers.worker import build_worker, start_thread


def start_embedded_worker(
    settings: Settings, served: ServedModel, db: Database, queue: EditQueue,
    registry: CollectorRegistry | None = None,
) -> tuple[threading.Thread, threading.Event]:
    """Start a worker sharing the API's model; set the returned event to stop it.

    ``registry``: the API's metrics, which then include the worker's.
    Call it before the API takes edits: a queue that does not outlive the process starts
    empty, so every edit still waiting in the database is sent again first, and an edit
    posted meanwhile could be sent twice.
    """
    # Polls more often than a separate worker: it shares the process with the API.
    worker = build_worker(settings, served, db, queue, block_ms=500, registry=registry)
    if not queue.durable:
        worker.requeue_lost(min_age_s=0)
    return start_thread(worker)
