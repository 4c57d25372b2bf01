"""Prometheus metrics of one API process, served at ``/metrics``.

Four sources, one registry:

- **Requests**: count, latency and sizes per route and status, by prometheus-fastapi-instrumentator
  (``http_requests_total``, ``http_request_duration_seconds``, ...).
- **This process**: generation latency and tokens, batch sizes, its live model and the cache of
  its experts (hits, loads, evictions, what is resident), the process itself (``process_*``,
  ``python_*``).
- **Shared state, read at scrape time**: edits by status from the database, the queue's depth
  and its oldest waiting edit. Every API process reports the same values (aggregate with
  ``max``, not ``sum``).
- **The embedded worker** (``scen serve`` without Redis): training seconds and steps, time from
  post to active, failures by reason (``workers.metrics``). A separate ``scen worker`` serves
  those on its own port (``SCEN_WORKER_METRICS_PORT``) for Prometheus to scrape there.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable

from fastapi import FastAPI
from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_fastapi_instrumentator import Instrumentator

from app.db import edits as repo
from app.db.models import EditStatus
from app.db.session import Database
from app.live import ServedModel
from app.queue import EditQueue
from app.scen.expert_cache import CacheStats

log = logging.getLogger(__name__)

# Seconds: from a tiny model's millisecond answers to a long generation on a CPU.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        # The process's CPU, memory and file descriptors, Python's GC and version, as
        # prometheus_client reports them for its default registry.
        for collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
            self.registry.register(collector)
        self.edits_created = Counter("scen_edits_created", "Edits accepted", registry=self.registry)
        self.generate_requests = Counter("scen_generate_requests", "Generate requests", registry=self.registry)
        self.batch_size = Histogram("scen_generate_batch_size", "Prompts per model call",
                                    buckets=(1, 2, 4, 8, 16, 32, 64), registry=self.registry)
        self.generation_seconds = Histogram(
            "scen_generation_seconds", "Time to answer a generation request (mode whole: waiting for a batch "
            "included; stream: to the last token)", ["mode"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.generation_tokens = Counter("scen_generation_tokens", "Tokens of generation requests: the "
                                         "prompt's as the model read them, and those generated", ["kind"],
                                         registry=self.registry)
        for kind in ("prompt", "completion"):
            self.generation_tokens.labels(kind)
        self.live_edits = Gauge("scen_live_edits", "Edits routed to by this process", registry=self.registry)
        self.model_version = Gauge("scen_model_version", "Live model version", registry=self.registry)
        self.unserved_edits = Gauge("scen_unserved_edits", "Active edits this process cannot serve: their expert "
                                    "file is missing or unreadable", registry=self.registry)
        self.batch_sizes: list[int] = []  # recent batch sizes, for tests and benchmarks
        self.expert_cache = ExpertCacheCollector()
        self.registry.register(self.expert_cache)
        self._state: StateCollector | None = None

    def instrument(self, app: FastAPI) -> None:
        """Count and time every request by route template, method and status (call before start-up)."""
        Instrumentator(should_group_status_codes=False, should_ignore_untemplated=False,
                       should_group_untemplated=True, registry=self.registry).instrument(
            app, latency_lowr_buckets=LATENCY_BUCKETS)

    def watch_state(self, db: Database, queue: EditQueue) -> None:
        """Report edits by status and the queue at every scrape."""
        if self._state is not None:  # the app started again (a test client entered twice)
            self.registry.unregister(self._state)
        self._state = StateCollector(db, queue)
        self.registry.register(self._state)

    def observe_batch(self, n: int) -> None:
        self.batch_size.observe(n)
        self.batch_sizes = (self.batch_sizes + [n])[-1000:]

    def observe_generation(self, mode: str, seconds: float, prompt_tokens: int, completion_tokens: int) -> None:
        self.generation_seconds.labels(mode).observe(seconds)
        self.generation_tokens.labels("prompt").inc(prompt_tokens)
        self.generation_tokens.labels("completion").inc(completion_tokens)

    def render(self, served: ServedModel | None) -> bytes:
        """The text exposition format; gauges are read from the model at scrape time."""
        if served is not None:
            self.live_edits.set(len(served.editor.edit_ids))
            self.model_version.set(served.editor.version)
            self.unserved_edits.set(len(served.sync.unserved))
        self.expert_cache.stats = served.editor.expert_cache.stats() if served is not None else None
        return generate_latest(self.registry)


class ExpertCacheCollector(Collector):
    """The live experts' cache as last read by ``Metrics.render``: its counters are the
    cache's own, so they are reported as they stand rather than incremented here."""

    def __init__(self) -> None:
        self.stats: CacheStats | None = None

    def describe(self) -> Iterable[Metric]:
        return self._families(CacheStats())

    def collect(self) -> Iterable[Metric]:
        return self._families(self.stats or CacheStats())

    @staticmethod
    def _families(stats: CacheStats) -> list[Metric]:
        return [
            CounterMetricFamily("scen_expert_cache_hits", "Routed batches' experts found resident (one per "
                                "expert and batch)", value=stats.hits),
            CounterMetricFamily("scen_expert_cache_loads", "Experts loaded from the store because a routed batch "
                                "needed one not resident", value=stats.loads),
            CounterMetricFamily("scen_expert_cache_load_failures", "Experts a routed batch needed that could not "
                                "be loaded (its rows got the base model)", value=stats.load_failures),
            CounterMetricFamily("scen_expert_cache_evictions", "Experts let go, least recently used first, to "
                                "stay within SCEN_EXPERT_CACHE_MB", value=stats.evictions),
            GaugeMetricFamily("scen_expert_cache_resident_experts", "Experts held in memory",
                              value=stats.resident),
            GaugeMetricFamily("scen_expert_cache_resident_bytes", "Bytes of the experts held in memory",
                              value=stats.resident_bytes),
        ]


