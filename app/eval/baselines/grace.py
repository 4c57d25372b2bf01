"""A GRACE-style codebook (Hartvigsen et al., 2023) at layer l's down projection.

The codebook holds entries (key, value, radius ε, label). The key is the input of
``down`` at the last prompt token; at prefill a sequence whose key lies within ε
(Euclidean) of its nearest entry is served by that entry: ``down``'s output is
replaced by the entry's value at that token and every later one (the answer,
and each generated token), the decision held for the whole sequence as SCEN
holds its routing. Otherwise the layer is untouched.

A new edit follows GRACE's codebook rules: far from every entry (distance above
the nearest entry's ε plus the initial ε) it gets a new entry; near an entry with
the same label that entry's radius grows to reach it; near an entry with another
label both radii shrink to half the distance and the new entry is added. The
value is trained by backpropagation until the target is the teacher-forced
argmax at every position (the engine's stopping rule).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from app.eval.baselines.common import LayerSite, target_logprobs
from app.eval.datasets import EditRecord
from app.eval.method import EditMethod
from app.scen.layers import replay_above
from app.scen.prompts import Batch, encode


@dataclass
class _Session:
    at: torch.Tensor | None  # last prompt token per row; None: every row's last position
    served: torch.Tensor | None = None  # (B,) per row the entry serving it or -1, once the prefill has decided


class _Probe:
    def __init__(self, owner: Grace):
        self.owner = owner

    def served_by(self, rows: int) -> list[str | None]:
        session = self.owner._session
        served = session.served if session is not None else None
        if served is None:
            return [None] * rows
        return [self.owner.labels_id[j] if j >= 0 else None for j in served.tolist()]


class Grace(EditMethod):
    name = "grace"
    routes = True

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, layer: int, epsilon: float,
                 lr: float, max_steps: int):
        super().__init__(model, tokenizer)
        self.site = LayerSite(model, layer)
        self.epsilon, self.lr, self.max_steps = epsilon, lr, max_steps
        h = self.site.adapter.down_weight(self.site.down).shape[1]
        d = self.site.adapter.down_weight(self.site.down).shape[0]
        dev = self.site.device
        self.keys = torch.zeros(0, h, device=dev)  # (N, h)
        self.values = torch.zeros(0, d, device=dev)  # (N, d)
        self.radii = torch.zeros(0, device=dev)  # (N,)
        self.labels: list[str] = []
        self.labels_id: list[str] = []
        self.counts = {"added": 0, "expanded": 0, "split": 0}
        self._session: _Session | None = None  # the scoring call in progress
        self._hook = self.site.down.register_forward_hook(self._serve)

    def config(self) -> dict[str, Any]:
        return {"layer": self.site.layer, "epsilon": self.epsilon, "lr": self.lr, "max_steps": self.max_steps,
                "replacement": "last prompt token onward"}

    # ---- inference ---------------------------------------------------------------------

    def _serve(self, module: nn.Module, args: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor:
        s = self._session
        if s is None or self.keys.shape[0] == 0:
            return output
        B, T, _ = output.shape
        if s.served is None:  # prefill: decide per sequence at its last prompt token
            at = torch.full((B,), T - 1, device=output.device) if s.at is None else s.at.to(output.device)
            k = args[0][torch.arange(B, device=output.device), at]  # (B, h)
            dist = torch.cdist(k.float(), self.keys)  # (B, N)
            nearest, j = dist.min(-1)
            served = s.served = torch.where(nearest <= self.radii[j], j, -1)
            mask = torch.arange(T, device=output.device)[None, :] >= at[:, None]  # (B, T)
        else:  # decode step: every new token is past the prompt
            served = s.served
            mask = torch.ones(B, T, dtype=torch.bool, device=output.device)
        rows = served >= 0
        if not rows.any():
            return output
        mask = mask & rows[:, None]
        value = self.values[served.clamp_min(0)].to(output.dtype)[:, None, :].expand_as(output)  # (B, T, d)
        return torch.where(mask[..., None], value, output)

    @contextlib.contextmanager
    def probe(self, batch: Batch) -> Iterator[_Probe]:
        self._session = _Session(batch.prompt_last)
        try:
            yield _Probe(self)
        finally:
            self._session = None

    def set_option(self, name: str, value: float) -> None:
        """``epsilon_scale``: every radius multiplied, without retraining values."""
        if name != "epsilon_scale":
            super().set_option(name, value)
        if not hasattr(self, "_radii0"):
            self._radii0 = self.radii.clone()
        self.radii = self._radii0 * float(value)

    # ---- editing -----------------------------------------------------------------------

    def apply(self, edit_id: str, record: EditRecord) -> dict[str, Any]:
        start = time.perf_counter()
        site = self.site
        batch = encode(self.tokenizer, [record.prompt], [record.target]).to(site.device)
        rec = site.record(batch)
        at = batch.prompt_last  # (1,)
        key = rec.keys[0, at[0]].float()  # (h,)
        action, new_radius = "added", self.epsilon
        if self.keys.shape[0]:
            dist = torch.linalg.vector_norm(self.keys - key, dim=-1)
            d, j = dist.min(0)
            d, j = d.item(), j.item()
            if d <= self.radii[j].item() + self.epsilon:
                if self.labels[j] == record.target:
                    self.radii[j] = max(self.radii[j].item(), d)
                    self.counts["expanded"] += 1
                    return {"seconds": time.perf_counter() - start, "steps": 0, "converged": True,
                            "action": "expanded"}
                action, new_radius = "split", d / 2
                self.radii[j] = d / 2

        T = batch.input_ids.shape[1]
        mask = (torch.arange(T, device=site.device) >= at[0])[None, :, None]  # (1, T, 1)
        value = rec.down_out[0, at[0]].clone().float().requires_grad_(True)  # (d,)
        opt = torch.optim.Adam([value], lr=self.lr)
        zero = torch.zeros_like(rec.out)
        # The layer's output with down's output replaced by the value from the last prompt token on.

        def new_output() -> torch.Tensor:
            return rec.out + torch.where(mask, value.to(rec.out.dtype) - rec.down_out, zero)

        steps = 0
        with replay_above(site.layers, site.layer, new_output), torch.enable_grad():
            while True:
                tok_logp, hit = target_logprobs(self.model, batch)
                loss = -tok_logp.mean()
                converged = bool(hit.all())
                if converged or steps >= self.max_steps:
                    break
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                steps += 1
        self.keys = torch.cat([self.keys, key[None]])
        self.values = torch.cat([self.values, value.detach()[None]])
        self.radii = torch.cat([self.radii, torch.tensor([new_radius], device=site.device)])
        self.labels.append(record.target)
        self.labels_id.append(edit_id)
        self.counts[action] += 1
        return {"seconds": time.perf_counter() - start, "steps": steps, "loss": loss.item(), "converged": converged,
                "action": action}

    def close(self) -> None:
        self._hook.remove()
        super().close()
