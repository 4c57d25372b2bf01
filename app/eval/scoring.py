"""Batched teacher-forced scoring and greedy generation, shared by every method.

Each method only supplies a ``probe``: a context manager entered around one
batch's forward pass (or one ``generate`` call) that installs whatever the
method needs (routing, codebook look-up) and afterwards reports, per row, which
edit served it. Everything else - formatting, batching, the argmax positions,
generation limits - is the same code for all methods, so their numbers compare.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from transformers import GenerationMixin, PreTrainedModel, PreTrainedTokenizerBase

from app.scen.prompts import Batch, encode, target_ids


class Probe(Protocol):
    def served_by(self, rows: int) -> list[str | None]:
        """Per row of the batch just run: the edit that served it, None for the base model."""


ProbeFactory = Callable[[Batch], AbstractContextManager[Probe | None]]


@dataclass
class Scored:
    predicted: list[int]  # teacher-forced argmax at each target position
    target: list[int]  # target tokens + eos
    logprobs: list[float]  # log p(target token | true prefix)
    served_by: str | None


@dataclass
class Generated:
    text: str
    served_by: str | None


@contextlib.contextmanager
def no_probe(batch: Batch) -> Iterator[None]:
    yield None


def _order(lengths: Sequence[int]) -> list[int]:
    # Similar lengths together: less padding, and results are independent of batching.
    return sorted(range(len(lengths)), key=lambda i: lengths[i])


@torch.no_grad()
def teacher_forced(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    targets: Sequence[str],
    probe: ProbeFactory = no_probe,
    batch_size: int = 16,
    progress: Callable[[int], None] | None = None,
) -> list[Scored]:
    assert len(prompts) == len(targets), f"{len(prompts)} prompts, {len(targets)} targets"
    device = next(model.parameters()).device
    lengths = [len(p) + len(t) for p, t in zip(prompts, targets)]
    order = _order(lengths)
    results: dict[int, Scored] = {}
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        batch = encode(tokenizer, [prompts[i] for i in idx], [targets[i] for i in idx]).to(device)
        n = max(len(t) for t in batch.targets)
        with probe(batch) as p:
            logits = model(**batch.model_inputs(), use_cache=False, logits_to_keep=n + 1).logits[:, :n]  # (B, n, V)
            served = p.served_by(len(idx)) if p is not None else [None] * len(idx)
        logp = F.log_softmax(logits.float(), dim=-1)
        pred = logp.argmax(-1).cpu()  # (B, n)
        for row, i in enumerate(idx):
            t = batch.targets[row]
            tail = slice(n - len(t), n)
            tok = torch.tensor(t, device=logp.device)
            lp = logp[row, tail].gather(-1, tok[:, None]).squeeze(-1)
            results[i] = Scored(pred[row, tail].tolist(), list(t), lp.cpu().tolist(), served[row])
        if progress:
            progress(len(idx))
    return [results[i] for i in range(len(prompts))]


@torch.no_grad()
def greedy(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    limits: Sequence[int],
    probe: ProbeFactory = no_probe,
    batch_size: int = 16,
    progress: Callable[[int], None] | None = None,
) -> list[Generated]:
    """Greedy continuations; row i is cut to ``limits[i]`` new tokens and at its first eos.

    Cutting per row (rather than per batch) keeps each prompt's output independent
    of which prompts share its batch, so an edited model is compared with the
    unedited one on exactly the same budget.
    """
    if not isinstance(model, GenerationMixin):
        raise TypeError(f"{type(model).__name__} cannot generate text")
    device = next(model.parameters()).device
    eos = tokenizer.eos_token_id
    order = sorted(range(len(prompts)), key=lambda i: (limits[i], len(prompts[i])))
    results: dict[int, Generated] = {}
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        batch = encode(tokenizer, [prompts[i] for i in idx]).to(device)
        with probe(batch) as p:
            out = model.generate(
                input_ids=batch.input_ids,
                attention_mask=batch.attention_mask,
                max_new_tokens=max(limits[i] for i in idx),
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=eos,
            )
            served = p.served_by(len(idx)) if p is not None else [None] * len(idx)
        new = out[:, batch.input_ids.shape[1]:].cpu().tolist()
        for row, i in enumerate(idx):
            ids = new[row][: limits[i]]
            if eos in ids:
                ids = ids[: ids.index(eos)]
            text = tokenizer.decode(ids, skip_special_tokens=True)
            assert isinstance(text, str)  # one sequence of ids decodes to one string
            results[i] = Generated(text, served[row])
        if progress:
            progress(len(idx))
    return [results[i] for i in range(len(prompts))]


def generation_limit(tokenizer: PreTrainedTokenizerBase, answer: str, slack: int = 4, cap: int = 64) -> int:
    """New-token budget for a prompt whose expected answer is ``answer``: enough for it and eos."""
    return min(len(target_ids(tokenizer, answer)) + slack, cap)
