"""Experts: per-edit replacements of the down projection, stored as deltas.

An expert is the paper's trained copy ``W_down^t`` of ``W_down``. It is stored
as ``W_down^t - W_down`` (zero at the start of training, which is the same
optimisation as starting from a copy), so a low-rank variant is the same object
with a factored delta and the base weights are never duplicated in memory.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class Expert(nn.Module):
    """Delta of the down projection: ``delta(k)`` is added to ``down(k)``."""

    kind: str

    def forward(self, k: torch.Tensor) -> torch.Tensor:  # (..., h) -> (..., d)
        raise NotImplementedError

    def tensors(self) -> dict[str, torch.Tensor]:
        return {name: p.detach() for name, p in self.named_parameters()}

    @staticmethod
    def from_tensors(tensors: dict[str, torch.Tensor]) -> Expert:
        if set(tensors) == {"delta"}:
            expert: Expert = FullExpert(*tensors["delta"].shape)
        elif set(tensors) == {"a", "b"}:
            d, r = tensors["b"].shape
            expert = LowRankExpert(d, tensors["a"].shape[1], r)
        else:
            raise ValueError(f"unrecognised expert tensors: {sorted(tensors)}")
        expert.load_state_dict(tensors)
        return expert.requires_grad_(False)


class FullExpert(Expert):
    kind = "full"

    def __init__(self, d: int, h: int):
        super().__init__()
        self.delta = nn.Parameter(torch.zeros(d, h))

    def forward(self, k: torch.Tensor) -> torch.Tensor:
        return k @ self.delta.T


class LowRankExpert(Expert):
    kind = "lowrank"

    def __init__(self, d: int, h: int, rank: int, generator: torch.Generator | None = None):
        super().__init__()
        # b starts at zero so the expert starts as the base layer; a is random so
        # the first gradient step on b is not zero.
        self.a = nn.Parameter(torch.randn(rank, h, generator=generator) / math.sqrt(h))
        self.b = nn.Parameter(torch.zeros(d, rank))

    def forward(self, k: torch.Tensor) -> torch.Tensor:
        return (k @ self.a.T) @ self.b.T


def low_rank_of(expert: FullExpert, rank: int) -> LowRankExpert:
    """The rank-``rank`` expert nearest a full one: its delta's leading singular directions.

    A randomised SVD (a few ms where the full one takes ~100 on SmolLM2's 576 x 1536 delta), on
    the CPU under a fixed seed, so that the same delta always gives the same factors."""
    delta = expert.delta.detach().float().cpu()
    d, h = delta.shape
    rank = min(rank, d, h)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        u, s, v = torch.svd_lowrank(delta, q=min(rank + 8, d, h), niter=4)
        low = LowRankExpert(d, h, rank)  # its random start is replaced below
    with torch.no_grad():
        low.a.copy_(v[:, :rank].T)
        low.b.copy_(u[:, :rank] * s[:rank])
    return low.to(expert.delta.device)


def new_expert(kind: str, d: int, h: int, rank: int, generator: torch.Generator | None = None) -> Expert:
    if kind == "full":
        return FullExpert(d, h)
    if kind == "lowrank":
        return LowRankExpert(d, h, rank, generator)
    raise ValueError(f"unknown expert kind {kind!r}; expected 'full' or 'lowrank'")
