"""The worker loop: take an edit, train it, commit, acknowledge, announce.

Each outcome is written in one place (``_succeed``, ``_give_up``, ``_retry_later``).
The message is acknowledged only after the outcome is committed, so a worker that
dies at any point leaves it pending for another worker to reclaim. Edits the queue
lost are sent again by ``send_lost_edits``, the one place that re-sends work.
"""

from __future__ import annotations

import contextvars
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any, TypeVar

from prometheus_client import CollectorRegistry
from sqlalchemy.orm import Session
from tenacity import Retrying, before_sleep_log, retry_if_exception, stop_after_delay, wait_exponential

from app.db import edits as repo
from app.db.models import EditStatus, utcnow
from app.db.session import Database, database_unreachable
from app.live import ServedModel
from app.logs import edit_id_var, request_id_var
from app.queue import Delivery, EditChanged, EditQueue
from app.scen import ScenError, TrainedEdit
from app.settings import Settings
from workers.metrics import Heartbeat, WorkerMetrics

log = logging.getLogger(__name__)

T = TypeVar("T")


def worker_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


class EditWorker:
    def __init__(
        self,
        served: ServedModel,
        db: Database,
        queue: EditQueue,
        max_deliveries: int = 3,
        claim_idle_ms: int = 60_000,
        name: str | None = None,
        block_ms: int = 1000,
        after_save: Callable[[str], None] | None = None,
        requeue_after_s: float = 60.0,
        db_retry_s: float = 300.0,
        metrics: WorkerMetrics | None = None,
        heartbeat: Heartbeat | None = None,
    ):
        self.served = served
        self.db = db
        self.queue = queue
        self.max_deliveries = max_deliveries
        # Touch the message well within the idle time after which others may reclaim it.
        self.heartbeat_s = claim_idle_ms / 3000
        self.name = name or worker_name()
        self.block_ms = block_ms
        # Called between writing the expert file and committing; a fault-injection point.
        self.after_save = after_save
        self.requeue_after_s = requeue_after_s
        self.db_retry_s = db_retry_s
        self._next_sweep = time.monotonic() + requeue_after_s
        self.metrics = metrics
        self.heartbeat = heartbeat

    def beat(self) -> None:
        """The worker is alive: its loop turned, or it is still working on an edit."""
        if self.heartbeat is not None:
            self.heartbeat.beat()
        if self.metrics is not None:
            self.metrics.heartbeat.labels(self.name).set_to_current_time()

    def run(self, stop: threading.Event) -> None:
        log.info("worker %s started", self.name)
        backoff = 0.5
        while not stop.is_set():
            self.beat()
            try:
                delivery = self.queue.take(self.name, self.block_ms)
                backoff = 0.5
            except Exception as exc:
                log.warning("cannot take work (%s: %s); retrying in %.1fs", type(exc).__name__, exc, backoff)
                stop.wait(backoff)
                backoff = min(backoff * 2, 10.0)
                continue
            if delivery is None:
                if time.monotonic() >= self._next_sweep:
                    self._next_sweep = time.monotonic() + self.requeue_after_s
                    try:
                        self.requeue_lost()
                    except Exception as exc:
                        log.warning("could not look for lost edits (%s: %s)", type(exc).__name__, exc)
                continue
            try:
                self.handle(delivery)
            except Exception:
                # Database or queue trouble mid-edit: the message stays pending and is reclaimed.
                log.exception("edit %s could not be handled; it will be retried", delivery.edit_id)
                stop.wait(backoff)
        log.info("worker %s stopped", self.name)

    def requeue_lost(self) -> list[str]:
        """Send again every edit that has waited ``requeue_after_s`` with no message in the queue.

        Runs when the worker is idle, in one worker at a time. Checking the database before the
        queue makes a race harmless: an edit finished in between is sent once more and skipped.
        """
        if not self.queue.claim_sweep(self.name, int(self.requeue_after_s * 1000)):
            return []
        return send_lost_edits(self.db, self.queue, self.requeue_after_s)

    def handle(self, delivery: Delivery) -> None:
        # Every log line about this edit carries its id and the id of the request that queued it.
        edit_token = edit_id_var.set(delivery.edit_id)
        request_token = request_id_var.set(self._request_id(delivery.edit_id))
        try:
            done = threading.Event()
            context = contextvars.copy_context()
            beat = threading.Thread(target=context.run, args=(self._heartbeat, delivery, done), daemon=True,
                                    name=f"heartbeat-{delivery.edit_id[:8]}")
            beat.start()
            try:
                self._handle(delivery)
            finally:
                done.set()
        finally:
            request_id_var.reset(request_token)
            edit_id_var.reset(edit_token)

    def _request_id(self, edit_id: str) -> str | None:
        try:
            with self.db.session() as session:
                return repo.request_id_of(session, edit_id)
        except Exception:  # only for the logs: an unreachable database is met, and retried, below
            return None

    def _heartbeat(self, delivery: Delivery, done: threading.Event) -> None:
        # Beats at least every second while training, however long the queue's heartbeat interval.
        last_touch = time.monotonic()
        while not done.wait(min(1.0, self.heartbeat_s)):
            self.beat()
            if time.monotonic() - last_touch < self.heartbeat_s:
                continue
            last_touch = time.monotonic()
            try:
                self.queue.touch(delivery, self.name)
            except Exception as exc:
                log.warning("heartbeat for edit %s failed: %s", delivery.edit_id, exc)

    def _in_database(self, step: Callable[..., T], *args: Any) -> T:
        """``step(session, *args)`` in a transaction of its own, run again until the database
        answers, for up to ``db_retry_s``.

        The heartbeat keeps the message ours meanwhile, so an outage costs no delivery and the
        edit is finished once the database is back; only a longer one leaves it to a later delivery.
        Every step is a compare-and-set, so running one again after a commit whose answer was
        lost changes nothing.
        """
        def attempt() -> T:
            with self.db.session() as session:
                return step(session, *args)

        return self._until_database_answers(attempt)

    def _until_database_answers(self, call: Callable[[], T]) -> T:
        retrying = Retrying(
            retry=retry_if_exception(database_unreachable), stop=stop_after_delay(self.db_retry_s),
            wait=wait_exponential(multiplier=0.2, max=5), before_sleep=before_sleep_log(log, logging.WARNING),
            reraise=True,
        )
        return retrying(call)

    def _handle(self, delivery: Delivery) -> None:
        edit_id = delivery.edit_id
        if delivery.deliveries > self.max_deliveries:
            self._give_up(delivery, self._abandoned_reason(edit_id, delivery.deliveries - 1),
                          attempts=delivery.deliveries - 1, kind="abandoned")
            return
        edit = self._in_database(repo.start_training, edit_id, delivery.deliveries, self.name)
        if edit is None:
            log.info("edit %s is no longer waiting (cancelled, finished or unknown); skipping", edit_id)
            self.queue.ack(delivery)
            return
        log.info("training edit %s (delivery %d)", edit_id, delivery.deliveries)
        try:
            # Every live edit must be a negative of the new neuron.
            self._until_database_answers(self.served.sync.reconcile)
            trained = self.served.editor.train(edit.prompt, edit.target, tuple(edit.rephrases), subject=edit.subject)
        except ScenError as exc:
            self._give_up(delivery, f"{type(exc).__name__}: {exc}", kind="invalid_edit")
            return
        except Exception as exc:
            log.exception("training edit %s failed", edit_id)
            self._retry_later(delivery, f"{type(exc).__name__}: {exc}")
            return
        path, sha = self.served.experts.save(edit_id, trained)
        if self.after_save is not None:
            self.after_save(edit_id)
        self._succeed(delivery, trained, path, sha, edit.created_at)

    def _succeed(self, delivery: Delivery, trained: TrainedEdit, path: str, sha: str, posted: datetime) -> None:
        edit_id = delivery.edit_id
        # The subject it was trained on, given or inferred, is part of the audit record.
        metrics = _jsonable({**trained.metrics, "subject": trained.subject})
        activated = self._in_database(repo.activate, edit_id, metrics, path, sha)
        if activated is None and self._in_database(_activated_with, edit_id, path):
            # Our commit landed but its answer was lost to an outage; the retry found it done.
            # (Which edits it superseded is not known any more; the reconcile below follows them.)
            activated = repo.Activated([])
        if activated is not None:
            if self.metrics is not None:
                self.metrics.training_seconds.observe(float(trained.metrics.get("seconds", 0.0)))
                self.metrics.training_steps.observe(float(trained.metrics.get("steps", 0)))
                self.metrics.post_to_active.observe(max(0.0, (utcnow() - posted).total_seconds()))
            self.served.experts.discard_others(edit_id, keep=path)
            self._until_database_answers(lambda: self.served.sync.reconcile({edit_id: trained}))
            log.info("edit %s active (%d steps, %.2fs)%s", edit_id, trained.metrics.get("steps", -1),
                     trained.metrics.get("seconds", float("nan")),
                     f"; superseded {', '.join(activated.superseded)}" if activated.superseded else "")
        else:
            # Rolled back while training, or another worker finished it first.
            self.served.experts.discard(path)
            log.info("edit %s was finished or cancelled meanwhile; discarded this attempt", edit_id)
        self.queue.ack(delivery)
        if activated is not None:
            self.queue.publish(EditChanged(edit_id, EditStatus.active).to_dict())
            for older in activated.superseded:
                self.queue.publish(EditChanged(older, EditStatus.superseded).to_dict())

    def _give_up(self, delivery: Delivery, reason: str, attempts: int | None = None,
                 kind: str = "training_error") -> None:
        changed = self._in_database(repo.fail, delivery.edit_id, reason, attempts)
        if changed and self.metrics is not None:
            self.metrics.failures.labels(kind).inc()
        if changed:
            # A failed edit is never served: files an attempt wrote before the failure are orphans.
            self.served.experts.discard_all(delivery.edit_id)
        self.queue.ack(delivery)
        if changed:
            log.warning("edit %s failed: %s", delivery.edit_id, reason)
            self.queue.publish(EditChanged(delivery.edit_id, EditStatus.failed).to_dict())

    def _retry_later(self, delivery: Delivery, error: str) -> None:
        if delivery.deliveries >= self.max_deliveries:
            self._give_up(delivery, f"failed {delivery.deliveries} times; last error: {error}")
            return
        self._in_database(repo.note_error, delivery.edit_id, error)
        # Not acknowledged: the message is reclaimed once it has been idle long enough.

    def _abandoned_reason(self, edit_id: str, attempts: int) -> str:
        last = self._in_database(_last_error, edit_id)
        reason = f"gave up after {attempts} deliveries: no worker finished training it"
        return f"{reason}; last error: {last}" if last else reason


