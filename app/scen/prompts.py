"""Turning prompts and targets into token batches, the same way for edits and generation.

A prompt is formatted with the tokenizer's chat template (a user turn followed by
the assistant header) when it has one, else used as raw text. A target is the
assistant's answer followed by the end-of-turn token. Rows are left padded so
the last prompt token of a prompt-only batch is the final position of every row;
positions count real tokens only, so padding never changes a row's outputs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from app.scen.config import ScenConfig
from app.scen.errors import InvalidEditError


def format_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str) -> str:
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
        )
    return prompt


def prompt_ids(tokenizer: PreTrainedTokenizerBase, prompt: str) -> list[int]:
    # The template already holds every special token the model expects.
    return tokenizer(format_prompt(tokenizer, prompt), add_special_tokens=False).input_ids


def check_limits(
    tokenizer: PreTrainedTokenizerBase, config: ScenConfig, prompt: str, target: str, rephrases: Sequence[str] = ()
) -> None:
    """Raise ``InvalidEditError`` unless the edit's texts are non-empty and within the token limits."""
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


def target_ids(tokenizer: PreTrainedTokenizerBase, target: str) -> list[int]:
    return tokenizer(target, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, T)
    attention_mask: torch.Tensor  # (B, T)
    position_ids: torch.Tensor  # (B, T)
    prompt_last: torch.Tensor  # (B,) index of each row's last prompt token
    targets: list[list[int]]  # per row; the row's final len(target) tokens

    def to(self, device: torch.device) -> Batch:
        return Batch(
            self.input_ids.to(device), self.attention_mask.to(device), self.position_ids.to(device),
            self.prompt_last.to(device), self.targets,
        )

    def model_inputs(self) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask, "position_ids": self.position_ids}


def encode(
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    targets: Sequence[str] | None = None,
) -> Batch:
    """Left-padded batch of prompt (+ target + eos) token rows."""
    rows, tgts = [], []
    for i, prompt in enumerate(prompts):
        p = prompt_ids(tokenizer, prompt)
        t = target_ids(tokenizer, targets[i]) if targets is not None else []
        rows.append(p + t)
        tgts.append(t)
    return pack(rows, tgts, tokenizer.pad_token_id)


def pack(rows: list[list[int]], targets: list[list[int]], pad_id: int) -> Batch:
    T = max(len(r) for r in rows)
    B = len(rows)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    mask = torch.zeros((B, T), dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, T - len(row):] = torch.tensor(row, dtype=torch.long)
        mask[i, T - len(row):] = 1
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    prompt_last = torch.tensor([T - 1 - len(t) for t in targets], dtype=torch.long)
    return Batch(input_ids, mask, position_ids, prompt_last, targets)
