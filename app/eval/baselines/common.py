"""What the baselines share: reading the edited layer, replaying the layers above it, training to the stopping rule.

Every baseline changes only layer l's down projection or its output, so the
layers below l are frozen: one recorded pass gives, per token, the layer's
output, the key (input of ``down``) and ``down``'s own output. A training step
then replays only the layers above l (``app.scen.layers.replay_above``) with
the layer's output recomputed as ``out - down_out + new_down_out``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel

from app.scen.adapters import adapter_for
from app.scen.layers import record
from app.scen.prompts import Batch


@dataclass
class Recorded:
    out: torch.Tensor  # (B, T, d) layer l's output
    keys: torch.Tensor  # (B, T, h) input of its down projection
    down_out: torch.Tensor  # (B, T, d) output of its down projection


class LayerSite:
    """The edited layer of one model: its down projection and a way to record it."""

    def __init__(self, model: PreTrainedModel, layer: int):
        self.model = model
        self.adapter = adapter_for(model)
        self.layers = self.adapter.layer_list(model)
        self.layer = layer
        self.down = self.adapter.get_down(self.layers[layer])
        self.device = next(model.parameters()).device

    def record(self, batch: Batch) -> Recorded:
        out, [(keys, down_out)] = record(self.model, self.layers[self.layer], [self.down], batch.model_inputs())
        return Recorded(out, keys, down_out)


def target_logprobs(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probabilities of the target tokens (B, n) and the argmax-matches-target mask (B, n)."""
    n = len(batch.targets[0])
    target = torch.tensor(batch.targets, device=batch.input_ids.device)  # (B, n)
    logits = model(**batch.model_inputs(), use_cache=False, logits_to_keep=n + 1).logits[:, :n]  # (B, n, V)
    logp = F.log_softmax(logits.float(), dim=-1)
    return logp.gather(-1, target.unsqueeze(-1)).squeeze(-1), logits.argmax(-1) == target
