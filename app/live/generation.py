"""Generation through the editor's routing, with what OpenAI-style clients ask for besides
``Editor.generate``: chats, ``top_p``, stop strings, token counts, and streaming.

Every call runs the model inside ``Editor.routing`` exactly as ``Editor.generate`` does (same
encoding, same left padding, same seeding, same decoding), so a prompt gets the same route
and, greedily, the same text by either path. The editor's lock is held only inside that
block, for one model call, as ``Editor.generate`` holds it.

Prompts are encoded with a tokenizer of its own, before the editor's lock is taken: the
editor's tokenizer may only be used under that lock, which training holds for seconds.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from transformers import PreTrainedTokenizerBase, StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from app.scen import Editor, Route
from app.scen.chats import Prompt, PromptRow, prompt_row
from app.scen.prompts import Batch, pack

FinishReason = Literal["stop", "length"]


@dataclass(frozen=True)
class Sampling:
    """One setting of these serves one model call; requests that differ go in separate calls."""

    max_new_tokens: int = 64
    temperature: float = 0.0  # 0: greedy
    top_p: float | None = None  # None: the model's own generation config
    seed: int | None = None
    stop: tuple[str, ...] = ()

    def generate_kwargs(self) -> dict:
        if self.temperature <= 0:
            return {"do_sample": False}
        kwargs: dict = {"do_sample": True, "temperature": self.temperature}
        if self.top_p is not None:
            kwargs["top_p"] = self.top_p
        return kwargs


@dataclass
class Completion:
    text: str
    edit_id: str | None
    activation: float
    model_version: int  # the live set that answered
    prompt_tokens: int
    completion_tokens: int
    finish_reason: FinishReason


# ---- streaming events, in the order a stream sends them ----------------------------------------

@dataclass
class Routed:
    """Sent once, after the prompt's forward pass: the route and the version answering."""

    route: Route
    model_version: int
    prompt_tokens: int


@dataclass
class Delta:
    text: str


@dataclass
class Finished:
    finish_reason: FinishReason
    completion_tokens: int


StreamEvent = Routed | Delta | Finished


def cut_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    """``text`` up to the first stop string (which is left out, as OpenAI does), and whether one occurred."""
    hits = [i for i in (text.find(s) for s in stop) if i >= 0]
    return (text[:min(hits)], True) if hits else (text, False)


class Generator:
    def __init__(self, editor: Editor):
        self.editor = editor
        self._tokenizer: PreTrainedTokenizerBase = copy.deepcopy(editor.tokenizer)
        # A fast tokenizer refuses use from two threads at once; every use here is milliseconds.
        self._tokenizer_lock = threading.Lock()

    # ---- whole answers ----------------------------------------------------------------------

    def encode(self, prompt: Prompt) -> PromptRow:
        """The prompt's token row; raises ``UnsupportedChat`` for a chat this model cannot be asked."""
        with self._tokenizer_lock:
            return prompt_row(self._tokenizer, prompt)

    @torch.no_grad()
    def complete(self, prompts: Sequence[PromptRow], sampling: Sampling) -> list[Completion]:
        """One answer per prompt, in model calls of the editor's batch size."""
        results: list[Completion] = []
        size = self.editor.batch_size
        for at in range(0, len(prompts), size):
            results += self._complete_batch(prompts[at:at + size], sampling)
        return results

    def _complete_batch(self, prompts: Sequence[PromptRow], sampling: Sampling) -> list[Completion]:
        batch, lengths = self._encode(prompts)
        stops = _StopStrings(self._decode, sampling.stop, batch.input_ids.shape[1])
        editor, tokenizer = self.editor, self.editor.tokenizer
        with editor.routing(batch) as routes_of:
            if sampling.seed is not None:
                torch.manual_seed(sampling.seed)
            out = editor.model.generate(  # type: ignore[operator]  # GenerationMixin, untyped in torch
                input_ids=batch.input_ids,
                attention_mask=batch.attention_mask,
                max_new_tokens=sampling.max_new_tokens,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
                stopping_criteria=StoppingCriteriaList([stops]) if sampling.stop else None,
                **sampling.generate_kwargs(),
            )
            routes = routes_of(len(prompts))
            version = editor.version
        generated = out[:, batch.input_ids.shape[1]:].tolist()
        with self._tokenizer_lock:
            texts = self._tokenizer.batch_decode(generated, skip_special_tokens=True)
        results = []
        for row, (text, ids, route) in enumerate(zip(texts, generated, routes)):
            text, stopped = cut_at_stop(text, sampling.stop)
            n, ended = self._count(ids, stops.stopped_at.get(row))
            reason: FinishReason = "stop" if stopped or ended else "length"
            results.append(Completion(text, route.edit_id, route.activation, version, lengths[row], n, reason))
        return results

    def _count(self, ids: list[int], stopped_at: int | None) -> tuple[int, bool]:
        """Tokens the model generated for a row (finished rows are padded to the batch's
        length), and whether it ended with the end-of-sequence token."""
        eos = self.editor.tokenizer.eos_token_id
        if stopped_at is not None:
            return stopped_at, False
        if eos in ids:
            return ids.index(eos) + 1, True
        return len(ids), False

    # ---- streams ------------------------------------------------------------------------------

    @torch.no_grad()
    def stream(self, prompt: PromptRow, sampling: Sampling, emit: Callable[[StreamEvent], None],
               cancelled: threading.Event) -> None:
        """Generate for one prompt, calling ``emit`` with ``Routed``, then ``Delta``s as tokens are
        generated, then ``Finished``. Setting ``cancelled`` ends generation at the next token."""
        batch, lengths = self._encode([prompt])
        stops = _StopStrings(self._decode, sampling.stop, batch.input_ids.shape[1])
        editor, tokenizer = self.editor, self.editor.tokenizer
        with editor.routing(batch) as routes_of:
            streamer = _DeltaStreamer(
                self._decode, sampling.stop, tokenizer.eos_token_id, emit,
                on_first=lambda: emit(Routed(routes_of(1)[0], editor.version, lengths[0])),
            )
            if sampling.seed is not None:
                torch.manual_seed(sampling.seed)
            editor.model.generate(  # type: ignore[operator]  # GenerationMixin, untyped in torch
                input_ids=batch.input_ids,
                attention_mask=batch.attention_mask,
                max_new_tokens=sampling.max_new_tokens,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
                stopping_criteria=StoppingCriteriaList([stops, _Cancelled(cancelled)]),
                streamer=streamer,
                **sampling.generate_kwargs(),
            )
        streamer.finish()

    # ---- tokenizer ------------------------------------------------------------------------------

    def _encode(self, rows: Sequence[PromptRow]) -> tuple[Batch, list[int]]:
        """The batch as ``Editor.generate`` builds it (left padded, no targets), and each row's length."""
        batch = pack([r.ids for r in rows], [r.content for r in rows], [[] for _ in rows],
                     self.editor.tokenizer.pad_token_id, [r.opens for r in rows])
        return batch.to(self.editor.device), [len(r.ids) for r in rows]

    def _decode(self, ids: list[int]) -> str:
        with self._tokenizer_lock:
            return str(self._tokenizer.decode(ids, skip_special_tokens=True))