def send_lost_edits(db: Database, queue: EditQueue, min_age_s: float) -> list[str]:
    """Send again every edit that has waited ``min_age_s`` with no message in ``queue``."""
    with db.session() as session:
        waiting = repo.waiting_since(session, utcnow() - timedelta(seconds=min_age_s))
    if not waiting:
        return []
    queued = queue.queued_edit_ids()
    lost = [edit_id for edit_id in waiting if edit_id not in queued]
    for edit_id in lost:
        queue.enqueue(edit_id)
        log.warning("edit %s was waiting with no message in the queue; sent again", edit_id)
    return lost


def _activated_with(session: Session, edit_id: str, path: str) -> bool:
    try:
        edit = repo.get_edit(session, edit_id)
    except repo.EditNotFound:
        return False
    return edit.status == EditStatus.active and edit.expert_path == path


def _last_error(session: Session, edit_id: str) -> str | None:
    try:
        return repo.get_edit(session, edit_id).error
    except repo.EditNotFound:
        return None


def _jsonable(metrics: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in metrics.items():
        if isinstance(v, (int, float, str, bool)) or v is None:
            out[k] = v
        elif isinstance(v, (list, tuple)):
            out[k] = [float(x) if not isinstance(x, (str, bool)) else x for x in v]
        else:
            out[k] = float(v)
    return out


def build_worker(
    settings: Settings,
    served: ServedModel,
    db: Database,
    queue: EditQueue,
    *,
    name: str | None = None,
    block_ms: int = 1000,
    after_save: Callable[[str], None] | None = None,
    registry: CollectorRegistry | None = None,
    metrics: WorkerMetrics | None = None,
    heartbeat: bool = False,
) -> EditWorker:
    """The one place a worker takes its limits from settings. ``registry``: where its metrics go
    (or ``metrics``, metrics kept elsewhere); ``heartbeat``: keep ``settings.heartbeat_path`` fresh
    for ``scen worker --check``."""
    name = name or worker_name()
    if metrics is None and registry is not None:
        metrics = WorkerMetrics.of(registry)
    return EditWorker(
        served, db, queue, max_deliveries=settings.max_deliveries, claim_idle_ms=settings.claim_idle_ms,
        requeue_after_s=settings.requeue_after_s, db_retry_s=settings.db_retry_seconds, name=name,
        block_ms=block_ms, after_save=after_save,
        metrics=metrics,
        heartbeat=Heartbeat(settings.heartbeat_path, name) if heartbeat else None,
    )


def start_thread(worker: EditWorker) -> tuple[threading.Thread, threading.Event]:
    stop = threading.Event()
    thread = threading.Thread(target=worker.run, args=(stop,), name=f"edit-worker-{worker.name}", daemon=True)
    thread.start()
    return thread, stop

