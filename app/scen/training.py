"""The two training stages of one edit.

Stage 1 trains the expert. Everything up to and including the edited layer's key
is frozen, so one forward pass records, at layer l, the layer's output ``out_l``
and the key ``k``; with expert delta ``D`` the edited layer outputs
``out_l + D(k)``. Each training step therefore replays only the layers above l
(the lower layers are swapped for pass-throughs while the step runs).

Stage 2 trains the indexing neuron's two factors on recorded keys alone (no model
pass), each with the paper's loss ``exp(-a_t) + m * (mean exp(a_i + alpha) + mean exp(a_i - a_t + beta))``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel

from app.scen.config import ScenConfig
from app.scen.experts import Expert, FullExpert, low_rank_of
from app.scen.layers import replay_above
from app.scen.prompts import Batch
from app.scen.routed import Neuron


@dataclass
class TrainedEdit:
    """Everything needed to put one edit into a live model, and to audit it."""

    prompt: str
    target: str
    rephrases: tuple[str, ...]
    layer: int
    expert: Expert
    neuron: Neuron
    keys: torch.Tensor  # (1 + len(rephrases), h) raw relation keys of the prompt and rephrases (see Router)
    subject_keys: torch.Tensor  # (1 + len(rephrases), h_s) raw subject keys, where each names the subject
    subject: str | None = None  # as given, or as inferred from the prompt
    metrics: dict = field(default_factory=dict)
    # Names the relation keys' normalisation the neuron's relation factor was trained under
    # (``Editor.relation_map``); "" for edits stored before it was recorded.
    relation_map: str = ""


def _jitter(x: torch.Tensor, clean: int, noise: float, generator: torch.Generator) -> torch.Tensor:
    """Rows from ``clean`` on get fresh Gaussian noise, ``noise`` times each vector's RMS."""
    if x.shape[0] <= clean:
        return x
    noisy = x[clean:]
    eps = torch.randn(noisy.shape, generator=generator).to(x)
    rms = noisy.pow(2).mean(-1, keepdim=True).sqrt()
    return torch.cat([x[:clean], noisy + noise * rms * eps])


def train_expert(
    model: PreTrainedModel,
    layers: nn.ModuleList,
    layer: int,
    batch: Batch,
    out: torch.Tensor,
    keys: torch.Tensor,
    expert: Expert,
    config: ScenConfig,
    generator: torch.Generator,
) -> dict:
    """Train ``expert`` until every target token is the teacher-forced argmax.

    All rows of ``batch`` (the prompt and any rephrases) share one target; the
    stopping rule looks at these rows, the loss also at their noisy copies.
    Returns steps, final loss, min target probability, whether the argmax
    reproduces the target and whether the full stopping rule was met.
    """
    B, n = len(batch.targets), len(batch.targets[0])
    reps = 1 + config.expert_noise_copies
    inputs = {k: v.repeat(reps, 1) for k, v in batch.model_inputs().items()}
    target = torch.tensor(batch.targets, device=out.device).repeat(reps, 1)  # (B*reps, n)
    opt = torch.optim.Adam(expert.parameters(), lr=config.expert_lr)
    out, keys = out.repeat(reps, 1, 1), keys.repeat(reps, 1, 1)

    def edited_output() -> torch.Tensor:
        # The noisy copies make the expert work on hidden states near, not only at, the prompt's.
        noisy = [_jitter(x, B, config.expert_noise, generator) for x in (out, keys)]
        return noisy[0] + expert(noisy[1])  # (B*reps, T, d)

    keep = target_positions(batch.input_ids.shape[1], n, out.device)
    steps, converged = 0, False
    with replay_above(layers, layer, edited_output), torch.enable_grad():
        while True:
            logits = model(**inputs, use_cache=False, logits_to_keep=keep).logits  # (B*reps, n, V)
            logp = F.log_softmax(logits.float(), dim=-1)
            tok_logp = logp.gather(-1, target.unsqueeze(-1)).squeeze(-1)  # (B*reps, n)
            loss = -tok_logp.mean()
            min_prob = tok_logp[:B].min().exp().item()
            reproduced = bool((logits[:B].argmax(-1) == target[:B]).all())
            converged = reproduced and min_prob >= config.expert_min_prob
            if converged or steps >= config.expert_max_steps:
                break
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            steps += 1
    expert.requires_grad_(False)
    return {
        "steps": steps, "loss": loss.item(), "min_target_prob": min_prob,
        "reproduced": reproduced, "converged": converged,
    }


