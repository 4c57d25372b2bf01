"""Everything one API process owns, started and stopped by the app's lifespan.

The model loads in a background thread unless one is passed in, so /health answers
at once and /ready says 503 until the model is live.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from app.api.auth import KeyRing
from app.api.batching import GenerateBatcher
from app.api.errors import NotReady
from app.api.metrics import Metrics
from app.api.services.limits import EditLimits
from app.api.streaming import TokenStream
from app.db.session import Database
from app.live import ServedModel, build_served_model, load_configured_model, open_database, open_queue
from app.live.generation import Completion, Generator, Routed, Sampling
from app.models import LoadedModel
from app.queue import EditChanged, EditQueue, QueueUnavailable, Subscription
from app.scen.chats import Prompt, PromptRow
from app.settings import Settings
from workers.embedded import start_embedded_worker, start_worker_process

log = logging.getLogger(__name__)


class Service:
    def __init__(self, settings: Settings, db: Database, queue: EditQueue,
                 on_fatal: Callable[[str], None] | None = None, metrics: Metrics | None = None):
        self.settings = settings
        # Told why when the model cannot be served at all: ``scen serve`` exits with the reason
        # rather than staying up never ready. Without it /ready keeps answering 503 with the reason.
        self.on_fatal = on_fatal
        self.db = db
        self.queue = queue
        self.keys = KeyRing(settings.api_key_entries, db)
        self.metrics = metrics or Metrics()
        self.metrics.watch_state(db, queue)
        self.started_at = int(time.time())  # the /v1/models "created" time
        self.served: ServedModel | None = None
        self.generator: Generator | None = None
        self.batcher: GenerateBatcher | None = None
        self.limits: EditLimits | None = None
        self.load_error: str | None = None
        self._stop = threading.Event()
        self._threads: list[tuple[threading.Thread, threading.Event]] = []
        self._loader: asyncio.Task[None] | None = None

    # ---- lifecycle ------------------------------------------------------------------------------

    @classmethod
    async def start(cls, settings: Settings, loaded_model: LoadedModel | None = None,
                    on_fatal: Callable[[str], None] | None = None, metrics: Metrics | None = None) -> Service:
        """Open the database and queue; serve ``loaded_model`` at once, or load ``settings.model``
        in the background."""
        db = await asyncio.to_thread(open_database, settings)
        service = cls(settings, db, open_queue(settings), on_fatal, metrics)
        if service.keys.open:
            log.warning("no API keys: the service is OPEN, every client may read, edit and roll back "
                        "(set SCEN_API_KEYS or run `scen keys create`)")
        else:
            log.info("API keys required (%d configured, %d in the database)", len(service.keys.configured),
                     service.keys.stored)
        if loaded_model is not None:
            await service._go_live(loaded_model)
        else:
            service._loader = asyncio.get_running_loop().create_task(service._go_live(None), name="model-loader")
        return service

    async def _go_live(self, loaded_model: LoadedModel | None) -> None:
        try:
            loaded = loaded_model or await asyncio.to_thread(load_configured_model, self.settings)
            if self._worker_mode == "process":
                # Before the model is served, so no edit can be posted while the worker starts; and
                # before this process's editor changes the model the child may be handed a copy of.
                # The child loads a configured model itself, once it is converted here.
                self._threads.append(await asyncio.to_thread(
                    start_worker_process, self.settings, self.db, self.queue, self.metrics.registry,
                    loaded_model))
            served = await asyncio.to_thread(build_served_model, self.settings, self.db, loaded)
        except Exception as exc:
            log.exception("the model could not be loaded")
            self.load_error = f"{type(exc).__name__}: {exc}"
            if self.on_fatal is not None:
                self.on_fatal(f"the model could not be loaded: {self.load_error}")
            return
        self.limits = EditLimits(served.editor)
        self.generator = Generator(served.editor)
        self.batcher = GenerateBatcher(self.generator, self.settings.batch_window_ms, self.settings.max_batch,
                                       on_batch=self.metrics.observe_batch)
        self.batcher.start()
        if self._worker_mode == "thread":
            # Before the model is served, so no edit can be posted while the worker starts.
            worker = await asyncio.to_thread(start_embedded_worker, self.settings, served, self.db, self.queue,
                                             self.metrics.registry)
            self._threads.append(worker)
        self.served = served
        follower = threading.Thread(target=self._follow, args=(served,), name="live-sync", daemon=True)
        follower.start()
        self._threads.append((follower, self._stop))
        log.info("model %s live with %d edits (version %d)", served.model_name, len(served.editor.edit_ids),
                 served.editor.version)

    @property
    def _worker_mode(self) -> str | None:
        """Where this process's embedded worker runs: "process", "thread", or None (no worker)."""
        return self.settings.embedded_worker_mode if self.settings.run_embedded_worker else None

    def _follow(self, served: ServedModel) -> None:
        """Apply events from other processes, and reconcile with the database periodically."""
        subscription: Subscription | None = None
        last = time.monotonic()
        while not self._stop.is_set():
            event: dict[str, Any] | None = None
            try:
                if subscription is None:
                    subscription = self.queue.subscribe()
                event = subscription.get(timeout=min(1.0, self.settings.reconcile_seconds))
            except QueueUnavailable as exc:
                log.warning("event subscription lost (%s); reconciling from the database only", exc)
                subscription = None
                self._stop.wait(1.0)
            if event is not None:
                log.debug("reconciling after %s", EditChanged.from_dict(event) or event)
            if event is not None or time.monotonic() - last >= self.settings.reconcile_seconds:
                try:
                    served.sync.reconcile()
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
        self.queue.close()
        self.db.close()

    # ---- access ---------------------------------------------------------------------------------

    def require_served(self) -> ServedModel:
        if self.served is None:
            if self.load_error:
                raise NotReady(f"the model failed to load: {self.load_error}")
            raise NotReady("the model is still loading")
        return self.served

    def check_edit(self, prompt: str, target: str, rephrases: list[str], subject: str | None) -> None:
        """Raise ``InvalidEditError`` when the engine could not train the edit; never waits for the model."""
        self.require_served()
        if self.limits is None:  # set before the model is served; never None here
            raise NotReady("the model is still loading")
        self.limits.check(prompt, target, rephrases, subject)

    def check_ready(self) -> ServedModel:
        served = self.require_served()
        # Clients learn which dependency is down; where it is (host, port) goes to the log only.
        try:
            self.db.ping()
        except Exception as exc:
            log.warning("not ready: the database is unreachable: %s", exc)
            raise NotReady("the database is unreachable") from exc
        try:
            self.queue.ping()
        except QueueUnavailable as exc:
            log.warning("not ready: the queue is unreachable: %s", exc)
            raise NotReady("the queue is unreachable") from exc
        return served

    def live_ids(self) -> set[str]:
        return set(self.served.editor.edit_ids) if self.served is not None else set()

    def unserved(self) -> dict[str, str]:
        """Active edits this process cannot serve, with the reason."""
        return self.served.sync.unserved if self.served is not None else {}

    def reconcile(self) -> None:
        """Bring this process's model up to date with the database at once."""
        if self.served is not None:
            self.served.sync.reconcile()

    async def complete(self, prompt: Prompt, sampling: Sampling) -> Completion:
        """The whole answer; concurrent requests share model calls. Raises ``UnsupportedChat``
        for a chat the model cannot be asked."""
        generator, batcher = self._generation()
        started = time.perf_counter()
        row = await self._encode(generator, prompt)
        result = await batcher.submit(row, sampling)
        self.metrics.observe_generation("whole", time.perf_counter() - started, result.prompt_tokens,
                                        result.completion_tokens)
        return result

    async def stream(self, prompt: Prompt, sampling: Sampling) -> tuple[TokenStream, Routed]:
        """A running generation, once its prompt has been routed, and the route."""
        generator, _ = self._generation()
        started = time.perf_counter()
        row = await self._encode(generator, prompt)
        prompt_tokens = 0

        def finished(completion_tokens: int) -> None:
            self.metrics.observe_generation("stream", time.perf_counter() - started, prompt_tokens, completion_tokens)

        stream = TokenStream(generator, row, sampling, on_finished=finished)
        routed = await stream.start()
        prompt_tokens = routed.prompt_tokens
        return stream, routed

    def _generation(self) -> tuple[Generator, GenerateBatcher]:
        self.require_served()
        self.metrics.generate_requests.inc()
        if self.generator is None or self.batcher is None:  # set before the model is served; never None here
            raise NotReady("the model is still loading")
        return self.generator, self.batcher

    @staticmethod
    async def _encode(generator: Generator, prompt: Prompt) -> PromptRow:
        # Off the event loop: the tokenizer's lock may be held by a stream decoding a token.
        return await asyncio.to_thread(generator.encode, prompt)
