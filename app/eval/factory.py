"""Building an editing method by name, on the model copy it will edit, with the plan's settings."""

from __future__ import annotations

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from app.eval.baselines import build_baseline
from app.eval.method import EditMethod
from app.eval.plan import EvalPlan
from app.eval.scen_method import ScenMethod


def build_method(name: str, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, plan: EvalPlan) -> EditMethod:
    cfg = plan.scen_config()
    if name == "scen":
        return ScenMethod(model, tokenizer, cfg)
    return build_baseline(name, model, tokenizer, cfg, plan.options_for(name))
