"""Sequential fine-tuning of one shared copy of layer l's down projection (FT), optionally with
a KL term that keeps the next-token distributions of unrelated prompts (FT+KL).

Each edit trains the same weight further (a fresh Adam per edit, the engine's
expert learning rate and stopping rule: stop once every target token is the
teacher-forced argmax). Nothing routes: every prompt sees the changed weight.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from app.eval.baselines.common import LayerSite, Recorded, target_logprobs
from app.eval.datasets import EditRecord
from app.eval.method import EditMethod
from app.scen.layers import replay_above
from app.scen.negatives import pool_prompts
from app.scen.prompts import Batch, encode


class FineTune(EditMethod):
    name = "ft"

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, layer: int, lr: float,
                 max_steps: int, kl_weight: float = 0.0, kl_prompts: int = 16, kl_batch: int = 4, seed: int = 0):
        super().__init__(model, tokenizer)
        self.site = LayerSite(model, layer)
        self.lr, self.max_steps, self.kl_weight = lr, max_steps, kl_weight
        self.name = "ft_kl" if kl_weight > 0 else "ft"
        self.kl: _KLPrompts | None = None
        # Each step draws kl_batch of the kl_prompts rows: the same expected KL at a quarter of
        # the cost (the chat template's system turn makes every row ~40 tokens long).
        self.kl_draw = min(kl_batch, kl_prompts)
        self.kl_gen = torch.Generator().manual_seed(seed)
        if kl_weight > 0:
            # Ordinary prompts of the engine's negative pool stand in for "unrelated" text;
            # the evaluation's locality prompts are never seen in training.
            batch = encode(tokenizer, pool_prompts()[:kl_prompts]).to(self.site.device)
            rec = self.site.record(batch)
            # KL on the next-token distribution after each prompt (where an answer would start):
            # the full-sequence version costs a vocabulary-sized softmax per token per step.
            with torch.no_grad():
                logits = model(**batch.model_inputs(), use_cache=False, logits_to_keep=1).logits[:, -1]
            self.kl = _KLPrompts(batch, rec, F.log_softmax(logits.float(), dim=-1))

    def config(self) -> dict[str, Any]:
        return {"layer": self.site.layer, "lr": self.lr, "max_steps": self.max_steps, "kl_weight": self.kl_weight,
                "kl_prompts": 0 if self.kl is None else len(self.kl.batch.targets),
                "kl_batch": 0 if self.kl is None else self.kl_draw}

    def apply(self, edit_id: str, record: EditRecord) -> dict[str, Any]:
        start = time.perf_counter()
        site = self.site
        batch = encode(self.tokenizer, [record.prompt], [record.target]).to(site.device)
        rec = site.record(batch)
        params = list(site.down.parameters())
        for p in params:
            p.requires_grad_(True)
        opt = torch.optim.Adam(params, lr=self.lr)
        current: dict[str, Recorded] = {}

        def new_output() -> torch.Tensor:
            r = current["rec"]
            return r.out - r.down_out + site.down(r.keys)

        steps, kl_value = 0, 0.0
        try:
            with replay_above(site.layers, site.layer, new_output), torch.enable_grad():
                while True:
                    current["rec"] = rec
                    tok_logp, hit = target_logprobs(self.model, batch)
                    loss = -tok_logp.mean()
                    converged = bool(hit.all())
                    if converged or steps >= self.max_steps:
                        break
                    if self.kl is not None:
                        kl = self._kl_term(self.kl, current)
                        kl_value = kl.item()
                        loss = loss + self.kl_weight * kl
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    steps += 1
        finally:
            for p in params:
                p.requires_grad_(False)
                p.grad = None
        return {"seconds": time.perf_counter() - start, "steps": steps, "loss": loss.item(), "converged": converged,
                "kl": kl_value}

    def _kl_term(self, kl: _KLPrompts, current: dict[str, Recorded]) -> torch.Tensor:
        """KL(unedited || edited) after a seeded draw of the pool prompts; points the replay at their rows."""
        rows = torch.randperm(len(kl.ref), generator=self.kl_gen)[: self.kl_draw]
        # out - down_out does not depend on the down weight, so the pool's recording from
        # before the first edit stays valid while the weight moves.
        current["rec"] = Recorded(kl.rec.out[rows], kl.rec.keys[rows], kl.rec.down_out[rows])
        inputs = {k: v[rows] for k, v in kl.batch.model_inputs().items()}
        logits = self.model(**inputs, use_cache=False, logits_to_keep=1).logits
        logp = F.log_softmax(logits[:, -1].float(), dim=-1)
        ref = kl.ref[rows]
        return (ref.exp() * (ref - logp)).sum(-1).mean()


@dataclass(frozen=True)
class _KLPrompts:
    batch: Batch  # the pool prompts
    rec: Recorded  # their recording at the edited layer, before any edit
    ref: torch.Tensor  # (P, V) the unedited model's next-token log-probabilities after each