def fit_expert(
    model: PreTrainedModel,
    layers: nn.ModuleList,
    layer: int,
    batch: Batch,
    out: torch.Tensor,
    keys: torch.Tensor,
    config: ScenConfig,
    generator: torch.Generator,
) -> tuple[Expert, dict]:
    """The expert of ``config.expert``'s kind for one edit, and its training metrics.

    A full delta is trained first. A low-rank expert is then that delta's rank-r part, trained
    further (``refit_steps``) until the stopping rule holds again, which it mostly does at once:
    a low-rank expert trained from a random start took more steps (4.9 against 3.6 on 40 ZsRE
    edits, at a step size 6 times larger) to reach the same figures.
    """
    d, h = out.shape[-1], keys.shape[-1]
    full = FullExpert(d, h).to(out.device)
    metrics = train_expert(model, layers, layer, batch, out, keys, full, config, generator)
    if config.expert == "full":
        return full, metrics
    low = low_rank_of(full, config.rank)
    refit = train_expert(model, layers, layer, batch, out, keys, low, config, generator)
    return low, refit | {"steps": metrics["steps"] + refit["steps"], "refit_steps": refit["steps"]}


def target_positions(T: int, n: int, device: torch.device) -> torch.Tensor:
    """Positions whose logits predict the last ``n`` tokens of a length-``T`` row.

    Given as indices rather than a count: the model then gathers a contiguous copy
    before its vocabulary projection, which runs as one matrix product instead of a
    much slower batched product over a strided view.
    """
    return torch.arange(T - n - 1, T - 1, device=device)


def neuron_loss(a_pos: torch.Tensor, a_neg: torch.Tensor, config: ScenConfig) -> torch.Tensor:
    """The paper's loss (Eq. 5-8), averaged over several positives."""
    activate = torch.exp(-a_pos).mean()
    if a_neg.numel() == 0:
        return activate
    disactivate = torch.exp(a_neg + config.alpha).mean()
    margin = torch.exp(a_neg[None, :] - a_pos[:, None] + config.beta).mean()
    return activate + config.margin_weight * (disactivate + margin)


def train_neuron(
    positives: torch.Tensor, negatives: torch.Tensor, config: ScenConfig, generator: torch.Generator,
    init_bias: float | None = None, lr: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Indexing neuron (h,) and bias for normalised keys; ``positives`` (P, h), row 0 the edit prompt.

    It starts as a cosine detector around the edit's own key, which already fires
    on it and on nearby rephrases; the loss then pushes it off the negatives
    (earlier edits, ordinary prompts) and onto the positives.
    """
    noise = torch.randn(config.positive_copies, positives.shape[1], generator=generator).to(positives)
    jitter = F.normalize(positives[:1] + config.positive_noise * noise, dim=-1)
    pos = torch.cat([positives, jitter])  # (P', h)
    bias = config.neuron_init_bias if init_bias is None else init_bias
    w = (positives[0] * config.neuron_init_scale).clone().requires_grad_(True)
    b = torch.tensor(bias, device=positives.device, requires_grad=True)
    opt = torch.optim.Adam([w, b], lr=config.neuron_lr if lr is None else lr)
    with torch.enable_grad():
        for _ in range(config.neuron_steps):
            loss = neuron_loss(torch.sigmoid(pos @ w + b), torch.sigmoid(negatives @ w + b), config)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return w.detach(), b.detach()


class Timer:
    def __init__(self):
        self.start = time.perf_counter()

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.start
