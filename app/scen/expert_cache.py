"""Live experts held within a memory budget, the least recently used out first.

An edit's neuron and keys are small and stay resident: routing reads every neuron for
every prompt, and training a new edit reads every earlier edit's keys. Its expert is
what grows with each edit (a full delta is d x h floats, 3.5 MB on SmolLM2), and a
prompt needs only the one expert it is routed to. So experts are held here by edit id,
within ``budget_bytes``, and loaded again on demand by ``load(edit_id)``.

Without a loader nothing is evicted: an expert that could not come back must stay.
That is the engine's default (evaluation, tests): every expert resident, as before.

Thread safety: the cache's own lock keeps its table and counters consistent for
readers such as a metrics scrape. It does not stop an expert in use from being
evicted; whoever uses one holds a reference to it for as long as it needs it (a
routed batch holds the experts it resolved at prefill until its last decode step).
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch

from app.scen.errors import ScenError
from app.scen.experts import Expert

log = logging.getLogger(__name__)


class ExpertUnavailableError(ScenError):
    """A live edit's expert is not resident and cannot be loaded."""


@dataclass(frozen=True)
class CacheStats:
    hits: int = 0  # an expert wanted and found resident
    loads: int = 0  # an expert wanted, not resident, loaded
    load_failures: int = 0  # an expert wanted, not resident, and its load failed
    evictions: int = 0
    resident: int = 0  # experts held now
    resident_bytes: int = 0
    budget_bytes: int | None = None  # None: no bound


def expert_bytes(expert: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in itertools.chain(expert.parameters(), expert.buffers()))


class InCache(Expert):
    """Stands for the expert in an edit's record: the expert itself is the cache's to hold."""

    kind = "in-cache"

    def forward(self, k: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("this record's expert is held by the expert cache; Editor.get fetches it")


class NotLoaded(Expert):
    """Stands for an expert not read yet (an edit brought live from its routing part alone):
    ``ExpertCache.put`` makes the edit live with nothing resident, and its first ``get`` loads
    the expert, as it loads one paged out."""

    kind = "not-loaded"

    def forward(self, k: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("this expert has not been read; the expert cache loads it")


NOT_LOADED = NotLoaded()  # one for every edit: it holds nothing


class ExpertCache:
    """Experts of the live edits by edit id; at most ``budget_bytes`` of them resident when
    ``load`` can bring the others back (an expert larger than the budget stays alone)."""

    def __init__(self, budget_bytes: int | None = None, load: Callable[[str], Expert] | None = None):
        self._lock = threading.Lock()
        self._live: set[str] = set()
        self._resident: OrderedDict[str, tuple[Expert, int]] = OrderedDict()  # least recently used first
        self._bytes = 0
        self._failed: set[str] = set()  # not tried again until put back or dropped
        self._hits = self._loads = self._load_failures = self._evictions = 0
        self.budget_bytes: int | None = None
        self.load: Callable[[str], Expert] | None = None
        self.configure(budget_bytes, load)

    def configure(self, budget_bytes: int | None, load: Callable[[str], Expert] | None) -> None:
        if budget_bytes is not None and budget_bytes <= 0:
            raise ValueError(f"budget_bytes must be positive or None, got {budget_bytes}")
        with self._lock:
            self.budget_bytes, self.load = budget_bytes, load
            self._evict()

    def __len__(self) -> int:
        return len(self._live)

    def __contains__(self, key: str) -> bool:
        return key in self._live

    def resident(self, key: str) -> bool:
        return key in self._resident

    def put(self, key: str, expert: Expert) -> None:
        """Make ``key`` live with ``expert`` resident (the most recently used); with a
        ``NotLoaded`` expert, live with nothing resident, loaded when first wanted."""
        with self._lock:
            self._live.add(key)
            if not isinstance(expert, NotLoaded):
                self._hold(key, expert)

    def drop(self, key: str) -> None:
        """``key`` is no longer live: forget it, resident or not."""
        with self._lock:
            self._live.discard(key)
            self._failed.discard(key)
            entry = self._resident.pop(key, None)
            if entry is not None:
                self._bytes -= entry[1]

    def clear(self) -> None:
        with self._lock:
            self._live.clear()
            self._failed.clear()
            self._resident.clear()
            self._bytes = 0

    def peek(self, key: str) -> Expert | None:
        """The expert of ``key`` if it is resident, else None; loads nothing, counts nothing."""
        with self._lock:
            entry = self._resident.get(key)
            return entry[0] if entry is not None else None

    def get(self, key: str) -> Expert | None:
        """The expert of live ``key``, loaded if it is not resident; None when it cannot be
        loaded (logged once; not tried again until ``put`` brings it back)."""
        with self._lock:
            if key not in self._live:
                raise KeyError(key)
            entry = self._resident.get(key)
            if entry is not None:
                self._resident.move_to_end(key)
                self._hits += 1
                return entry[0]
            if key in self._failed:
                return None
            load = self.load
        try:
            if load is None:
                raise ExpertUnavailableError(f"the expert of {key} is not resident and there is no loader")
            expert = load(key)
        except Exception as exc:
            with self._lock:
                self._load_failures += 1
                if key in self._live:
                    self._failed.add(key)
            log.error("the expert of edit %s cannot be loaded; prompts routed to it get the base model "
                      "until it can: %s", key, exc)
            return None
        with self._lock:
            self._loads += 1
            # Dropped while it loaded (rolled back): it must not come back.
            if key in self._live:
                self._hold(key, expert)
        return expert

    def stats(self) -> CacheStats:
        with self._lock:
            return CacheStats(self._hits, self._loads, self._load_failures, self._evictions, len(self._resident),
                              self._bytes, self.budget_bytes)

    def _hold(self, key: str, expert: Expert) -> None:
        old = self._resident.pop(key, None)
        if old is not None:
            self._bytes -= old[1]
        size = expert_bytes(expert)
        self._resident[key] = (expert, size)
        self._bytes += size
        self._failed.discard(key)
        self._evict()

    def _evict(self) -> None:
        """Least recently used out until within budget, never the most recent one."""
        if self.budget_bytes is None or self.load is None:
            return
        while self._bytes > self.budget_bytes and len(self._resident) > 1:
            _, (_, size) = self._resident.popitem(last=False)
            self._bytes -= size
            self._evictions += 1
