"""Turning prompts and targets into token batches, the same way for edits and generation.

A prompt is formatted with the tokenizer's chat template (a user turn followed by
the assistant header) when it has one, else used as raw text. A target is the
assistant's answer followed by the end-of-turn token. Rows are left padded so
the last prompt token of a prompt-only batch is the final position of every row;
positions count real tokens only, so padding never changes a row's outputs.
"""

from __future__ import annotations

import dataclasses
import re
import weakref
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from app.scen.config import ScenConfig
from app.scen.errors import InvalidEditError


def format_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str) -> str:
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
        )
        return str(text)
    return prompt


def prompt_ids(tokenizer: PreTrainedTokenizerBase, prompt: str) -> list[int]:
    return prompt_tokens(tokenizer, prompt).ids


@dataclass
class PromptTokens:
    ids: list[int]
    content: list[bool]  # per token: part of the user's own text, not of the template
    spans: list[tuple[int, int]]  # per token: its characters in ``text`` ((0, 0) for template tokens)
    text: str  # the user's text as the template placed it
    opens: list[bool]  # per token: the first of a sentence of the user's text after its first


# Where a sentence of the user's text ends: after . ! or ? (closing quotes and brackets kept with
# it) and a space, or at a line break. A single capital or a capitalised two-letter word before the
# point is an initial or a title ("Lyndon B. Johnson", "Dr. Jones"), not a sentence's end.
_SENTENCE_END = re.compile(r"(?<!\b[A-Z])(?<!\b[A-Z][a-z])[.!?]+[\"'\u201d\u2019)\]]*\s+|\n\s*")


def sentence_openings(text: str, spans: Sequence[tuple[int, int]]) -> list[bool]:
    """Per token (``spans`` in ``text``; empty spans are not text): whether it opens a sentence
    after the first."""
    opens = [False] * len(spans)
    for end in (m.end() for m in _SENTENCE_END.finditer(text)):
        # The first token holding any of the sentence's text: byte-level tokenizers (GPT-2,
        # Llama 3, SmolLM2) put the space before a word inside that word's span.
        first = next((i for i, (a, b) in enumerate(spans) if b > max(a, end)), None)
        if first is not None:
            opens[first] = True
    return opens


# Formatting and tokenizing a prompt costs more than a small model's forward pass over it,
# and the engine reads the same prompts several times over (batching them, reading their
# keys, fingerprinting the pool): each tokenizer keeps what it has done, up to a bound.
# The template's own pieces (system turn, headers) are the same in every prompt: their ids
# are kept apart, with no bound.
_MEMO: weakref.WeakKeyDictionary[PreTrainedTokenizerBase, dict[tuple[str | None, str], PromptTokens]] = (
    weakref.WeakKeyDictionary()
)
_MEMO_SIZE = 20_000
_TEMPLATE_IDS: weakref.WeakKeyDictionary[PreTrainedTokenizerBase, dict[str, list[int]]] = weakref.WeakKeyDictionary()


def prompt_tokens(tokenizer: PreTrainedTokenizerBase, prompt: str) -> PromptTokens:
    """The formatted prompt's token ids and which of them carry the user's text.

    Routing looks at the user's text only: the template's system turn and headers are
    the same in every prompt and say nothing about which fact is asked.
    """
    memo = _MEMO.setdefault(tokenizer, {})
    key = (getattr(tokenizer, "chat_template", None), prompt)
    found = memo.get(key)
    if found is None:
        if len(memo) >= _MEMO_SIZE:
            memo.clear()
        found = memo[key] = _prompt_tokens(tokenizer, prompt)
    # A copy: callers own the lists they are given.
    return dataclasses.replace(found, ids=list(found.ids), content=list(found.content), spans=list(found.spans),
                               opens=list(found.opens))


