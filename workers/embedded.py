"""The worker inside ``scen serve``: a child process (the default) or a thread of the API process."""

from __future__ import annotations

import threading

from prometheus_client import CollectorRegistry

from app.db.session import Database
from app.live import ServedModel
from app.models import LoadedModel
from app.queue import EditQueue
from app.settings import Settings
from workers.process import WorkerProcess
from workers.worker import build_worker, send_lost_edits, start_thread


def send_waiting_edits(db: Database, queue: EditQueue) -> None:
    """Call it before the API takes edits: a queue that does not outlive the process starts
    empty, so every edit still waiting in the database is sent again first, and an edit posted
    meanwhile could be sent twice."""
    if not queue.durable:
        send_lost_edits(db, queue, min_age_s=0)


def start_worker_process(
    settings: Settings, db: Database, queue: EditQueue, registry: CollectorRegistry | None = None,
    loaded: LoadedModel | None = None,
) -> tuple[threading.Thread, threading.Event]:
    """Start the worker process; set the returned event to stop it (the thread ends once it has).

    ``loaded``: a model handed to the API instead of ``settings.model``; the child gets a copy of
    it as it is now, so start it before the API's editor changes that model.
    """
    send_waiting_edits(db, queue)
    return WorkerProcess(settings, queue, registry, loaded).start()


def start_embedded_worker(
    settings: Settings, served: ServedModel, db: Database, queue: EditQueue,
    registry: CollectorRegistry | None = None,
) -> tuple[threading.Thread, threading.Event]:
    """Start a worker thread sharing the API's model; set the returned event to stop it.

    ``registry``: the API's metrics, which then include the worker's.
    """
    # Polls more often than a separate worker: it shares the process with the API.
    worker = build_worker(settings, served, db, queue, block_ms=500, registry=registry)
    send_waiting_edits(db, queue)
    return start_thread(worker)
