"""A streamed generation: the model runs in a thread of its own, the event loop reads its events.

Streams are not batched: each is one sequence and one model call, waiting for the editor's
lock like any other. A thread per stream (not the shared executor) so streams queued on the
lock never starve the batcher of threads.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable

from app.live.generation import Finished, Generator, Routed, Sampling, StreamEvent
from app.scen.chats import PromptRow

_END = object()


class TokenStream:
    def __init__(self, generator: Generator, prompt: PromptRow, sampling: Sampling,
                 on_finished: Callable[[int], None] | None = None):
        """``on_finished(completion_tokens)``: told once the stream has sent its last token."""
        self._generator, self._prompt, self._sampling = generator, prompt, sampling
        self._on_finished = on_finished
        self._events: asyncio.Queue[StreamEvent | BaseException | object] = asyncio.Queue()
        self._cancelled = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None

    async def start(self) -> Routed:
        """Start generating; once the prompt has been routed, the route. Raises what failed before."""
        self._loop = asyncio.get_running_loop()
        threading.Thread(target=self._run, name="generate-stream", daemon=True).start()
        try:
            first = await self._events.get()
        except asyncio.CancelledError:  # the client left while the prompt waited for the model
            self.cancel()
            raise
        if isinstance(first, Routed):
            return first
        self.cancel()
        if isinstance(first, BaseException):
            raise first
        raise RuntimeError("the generation ended before the prompt was routed")

    async def events(self) -> AsyncIterator[StreamEvent]:
        """The events after ``Routed``, ending with ``Finished``; raises a failure met on the way."""
        while (event := await self._events.get()) is not _END:
            if isinstance(event, BaseException):
                raise event
            if isinstance(event, Finished) and self._on_finished is not None:
                self._on_finished(event.completion_tokens)
            yield event  # type: ignore[misc]  # the queue holds events, failures and _END only

    def cancel(self) -> None:
        """The client went away: the model stops at its next token and the lock is freed."""
        self._cancelled.set()

    def _run(self) -> None:
        try:
            self._generator.stream(self._prompt, self._sampling, self._put, self._cancelled)
        except BaseException as exc:  # handed to the reader, which logs or answers it
            self._put(exc)
        finally:
            self._put(_END)

    def _put(self, item: StreamEvent | BaseException | object) -> None:
        assert self._loop is not None
        try:
            self._loop.call_soon_threadsafe(self._events.put_nowait, item)
        except RuntimeError:  # the loop has closed (shutdown): nobody is reading
            self._cancelled.set()
