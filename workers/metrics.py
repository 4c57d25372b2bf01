"""What a worker measures: training, time from post to active, failures, and its heartbeat.

A worker inside ``scen serve`` registers these in the API's registry (one ``/metrics``); a
``scen worker`` process serves them with its process metrics on ``SCEN_WORKER_METRICS_PORT``.
"""

from __future__ import annotations

import json
import os
import threading
import time
import weakref
from dataclasses import dataclass
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# Why an edit ended failed: the engine refused it, every delivery's training raised, or
# deliveries ran out with no worker finishing (workers killed or stuck).
FAILURE_REASONS = ("invalid_edit", "training_error", "abandoned")

_by_registry: weakref.WeakKeyDictionary[CollectorRegistry, WorkerMetrics] = weakref.WeakKeyDictionary()
_lock = threading.Lock()


class WorkerMetrics:
    def __init__(self, registry: CollectorRegistry):
        self.training_seconds = Histogram(
            "scen_training_seconds", "Seconds to train an edit's expert and indexing neuron",
            buckets=(0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600), registry=registry)
        self.training_steps = Histogram(
            "scen_training_steps", "Optimiser steps of an edit's expert", buckets=(1, 2, 5, 10, 20, 40, 80, 160, 320),
            registry=registry)
        self.post_to_active = Histogram(
            "scen_edit_post_to_active_seconds", "Seconds from an edit's post to its activation",
            buckets=(0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800, 3600), registry=registry)
        self.failures = Counter("scen_edit_failures", "Edits that ended failed, by reason", ["reason"],
                                registry=registry)
        for reason in FAILURE_REASONS:
            self.failures.labels(reason)
        self.heartbeat = Gauge("scen_worker_heartbeat_timestamp_seconds", "When a worker's loop last turned",
                               ["worker"], registry=registry)

    @classmethod
    def of(cls, registry: CollectorRegistry) -> WorkerMetrics:
        """The one set of worker metrics of ``registry`` (workers of one process share it)."""
        with _lock:
            metrics = _by_registry.get(registry)
            if metrics is None:
                metrics = _by_registry[registry] = cls(registry)
            return metrics


@dataclass(frozen=True)
class Beat:
    worker: str
    pid: int
    at: float


class Heartbeat:
    """A file a worker rewrites while its loop turns (at most once a second), for ``scen worker --check``."""

    def __init__(self, path: Path, worker: str):
        self.path = Path(path)
        self.worker = worker
        self._last = 0.0

    def beat(self) -> None:
        now = time.time()
        if now - self._last < 1.0:
            return
        self._last = now
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}")
            tmp.write_text(json.dumps({"worker": self.worker, "pid": os.getpid(), "at": now}))
            os.replace(tmp, self.path)
        except OSError:
            pass  # a full or read-only disk shows as a stale heartbeat, which is the point


def check(path: Path, max_age_s: float) -> tuple[bool, str]:
    """Whether a worker's heartbeat at ``path`` is fresh, and a line saying so."""
    try:
        data = json.loads(Path(path).read_text())
        beat = Beat(str(data["worker"]), int(data["pid"]), float(data["at"]))
    except FileNotFoundError:
        return False, f"no heartbeat at {path}: the worker has not started its loop"
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return False, f"unreadable heartbeat at {path}: {exc}"
    age = time.time() - beat.at
    if age > max_age_s:
        return False, f"worker {beat.worker} last beat {age:.0f}s ago (more than {max_age_s:.0f}s)"
    return True, f"worker {beat.worker} alive (beat {age:.1f}s ago)"
