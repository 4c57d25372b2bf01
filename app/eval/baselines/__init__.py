"""Baseline editors driven by the same harness as SCEN: FT, FT+KL and a GRACE-style codebook.

All edit the same layer as SCEN (the engine's resolved layer) and, unless an
option says otherwise, use the engine expert's step limit.
"""

from __future__ import annotations

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from app.eval.method import EditMethod
from app.scen import ScenConfig

# Value vectors live in down's output space, not in weight space: a step size of
# the engine's weight learning rate barely moves them.
GRACE_LR = 0.5
# Initial deferral radius, in raw key units (L2 distance of down's input at the
# last prompt token).
GRACE_EPSILON = 5.0
FT_KL_WEIGHT = 1.0
# FT and FT+KL step the edited layer's own weights: the rate their recorded results were measured
# with (the engine's expert, a separate delta, has since moved to a larger one).
FT_LR = 2e-3


def build_baseline(
    name: str, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, scen_config: ScenConfig,
    options: dict[str, str],
) -> EditMethod:
    from app.scen.adapters import adapter_for

    n_layers = len(adapter_for(model).layer_list(model))
    layer = int(options.pop("layer", scen_config.resolved_layer(n_layers)))
    lr = float(options.pop("lr", FT_LR if name in ("ft", "ft_kl") else GRACE_LR))
    max_steps = int(options.pop("max_steps", scen_config.expert_max_steps if name != "grace" else 100))
    if name in ("ft", "ft_kl"):
        from app.eval.baselines.ft import FineTune

        kl = float(options.pop("kl_weight", FT_KL_WEIGHT)) if name == "ft_kl" else 0.0
        kl_sizes = {k: int(options.pop(k)) for k in ("kl_prompts", "kl_batch") if k in options}
        method: EditMethod = FineTune(model, tokenizer, layer, lr, max_steps, kl_weight=kl, seed=scen_config.seed,
                                      **kl_sizes)
    elif name == "grace":
        from app.eval.baselines.grace import Grace

        method = Grace(model, tokenizer, layer, float(options.pop("epsilon", GRACE_EPSILON)), lr, max_steps)
    else:
        raise ValueError(f"unknown baseline {name!r}; expected ft, ft_kl or grace")
    if options:
        raise ValueError(f"unknown option(s) for {name}: {sorted(options)}")
    return method
