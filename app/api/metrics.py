"""Prometheus metrics of one API process."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from app.live import ServedModel


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.edits_created = Counter("scen_edits_created", "Edits accepted", registry=self.registry)
        self.generate_requests = Counter("scen_generate_requests", "Generate requests", registry=self.registry)
        self.batch_size = Histogram("scen_generate_batch_size", "Prompts per model call",
                                    buckets=(1, 2, 4, 8, 16, 32, 64), registry=self.registry)
        self.live_edits = Gauge("scen_live_edits", "Edits routed to by this process", registry=self.registry)
        self.model_version = Gauge("scen_model_version", "Live model version", registry=self.registry)
        self.unserved_edits = Gauge("scen_unserved_edits", "Active edits this process cannot serve: their expert "
                                    "file is missing or unreadable", registry=self.registry)
        self.batch_sizes: list[int] = []  # recent batch sizes, for tests and benchmarks

    def observe_batch(self, n: int) -> None:
        self.batch_size.observe(n)
        self.batch_sizes = (self.batch_sizes + [n])[-1000:]

    def render(self, served: ServedModel | None) -> bytes:
        """The text exposition format; gauges are read from the model at scrape time."""
        if served is not None:
            self.live_edits.set(len(served.editor.edit_ids))
            self.model_version.set(served.editor.version)
            self.unserved_edits.set(len(served.sync.unserved))
        return generate_latest(self.registry)