def _prompt_tokens(tokenizer: PreTrainedTokenizerBase, prompt: str) -> PromptTokens:
    formatted = format_prompt(tokenizer, prompt)
    text = prompt if prompt in formatted else prompt.strip()
    start = formatted.rfind(text)  # the user turn comes after anything the system turn holds
    if start < 0:  # a template that rewrites the text: it cannot be told apart from the template
        ids = _ids(tokenizer, formatted)
        return PromptTokens(ids, [True] * len(ids), [(0, 0)] * len(ids), prompt, [False] * len(ids))
    if not tokenizer.is_fast:  # no offsets: every token counts as the user's
        before, after = formatted[:start], formatted[start + len(text):]
        ids = _ids(tokenizer, before) + _plain_ids(tokenizer, text) + _ids(tokenizer, after)
        return PromptTokens(ids, [True] * len(ids), [(0, 0)] * len(ids), prompt, [False] * len(ids))
    end = start + len(text)
    # The template holds every special token the model expects; the user's text holds none,
    # whatever it spells ("<|im_start|>system" must not open a turn): it is encoded apart.
    head, tail = _template_ids(tokenizer, formatted[:start]), _template_ids(tokenizer, formatted[end:])
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, split_special_tokens=True)
    spans = [(0, 0)] * len(head) + [(a, b) for a, b in enc.offset_mapping] + [(0, 0)] * len(tail)
    return PromptTokens(head + enc.input_ids + tail, [b > a for a, b in spans], spans, text,
                        sentence_openings(text, spans))


def _template_ids(tokenizer: PreTrainedTokenizerBase, piece: str) -> list[int]:
    known = _TEMPLATE_IDS.setdefault(tokenizer, {})
    if piece not in known:
        known[piece] = _ids(tokenizer, piece)
    return known[piece]


def _ids(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False).input_ids if text else []


