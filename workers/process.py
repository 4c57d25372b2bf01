"""The embedded worker as a child process of ``scen serve`` (``SCEN_EMBEDDED_WORKER_MODE=process``).

Training in the API process holds the editor's lock and swaps layers of the model it answers
with, and shares the interpreter's lock with every request: answers wait while an edit trains,
and status polling slows the training. A child process with a model of its own, at a lower CPU
priority and with fewer torch threads, trains beside serving instead, as ``scen worker`` does with
Redis. It shares the database and the expert store; its queue calls and the events it publishes
go through a pipe to the API process's queue (``app.queue.pipe``), so the messages outlive it.

A child that dies is started again; the messages it held are delivered again at once, each
delivery counted, so an edit that kills it every time ends ``failed`` after
``SCEN_MAX_DELIVERIES`` deliveries, with the reason. Stopping asks the child to finish its edit
(SIGTERM, as ``scen worker``) and kills it after a grace period.
"""

from __future__ import annotations

import copy
import logging
import multiprocessing
import os
import signal
import threading
import time
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from types import FrameType
from typing import Any, cast

from prometheus_client import CollectorRegistry

from app.db.session import Database
from app.live import build_served_model
from app.logs import configure_logging
from app.models import LoadedModel
from app.queue import EditQueue, QueueUnavailable
from app.queue.pipe import PipeQueue, QueueServer
from app.settings import Settings
from workers import child
from workers.metrics import WorkerMetrics
from workers.worker import build_worker, worker_name

log = logging.getLogger(__name__)

# Less than the 30 s the API waits for its threads at shutdown.
STOP_GRACE_S = 25.0
# A child that ran this long before dying is not crashing at start: restart it at once.
STABLE_AFTER_S = 60.0
MAX_RESTART_DELAY_S = 60.0


def lower_priority(priority: str) -> None:
    """Lower the calling thread's CPU priority, and that of the threads it starts afterwards.

    "idle": Linux's idle scheduling class. A thread of any other class that wakes takes the CPU
    from it at once, so the API's torch threads never wait for a training. A mere niceness does
    not give that: each of the many short parallel regions of a decoding step waits for its
    slowest thread, and one sharing a core with the training is often late
    (``bench/decode_beside_busy_core.py``). Where the class does not exist, the lowest niceness
    stands in. "low": niceness 10. "normal": unchanged.
    """
    if priority == "idle":
        if hasattr(os, "SCHED_IDLE"):
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
        else:
            os.nice(19)
    elif priority == "low":
        os.nice(10)


