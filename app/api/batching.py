"""Batching concurrent /generate requests into one model call.

Requests wait a few milliseconds for company; whatever arrives while the model
is busy forms the next batch, so under load batches fill without extra waiting.
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

from app.scen import Editor, Generation

log = logging.getLogger(__name__)


@dataclass
class _Request:
    prompt: str
    max_new_tokens: int
    temperature: float
    seed: int | None
    future: asyncio.Future = field(repr=False)

    @property
    def key(self) -> tuple:
        # One model call serves one setting of these; requests that differ go in separate calls.
        return (self.max_new_tokens, self.temperature, self.seed)


class GenerateBatcher:
    def __init__(self, editor: Editor, window_ms: float = 5.0, max_batch: int = 16,
                 on_batch: Callable[[int], None] | None = None):
        self.editor = editor
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

    async def submit(self, prompt: str, max_new_tokens: int, temperature: float,
                     seed: int | None = None) -> tuple[Generation, int]:
        future = asyncio.get_running_loop().create_future()
        await self._queue.put(_Request(prompt, max_new_tokens, temperature, seed, future))
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
            groups: dict[tuple, list[_Request]] = defaultdict(list)
            for request in batch:
                if not request.future.done():  # the client may have gone away
                    groups[request.key].append(request)
            for (max_new_tokens, temperature, seed), requests in groups.items():
                if self.on_batch is not None:
                    self.on_batch(len(requests))
                try:
                    results, version = await asyncio.to_thread(
                        self._generate, [r.prompt for r in requests], max_new_tokens, temperature, seed
                    )
                except Exception as exc:
                    log.exception("generation of a batch of %d failed", len(requests))
                    for r in requests:
                        if not r.future.done():
                            r.future.set_exception(exc)
                    continue
                for r, result in zip(requests, results):
                    if not r.future.done():
                        r.future.set_result((result, version))

    def _generate(self, prompts: list[str], max_new_tokens: int, temperature: float,
                  seed: int | None) -> tuple[list[Generation], int]:
        results = self.editor.generate(prompts, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed)
        # Each generation carries the live version that answered it; one batch runs under one lock.
        return results, results[0].model_version