def _plain_ids(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """Token ids of ``text`` read as plain words: no special token, whatever it spells."""
    return tokenizer(text, add_special_tokens=False, split_special_tokens=True).input_ids


def subject_positions(tokens: PromptTokens, subject: str) -> list[int]:
    """Indices of the tokens that spell ``subject`` (every occurrence, any case), in order."""
    text, needle = tokens.text.casefold(), subject.strip().casefold()
    if not needle:
        return []
    hits, at = [], text.find(needle)
    while at >= 0:
        end = at + len(needle)
        hits += [i for i, (a, b) in enumerate(tokens.spans) if b > a and a < end and b > at and i not in hits]
        at = text.find(needle, at + 1)
    return sorted(hits)


def check_limits(
    tokenizer: PreTrainedTokenizerBase,
    config: ScenConfig,
    prompt: str,
    target: str,
    rephrases: Sequence[str] = (),
    subject: str | None = None,
) -> None:
    """Raise ``InvalidEditError`` unless the edit's texts are non-empty and within the token limits,
    and the subject, when given, occurs in the prompt."""
    texts = [("prompt", prompt), *((f"rephrases[{i}]", r) for i, r in enumerate(rephrases))]
    for name, text in [*texts, ("target", target)]:
        if not isinstance(text, str) or not text.strip():
            raise InvalidEditError(f"{name} must be a non-empty string")
    for name, text in texts:
        n = len(prompt_ids(tokenizer, text))
        if n > config.max_prompt_tokens:
            raise InvalidEditError(f"{name} is {n} tokens after formatting; the limit is {config.max_prompt_tokens}")
    n = len(target_ids(tokenizer, target)) - 1
    if n > config.max_target_tokens:
        raise InvalidEditError(f"target is {n} tokens; the limit is {config.max_target_tokens}")
    if subject is not None and not subject_positions(prompt_tokens(tokenizer, prompt), subject):
        raise InvalidEditError(f"subject {subject!r} does not occur in the prompt")


def target_ids(tokenizer: PreTrainedTokenizerBase, target: str) -> list[int]:
    return _plain_ids(tokenizer, target) + [tokenizer.eos_token_id]


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, T)
    attention_mask: torch.Tensor  # (B, T)
    position_ids: torch.Tensor  # (B, T)
    prompt_last: torch.Tensor  # (B,) index of each row's last prompt token
    content: torch.Tensor  # (B, T) bool, the tokens of the user's text
    targets: list[list[int]]  # per row; the row's final len(target) tokens
    sentence: torch.Tensor  # (B, T) long, where the sentence of the user's text holding each token starts

    def to(self, device: torch.device) -> Batch:
        return Batch(
            self.input_ids.to(device), self.attention_mask.to(device), self.position_ids.to(device),
            self.prompt_last.to(device), self.content.to(device), self.targets, self.sentence.to(device),
        )

    def head(self, n: int) -> Batch:
        """The first ``n`` rows (their padding kept)."""
        return Batch(
            self.input_ids[:n], self.attention_mask[:n], self.position_ids[:n], self.prompt_last[:n],
            self.content[:n], self.targets[:n], self.sentence[:n],
        )

    def select(self, rows: torch.Tensor) -> Batch:
        """The rows ``rows`` (a long index), their padding kept."""
        return Batch(
            self.input_ids[rows], self.attention_mask[rows], self.position_ids[rows], self.prompt_last[rows],
            self.content[rows], [self.targets[i] for i in rows.tolist()], self.sentence[rows],
        )

    def model_inputs(self) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask, "position_ids": self.position_ids}

    def several_sentences(self) -> torch.Tensor:
        """(B,) bool: the rows whose user's text holds a sentence after its first."""
        return (self.content & (self.sentence > 0)).any(-1)

    def sentences_apart(self, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """Model inputs in which each sentence of the user's text is read as if it were the whole
        text: its tokens see the template and their own sentence, not the user's sentences before
        it, at the positions they would hold right after the template. Tokens outside the user's
        text see the row as usual. ``dtype``: the model's, for the additive attention mask."""
        B, T = self.input_ids.shape
        t = torch.arange(T, device=self.input_ids.device)
        later = self.content & (self.sentence > 0)  # (B, T) tokens of a sentence after the first
        earlier_text = self.content[:, None, :] & (t[None, None, :] < self.sentence[:, :, None])  # (B, Tq, Tk)
        seen = (t[:, None] >= t[None, :]) & self.attention_mask.bool()[:, None, :] & ~(later[:, :, None] & earlier_text)
        seen |= torch.eye(T, dtype=torch.bool, device=t.device)  # padding rows see themselves: no empty softmax
        mask = torch.zeros(B, 1, T, T, dtype=dtype, device=t.device).masked_fill(~seen[:, None], torch.finfo(dtype).min)
        first = self.content.to(torch.uint8).argmax(-1, keepdim=True)  # (B, 1) the text's first token
        shift = self.position_ids.gather(1, self.sentence) - self.position_ids.gather(1, first)
        position_ids = torch.where(later, self.position_ids - shift, self.position_ids)
        return {"input_ids": self.input_ids, "attention_mask": mask, "position_ids": position_ids}


def encode(
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    targets: Sequence[str] | None = None,
) -> Batch:
    """Left-padded batch of prompt (+ target + eos) token rows."""
    rows, contents, tgts, opens = [], [], [], []
    for i, prompt in enumerate(prompts):
        p = prompt_tokens(tokenizer, prompt)
        t = target_ids(tokenizer, targets[i]) if targets is not None else []
        rows.append(p.ids + t)
        contents.append(p.content + [False] * len(t))
        opens.append(p.opens + [False] * len(t))
        tgts.append(t)
    return pack(rows, contents, tgts, tokenizer.pad_token_id, opens)


def pack(
    rows: list[list[int]], contents: list[list[bool]], targets: list[list[int]], pad_id: int,
    opens: list[list[bool]] | None = None,
) -> Batch:
    """``opens``: per row and token, whether it opens a sentence (``PromptTokens.opens``); None:
    each row is one sentence."""
    T = max(len(r) for r in rows)
    B = len(rows)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    mask = torch.zeros((B, T), dtype=torch.long)
    content = torch.zeros((B, T), dtype=torch.bool)
    opening = torch.zeros((B, T), dtype=torch.bool)
    for i, row in enumerate(rows):
        input_ids[i, T - len(row):] = torch.tensor(row, dtype=torch.long)
        mask[i, T - len(row):] = 1
        content[i, T - len(row):] = torch.tensor(contents[i], dtype=torch.bool)
        if opens is not None:
            opening[i, T - len(row):] = torch.tensor(opens[i], dtype=torch.bool)
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    prompt_last = torch.tensor([T - 1 - len(t) for t in targets], dtype=torch.long)
    # Each position's sentence starts at the latest opening at or before it (position 0 if none).
    sentence = torch.where(opening, torch.arange(T), 0).cummax(-1).values
    return Batch(input_ids, mask, position_ids, prompt_last, content, targets, sentence)
