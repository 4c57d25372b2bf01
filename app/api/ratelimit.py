"""Per-client rate limiting of the routes that change state (``SCEN_RATE_LIMIT_PER_MINUTE``).

A token bucket per client address: up to a minute's allowance at once, refilled evenly.
Reads and /generate are not limited here (generation is bounded by batching). Behind a
proxy every client shares the proxy's address; limit there instead.
"""

from __future__ import annotations

import math
import threading
import time

from starlette.types import ASGIApp, Receive, Scope, Send

from app.api.errors import error_response

_MUTATING = {"POST", "PUT", "PATCH", "DELETE"}
_UNLIMITED_PATHS = {"/generate"}
# Clients idle this long have a full bucket again and are forgotten.
_FORGET_AFTER_S = 60.0


class RateLimit:
    """ASGI middleware answering 429 (``rate_limited``, with ``Retry-After``) once a client
    has used up its allowance."""

    def __init__(self, app: ASGIApp, per_minute: int):
        self.app = app
        self.capacity = float(per_minute)
        self.refill_per_s = per_minute / 60.0
        self._buckets: dict[str, tuple[float, float]] = {}  # client -> (tokens, when)
        self._lock = threading.Lock()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] in _MUTATING and scope["path"] not in _UNLIMITED_PATHS:
            client = scope.get("client")
            wait_s = self._take(client[0] if client else "unknown")
            if wait_s > 0:
                response = error_response(429, "too many requests; retry later", "rate_limited",
                                          {"Retry-After": str(math.ceil(wait_s))})
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def _take(self, client: str) -> float:
        """Take one token; 0, or the seconds until one is available."""
        now = time.monotonic()
        with self._lock:
            if len(self._buckets) > 10_000:
                self._buckets = {c: b for c, b in self._buckets.items() if now - b[1] < _FORGET_AFTER_S}
            tokens, when = self._buckets.get(client, (self.capacity, now))
            tokens = min(self.capacity, tokens + (now - when) * self.refill_per_s)
            if tokens < 1:
                self._buckets[client] = (tokens, now)
                return (1 - tokens) / self.refill_per_s
            self._buckets[client] = (tokens - 1, now)
            return 0.0