class StateCollector(Collector):
    """Edits by status, the queue's depth and the age of its oldest waiting edit, read when
    scraped. A database or queue that does not answer leaves its families out of that scrape
    (``scen_state_up`` says which), never the scrape itself."""

    def __init__(self, db: Database, queue: EditQueue):
        self.db = db
        self.queue = queue

    def describe(self) -> Iterable[Metric]:
        return list(self._families())

    def collect(self) -> Iterable[Metric]:
        up = GaugeMetricFamily("scen_state_up", "Whether the last scrape could read the database and the "
                               "queue", labels=["source"])
        families = self._families()
        by_status, depth, taken, oldest = families
        try:
            with self.db.session() as session:
                counts = repo.count_by_status(session)
                since = repo.oldest_waiting(session)
            for status in EditStatus:
                by_status.add_metric([status.value], counts.get(status.value, 0))
            oldest.add_metric([], 0.0 if since is None else max(0.0, time.time() - since.timestamp()))
            yield by_status
            yield oldest
            up.add_metric(["database"], 1)
        except Exception as exc:
            log.warning("metrics: the database did not answer: %s", type(exc).__name__)
            up.add_metric(["database"], 0)
        try:
            depth.add_metric([], len(self.queue.queued_edit_ids()))
            taken.add_metric([], self.queue.pending())
            yield depth
            yield taken
            up.add_metric(["queue"], 1)
        except Exception as exc:
            log.warning("metrics: the queue did not answer: %s", type(exc).__name__)
            up.add_metric(["queue"], 0)
        yield up

    @staticmethod
    def _families() -> tuple[GaugeMetricFamily, GaugeMetricFamily, GaugeMetricFamily, GaugeMetricFamily]:
        return (
            GaugeMetricFamily("scen_edits", "Edits by status, in the database (every process reports the same)",
                              labels=["status"]),
            GaugeMetricFamily("scen_queue_depth", "Edits with a message in the queue, taken by a worker or not"),
            GaugeMetricFamily("scen_queue_taken", "Messages a worker has taken and not yet acknowledged"),
            GaugeMetricFamily("scen_queue_oldest_waiting_seconds", "Age of the oldest queued edit not yet taken "
                              "by a worker (0: none waiting)"),
        )