class WorkerProcess:
    """Starts the worker process, answers its queue calls, and starts it again when it dies."""

    def __init__(self, settings: Settings, queue: EditQueue, registry: CollectorRegistry | None = None,
                 loaded: LoadedModel | None = None):
        self.settings = settings
        self.queue = queue
        self.metrics = WorkerMetrics.of(registry) if registry is not None else None
        # A model the API was handed rather than one it loads (tests): every child gets a copy of
        # it as it is now, since the API's editor is about to change it (hooks that do not pickle).
        self.loaded = copy.deepcopy(loaded)
        self.server = QueueServer(queue, extra={"metric": self._metric})
        self.process: BaseProcess | None = None
        self.restarts = 0
        self._stop = threading.Event()
        # spawn: forking a process that runs torch's and uvicorn's threads is unsafe.
        self._context = multiprocessing.get_context("spawn")

    def start(self) -> tuple[threading.Thread, threading.Event]:
        """Start the child and the thread serving it; set the returned event to stop both."""
        first = self._spawn()
        thread = threading.Thread(target=self._supervise, args=(first,), name="edit-worker-process", daemon=True)
        thread.start()
        return thread, self._stop

    def _spawn(self) -> tuple[BaseProcess, Connection, str]:
        name = worker_name()
        ours, theirs = self._context.Pipe()
        s = self.settings
        process = self._context.Process(
            target=child.run, name=f"scen-worker-{name}", daemon=True,
            args=(s, theirs, name, self.loaded, s.embedded_worker_priority, s.worker_process_threads),
        )
        process.start()
        # Only the child holds its end now, so its death reads as the end of the pipe here.
        theirs.close()
        self.process = process
        log.info("worker process %d started (%s, %s priority, %d torch threads)", process.pid, name,
                 s.embedded_worker_priority, s.worker_process_threads)
        return process, ours, name

    def _supervise(self, first: tuple[BaseProcess, Connection, str]) -> None:
        current: tuple[BaseProcess, Connection, str] | None = first
        delay = 1.0
        while True:
            if current is not None:
                process, conn, name = current
                started = time.monotonic()
                self._serve(process, conn)
                conn.close()
                # Its pipe closed as its worker loop ended: it is exiting, which takes seconds on a busy machine.
                process.join(STOP_GRACE_S)
                if process.exitcode is None:
                    process.kill()
                    process.join()
                if self._stop.is_set():
                    log.info("worker process %d stopped (exit code %s)", process.pid, process.exitcode)
                    return
                released = self.queue.release(name)
                log.error("worker process %d ended unexpectedly (exit code %s); %d of its edits are delivered "
                          "again", process.pid, process.exitcode, released)
                if time.monotonic() - started >= STABLE_AFTER_S:
                    delay = 1.0
            # A child that could not be started waits like one that died at once.
            if self._stop.wait(delay):
                return
            delay = min(delay * 2, MAX_RESTART_DELAY_S)
            self.restarts += 1
            try:
                current = self._spawn()
            except Exception:
                log.exception("the worker process could not be started; trying again")
                current = None

    def _serve(self, process: BaseProcess, conn: Connection) -> None:
        """Answer the child until it ends; once stopping, ask it to finish, then make it."""
        deadline: float | None = None
        while True:
            if self._stop.is_set() and deadline is None:
                process.terminate()  # SIGTERM: the child finishes its current edit first
                deadline = time.monotonic() + STOP_GRACE_S
            if deadline is not None and time.monotonic() > deadline:
                log.warning("worker process %d still busy after %.0fs; killing it (its edit trains again "
                            "at the next start)", process.pid, STOP_GRACE_S)
                process.kill()
                return
            if not self.server.answer(conn, 0.2):
                return

    def _metric(self, family: str, labels: tuple[str, ...], op: str, value: float) -> None:
        if self.metrics is None or family not in _FAMILIES or op not in _OPS:
            return
        metric: Any = getattr(self.metrics, family)
        if labels:
            metric = metric.labels(*labels)
        if op == "set_to_current_time":
            metric.set_to_current_time()
        else:
            getattr(metric, op)(value)


_FAMILIES = frozenset({"training_seconds", "training_steps", "post_to_active", "failures", "heartbeat"})
_OPS = frozenset({"observe", "inc", "set_to_current_time"})


class _RemoteMetric:
    """One metric of the API process, updated from the worker process."""

    def __init__(self, queue: PipeQueue, family: str, labels: tuple[str, ...] = ()):
        self._queue, self._family, self._labels = queue, family, labels

    def labels(self, *values: str) -> _RemoteMetric:
        return _RemoteMetric(self._queue, self._family, tuple(str(v) for v in values))

    def observe(self, value: float) -> None:
        self._send("observe", value)

    def inc(self, value: float = 1.0) -> None:
        self._send("inc", value)

    def set_to_current_time(self) -> None:
        self._send("set_to_current_time", 0.0)

    def _send(self, op: str, value: float) -> None:
        try:
            self._queue.call("metric", self._family, self._labels, op, float(value))
        except QueueUnavailable:
            pass  # a metric is never worth failing an edit for


class _RemoteWorkerMetrics:
    """``WorkerMetrics`` as the worker process sees them: kept in the API's ``/metrics``."""

    def __init__(self, queue: PipeQueue):
        for family in _FAMILIES:
            setattr(self, family, _RemoteMetric(queue, family))


def child_main(settings: Settings, conn: Connection, name: str, loaded: LoadedModel | None,
               priority: str, threads: int) -> None:
    """The worker process: its own model and live editor, the API's queue through ``conn``.
    Started through ``workers.child.run``, which ignores SIGINT first."""
    stop = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        if stop.is_set():
            os._exit(1)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    lower_priority(priority)
    import torch

    torch.set_num_threads(threads)
    configure_logging(json_lines=settings.log_json)
    queue = PipeQueue(conn, on_lost=stop.set)
    db = Database(settings.db_url)  # the API process has migrated it
    try:
        served = build_served_model(settings, db, loaded, write_table=False)
        metrics = cast(WorkerMetrics, _RemoteWorkerMetrics(queue))
        worker = build_worker(settings, served, db, queue, name=name, block_ms=500, metrics=metrics)
        worker.run(stop)
    finally:
        queue.close()
        db.close()
