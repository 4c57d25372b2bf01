"""Everything one API process owns, started and stopped by the app's lifespan.

The model loads in a background thread unless one is passed in, so /health answers
at once and /ready says 503 until the model is live.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from app.api.batching import GenerateBatcher
from app.api.errors import NotReady
from app.db import edits as repo
from app.db.session import Database
from app.models import LoadedModel
from app.queue import EditQueue, MemoryQueue, QueueUnavailable
from app.settings import Settings
from workers.runtime import Live, build_live, open_database, open_queue
from workers.worker import EditWorker, start_thread

log = logging.getLogger(__name__)


class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        self.edits_created = Counter("scen_edits_created", "Edits accepted", registry=self.registry)
        self.generate_requests = Counter("scen_generate_requests", "Generate requests", registry=self.registry)
        self.batch_size = Histogram("scen_generate_batch_size", "Prompts per model call",
                                    buckets=(1, 2, 4, 8, 16, 32, 64), registry=self.registry)
        self.live_edits = Gauge("scen_live_edits", "Edits routed to by this process", registry=self.registry)
        self.model_version = Gauge("scen_model_version", "Live model version", registry=self.registry)
        self.batch_sizes: list[int] = []  # recent batch sizes, for tests and benchmarks

    def observe_batch(self, n: int) -> None:
        self.batch_size.observe(n)
        self.batch_sizes = (self.batch_sizes + [n])[-1000:]


class Service:
    def __init__(self, settings: Settings, loaded_model: LoadedModel | None = None):
        self.settings = settings
        self._loaded_model = loaded_model
        self.metrics = Metrics()
        self.db: Database | None = None
        self.queue: EditQueue | None = None
        self.live: Live | None = None
        self.batcher: GenerateBatcher | None = None
        self.load_error: str | None = None
        self._stop = threading.Event()
        self._threads: list[tuple[threading.Thread, threading.Event]] = []
        self._loader: asyncio.Task | None = None

    # ---- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        self.db = await asyncio.to_thread(open_database, self.settings)
        self.queue = open_queue(self.settings)
        if self._loaded_model is not None:
            await self._go_live()
        else:
            self._loader = asyncio.get_running_loop().create_task(self._go_live(), name="model-loader")

    async def _go_live(self) -> None:
        try:
            live = await asyncio.to_thread(build_live, self.settings, self.db, self._loaded_model)
        except Exception as exc:
            log.exception("the model could not be loaded")
            self.load_error = f"{type(exc).__name__}: {exc}"
            return
        self._loaded_model = None
        self.batcher = GenerateBatcher(live.editor, self.settings.batch_window_ms, self.settings.max_batch,
                                       on_batch=self.metrics.observe_batch)
        self.batcher.start()
        if self.settings.run_embedded_worker:
            if isinstance(self.queue, MemoryQueue):
                # The in-process queue starts empty: whatever was waiting before a restart is re-sent.
                await asyncio.to_thread(self._requeue_unfinished)
            worker = EditWorker(live, self.db, self.queue, max_deliveries=self.settings.max_deliveries,
                                claim_idle_ms=self.settings.claim_idle_ms,
                                requeue_after_s=self.settings.requeue_after_s,
                                block_ms=500)
            self._threads.append(start_thread(worker))
        self.live = live
        thread = threading.Thread(target=self._follow, name="live-sync", daemon=True)
        thread.start()
        self._threads.append((thread, self._stop))
        log.info("model %s live with %d edits (version %d)", live.model_name, len(live.editor.edit_ids),
                 live.editor.version)

    def _requeue_unfinished(self) -> None:
        with self.db.session() as session:
            ids = repo.unfinished_ids(session)
        for edit_id in ids:
            self.queue.enqueue(edit_id)
        if ids:
            log.info("re-queued %d unfinished edits", len(ids))

    def _follow(self) -> None:
        """Apply events from other processes, and reconcile with the database periodically."""
        subscription = None
        last = time.monotonic()
        while not self._stop.is_set():
            try:
                if subscription is None:
                    subscription = self.queue.subscribe()
                event = subscription.get(timeout=min(1.0, self.settings.reconcile_seconds))
            except QueueUnavailable as exc:
                log.warning("event subscription lost (%s); reconciling from the database only", exc)
                subscription = None
                event = None
                self._stop.wait(1.0)
            if event is not None or time.monotonic() - last >= self.settings.reconcile_seconds:
                try:
                    self.live.sync.reconcile()
                except Exception:
                    log.exception("reconciliation with the database failed; retrying later")
                last = time.monotonic()
        if subscription is not None:
            subscription.close()

    async def stop(self) -> None:
        if self._loader is not None and not self._loader.done():
            try:
                await self._loader
            except Exception:
                pass
        self._stop.set()
        for _thread, stop in self._threads:
            stop.set()
        for thread, _stop in self._threads:
            await asyncio.to_thread(thread.join, 30)
        if self.batcher is not None:
            await self.batcher.stop()
        if self.queue is not None:
            self.queue.close()
        if self.db is not None:
            self.db.close()

    # ---- access ---------------------------------------------------------------------------------

    def require_live(self) -> Live:
        if self.live is None:
            if self.load_error:
                raise NotReady(f"the model failed to load: {self.load_error}")
            raise NotReady("the model is still loading")
        return self.live

    def check_ready(self) -> Live:
        live = self.require_live()
        try:
            self.db.ping()
        except Exception as exc:
            raise NotReady(f"database unreachable: {type(exc).__name__}") from exc
        try:
            self.queue.ping()
        except QueueUnavailable as exc:
            raise NotReady(f"queue unreachable: {exc}") from exc
        return live

    def live_ids(self) -> set[str]:
        return set(self.live.editor.edit_ids) if self.live is not None else set()
