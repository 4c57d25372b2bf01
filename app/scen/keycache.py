"""The negative pool's keys, cached on disk.

Computing them (a forward pass of every pool prompt up to layer l) is most of an
``Editor``'s start-up. The cache key hashes everything the keys depend on: the
token ids of the formatted pool prompts (so the pool text, tokenizer and chat
template), the layers read, and every parameter and buffer of the model with its dtype.
A changed model, pool or tokenizer therefore never meets stale keys. Only models
on the CPU use it: hashing weights held on an accelerator would first copy them to
the host, which costs more than the forward pass there.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from app.scen.store import write_atomic

log = logging.getLogger(__name__)

VERSION = "pool-keys/3"


def fingerprint(model: nn.Module, rows: Sequence[Sequence[int]], layers: str) -> str:
    h = hashlib.sha256(f"{VERSION}|layers={layers}|rows={[list(r) for r in rows]}".encode())
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        h.update(f"|{name}:{tensor.dtype}:{tuple(tensor.shape)}|".encode())
        h.update(tensor.detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def load(folder: Path, key: str) -> dict[str, torch.Tensor] | None:
    path = Path(folder) / f"{key}.safetensors"
    try:
        return st_load(path.read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, SafetensorError, KeyError) as exc:  # unreadable: recompute and overwrite
        log.warning("ignoring unreadable pool-key cache %s: %s", path, exc)
        return None


def save(folder: Path, key: str, keys: dict[str, torch.Tensor]) -> None:
    try:
        tensors = {name: t.detach().cpu().contiguous() for name, t in keys.items()}
        write_atomic(Path(folder) / f"{key}.safetensors", st_save(tensors))
    except OSError as exc:  # a read-only cache only costs start-up time
        log.warning("could not cache pool keys in %s: %s", folder, exc)