class _StopStrings(StoppingCriteria):
    """Ends each row once its decoded text holds a stop string; records how many tokens it took."""

    def __init__(self, decode: Callable[[list[int]], str], stop: Sequence[str], prompt_len: int):
        self.decode, self.stop, self.prompt_len = decode, stop, prompt_len
        self.stopped_at: dict[int, int] = {}

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        if not self.stop:
            return done  # type: ignore[return-value]
        for row in range(input_ids.shape[0]):
            if row in self.stopped_at:
                done[row] = True
                continue
            generated = input_ids[row, self.prompt_len:].tolist()
            if cut_at_stop(self.decode(generated), self.stop)[1]:
                self.stopped_at[row] = len(generated)
                done[row] = True
        return done  # type: ignore[return-value]


class _Cancelled(StoppingCriteria):
    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool,  # type: ignore[return-value]
                          device=input_ids.device)


class _DeltaStreamer(BaseStreamer):
    """Incremental decoding of one sequence: each new token's text, once it is final.

    The whole continuation is decoded again at every token, so the text sent so far is always
    a prefix of what the whole answer decodes to. Held back until a later token settles it:
    an incomplete UTF-8 character (decoded as U+FFFD) and an ending that may begin a stop string.
    """

    def __init__(self, decode: Callable[[list[int]], str], stop: Sequence[str], eos: int,
                 emit: Callable[[StreamEvent], None], on_first: Callable[[], None]):
        self.decode, self.stop, self.eos, self.emit, self.on_first = decode, stop, eos, emit, on_first
        self.ids: list[int] = []
        self.sent = ""
        self.stopped = False
        self.ended = False
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:  # generate() first hands over the prompt
            self._prompt_seen = True
            return
        if self.stopped or self.ended:
            return
        if not self.ids:
            self.on_first()  # the prompt's forward pass has run: the route is known
        token = int(value.reshape(-1)[0])
        self.ids.append(token)
        self.ended = token == self.eos
        text, self.stopped = cut_at_stop(self.decode(self.ids), self.stop)
        if not (self.stopped or self.ended):
            text = self._settled(text)
        self._send(text)

    def end(self) -> None:
        """Called by generate(); the final text is sent by ``finish``, after the lock is released."""

    def finish(self) -> None:
        text, stopped = cut_at_stop(self.decode(self.ids), self.stop)
        self._send(text)
        reason: FinishReason = "stop" if stopped or self.ended else "length"
        self.emit(Finished(reason, len(self.ids)))

    def _settled(self, text: str) -> str:
        text = text.rstrip("\ufffd")
        for keep in range(min(len(text), max((len(s) for s in self.stop), default=0)), 0, -1):
            if any(s.startswith(text[-keep:]) for s in self.stop):
                return text[:-keep]
        return text

    def _send(self, text: str) -> None:
        if len(text) > len(self.sent) and text.startswith(self.sent):
            self.emit(Delta(text[len(self.sent):]))
            self.sent = text
