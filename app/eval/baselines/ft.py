"""Sequential fine-tuning of one shared copy of layer l's down projection (FT), optionally with
a KL term that keeps the next-token distributions of unrelated prompts (FT+KL).

Each edit trains the same weight further (a fresh Adam per edit, the engine's
expert learning rate and stopping rule: stop once every target token is the
teacher-forced argmax). Nothing routes: every prompt sees the changed weight.
"""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.nn.functional as F

from app.eval.baselines.common import LayerSite, Recorded, Replay, target_logprobs
from app.eval.datasets import EditRecord
from app.eval.method import EditMethod
from app.scen.editor import pool_prompts
from app.scen.prompts import encode
from app.scen.training import replay_above


class FineTune(EditMethod):
    name = "ft"

    def __init__(self, model, tokenizer, layer: int, lr: float, max_steps: int, kl_weight: float = 0.0,
                 kl_prompts: int = 16, kl_batch: int = 4, seed: int = 0):
        super().__init__(model, tokenizer)
        self.site = LayerSite(model, layer)
        self.lr, self.max_steps, self.kl_weight = lr, max_steps, kl_weight
        self.name = "ft_kl" if kl_weight > 0 else "ft"
        self.kl_batch = None
        # Each step draws kl_batch of the kl_prompts rows: the same expected KL at a quarter of
        # the cost (the chat template's system turn makes every row ~40 tokens long).
        self.kl_draw = min(kl_batch, kl_prompts)
        self.kl_gen = torch.Generator().manual_seed(seed)
        if kl_weight > 0:
            # Ordinary prompts of the engine's negative pool stand in for "unrelated" text;
            # the evaluation's locality prompts are never seen in training.
            self.kl_batch = encode(tokenizer, pool_prompts()[:kl_prompts]).to(self.site.device)
            self.kl_rec = self.site.record(self.kl_batch)
            # KL on the next-token distribution after each prompt (where an answer would start):
            # the full-sequence version costs a vocabulary-sized softmax per token per step.
            with torch.no_grad():
                logits = model(**self.kl_batch.model_inputs(), use_cache=False, logits_to_keep=1).logits[:, -1]
            self.kl_ref = F.log_softmax(logits.float(), dim=-1)  # (P, V) of the unedited model

    def config(self) -> dict[str, Any]:
        return {"layer": self.site.layer, "lr": self.lr, "max_steps": self.max_steps, "kl_weight": self.kl_weight,
                "kl_prompts": 0 if self.kl_batch is None else len(self.kl_batch.targets),
                "kl_batch": 0 if self.kl_batch is None else self.kl_draw}

    def apply(self, edit_id: str, record: EditRecord) -> dict[str, Any]:
        start = time.perf_counter()
        site = self.site
        batch = encode(self.tokenizer, [record.prompt], [record.target]).to(site.device)
        rec = site.record(batch)
        # out - down_out does not depend on the down weight, so the pool's recording from
        # before the first edit stays valid while the weight moves.
        kl_rec = self.kl_rec if self.kl_batch is not None else None
        params = [p for p in site.down.parameters()]
        for p in params:
            p.requires_grad_(True)
        opt = torch.optim.Adam(params, lr=self.lr)
        current = {}
        replay = Replay(site.layers[site.layer], lambda: current["rec"].out - current["rec"].down_out
                        + site.down(current["rec"].keys))
        steps, kl_value = 0, 0.0
        try:
            with replay_above(site.layers, site.layer, replay), torch.enable_grad():
                while True:
                    current["rec"] = rec
                    tok_logp, hit = target_logprobs(self.model, batch)
                    loss = -tok_logp.mean()
                    converged = bool(hit.all())
                    if converged or steps >= self.max_steps:
                        break
                    if kl_rec is not None:
                        rows = torch.randperm(len(self.kl_ref), generator=self.kl_gen)[: self.kl_draw]
                        current["rec"] = Recorded(kl_rec.out[rows], kl_rec.keys[rows], kl_rec.down_out[rows])
                        inputs = {k: v[rows] for k, v in self.kl_batch.model_inputs().items()}
                        logits = self.model(**inputs, use_cache=False, logits_to_keep=1).logits
                        logp = F.log_softmax(logits[:, -1].float(), dim=-1)
                        ref = self.kl_ref[rows]
                        kl = (ref.exp() * (ref - logp)).sum(-1).mean()
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
