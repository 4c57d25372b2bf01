"""Batching concurrent generation requests (``/generate``, ``/v1/completions`` and
``/v1/chat/completions`` without streaming) into shared model calls.

Requests wait a few milliseconds for company; whatever arrives while the model
is busy forms the next batch, so under load batches fill without extra waiting.
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

from app.live.generation import Completion, Generator, Sampling
from app.scen.chats import PromptRow

log = logging.getLogger(__name__)


@dataclass
class _Request:
    prompt: PromptRow
    sampling: Sampling  # one model call serves one setting; requests that differ go in separate calls
    future: asyncio.Future = field(repr=False)


class GenerateBatcher:
    def __init__(self, generator: Generator, window_ms: float = 5.0, max_batch: int = 16,
                 on_batch: Callable[[int], None] | None = None):
        self.generator = generator
        self.window = window_ms / 1000
        self.max_batch = max_batch
        self.on_batch = on_batch
        self._queue: asyncio.Queue[_Request] = asyncio.Queue()
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="generate-batcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        while not self._queue.empty():
            request = self._queue.get_nowait()
            if not request.future.done():
                request.future.set_exception(RuntimeError("server shutting down"))

    async def submit(self, prompt: PromptRow, sampling: Sampling) -> Completion:
        future = asyncio.get_running_loop().create_future()
        await self._queue.put(_Request(prompt, sampling, future))
        return await future

    async def _collect(self) -> list[_Request]:
        loop = asyncio.get_running_loop()
        batch = [await self._queue.get()]
        deadline = loop.time() + self.window
        while len(batch) < self.max_batch:
            if not self._queue.empty():
                batch.append(self._queue.get_nowait())
                continue
            timeout = deadline - loop.time()
            if timeout <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self._queue.get(), timeout))
            except TimeoutError:
                break
        return batch

    async def _loop(self) -> None:
        while True:
            batch = await self._collect()
            groups: dict[Sampling, list[_Request]] = defaultdict(list)
            for request in batch:
                if not request.future.done():  # the client may have gone away
                    groups[request.sampling].append(request)
            for sampling, requests in groups.items():
                if self.on_batch is not None:
                    self.on_batch(len(requests))
                try:
                    results = await asyncio.to_thread(self.generator.complete, [r.prompt for r in requests], sampling)
                except Exception as exc:
                    log.exception("generation of a batch of %d failed", len(requests))
                    for r in requests:
                        if not r.future.done():
                            r.future.set_exception(exc)
                    continue
                for r, result in zip(requests, results):
                    if not r.future.done():
                        r.future.set_result(result)
