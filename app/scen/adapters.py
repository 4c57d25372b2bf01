"""Where each supported architecture keeps its decoder layers and FFN down projection.

The key of the method is the input of the down projection: ``act(gate(x)) * up(x)``
in gated MLPs, ``act(up(x))`` in plain ones. Wrapping the down projection module
therefore gives the key and the place to add an expert's delta, whatever the MLP
computes before it.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedModel

from app.scen.errors import UnsupportedModelError


@dataclass(frozen=True)
class FFNAdapter:
    kind: str  # "gated" or "plain", for messages and reports
    layers: str  # attribute path from the causal LM to its decoder layer list
    down: str  # attribute path from one decoder layer to its down projection
    conv1d: bool = False  # GPT-2 style Conv1D stores the weight as (in, out)

    def layer_list(self, model: PreTrainedModel) -> nn.ModuleList:
        return operator.attrgetter(self.layers)(model)

    def get_down(self, layer: nn.Module) -> nn.Module:
        return operator.attrgetter(self.down)(layer)

    def set_down(self, layer: nn.Module, module: nn.Module) -> None:
        parent, _, name = self.down.rpartition(".")
        setattr(operator.attrgetter(parent)(layer) if parent else layer, name, module)

    def down_weight(self, down: nn.Module) -> torch.Tensor:
        """The down projection as a Linear weight, shape (d_model, h)."""
        weight: torch.Tensor = down.weight  # type: ignore[assignment]  # nn.Module attributes are untyped
        return weight.T if self.conv1d else weight


_GATED = FFNAdapter("gated", "model.layers", "mlp.down_proj")
ADAPTERS: dict[str, FFNAdapter] = {
    **dict.fromkeys(("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "olmo2", "phi3"), _GATED),
    "gpt2": FFNAdapter("plain", "transformer.h", "mlp.c_proj", conv1d=True),
    "gpt_neox": FFNAdapter("plain", "gpt_neox.layers", "mlp.dense_4h_to_h"),
    "gptj": FFNAdapter("plain", "transformer.h", "mlp.fc_out"),
}


def adapter_for(model: PreTrainedModel) -> FFNAdapter:
    model_type = getattr(model.config, "model_type", None)
    if model_type not in ADAPTERS:
        supported = ", ".join(sorted(ADAPTERS))
        raise UnsupportedModelError(
            f"model type {model_type!r} ({type(model).__name__}) is not supported; supported model types: {supported}"
        )
    return ADAPTERS[model_type]
