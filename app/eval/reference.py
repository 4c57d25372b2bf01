"""The unedited model's answers on every prompt of a run: what locality and the "before" numbers compare with."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from app.eval import metrics as M
from app.eval.datasets import EditRecord
from app.eval.neighbours import Probes
from app.eval.plan import EvalPlan
from app.eval.scoring import generation_limit, greedy, teacher_forced

LocalityKey = tuple[int, int]  # (record index, position in its locality list)
LocalityItem = tuple[LocalityKey, str, str]  # (key, prompt, answer)


@dataclass
class Reference:
    """What the unedited model does on every prompt of the run, for locality and "before" numbers."""

    loc_predicted: dict[LocalityKey, list[int]]  # argmax ids, teacher-forced on prompt + answer
    metrics: dict[str, Any]
    model: PreTrainedModel | None = None  # the unedited model, for greedy generations asked for later
    tokenizer: PreTrainedTokenizerBase | None = None
    batch_size: int = 16
    loc_generated: dict[LocalityKey, str] = field(default_factory=dict)
    probes: Probes = field(default_factory=lambda: Probes([], []))

    def generations(self, items: Sequence[LocalityItem]) -> dict[LocalityKey, str]:
        """The unedited model's greedy generation on locality ``items``, each generated once per run."""
        todo = [item for item in items if item[0] not in self.loc_generated]
        if todo:
            if self.model is None or self.tokenizer is None:
                raise ValueError("this reference holds no model to generate with")
            limits = [generation_limit(self.tokenizer, a) for _, _, a in todo]
            with tqdm(total=len(todo), desc="unedited generation", leave=False) as bar:
                gens = greedy(self.model, self.tokenizer, [p for _, p, _ in todo], limits,
                              batch_size=self.batch_size, progress=bar.update)
            self.loc_generated |= {key: g.text for (key, _, _), g in zip(todo, gens)}
        return {key: self.loc_generated[key] for key, _, _ in items}


def locality_items(records: Sequence[EditRecord]) -> list[LocalityItem]:
    return [((r.index, j), p, a) for r in records for j, (p, a) in enumerate(r.locality)]


def build_reference(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, records: Sequence[EditRecord], plan: EvalPlan
) -> Reference:
    items = locality_items(records)
    loc_prompts = [p for _, p, _ in items]
    loc_answers = [a for _, _, a in items]
    n_rel = len(records)
    prompts = [r.prompt for r in records] + loc_prompts
    targets = [r.target for r in records] + loc_answers
    with tqdm(total=len(prompts), desc="unedited model", leave=False) as bar:
        scored = teacher_forced(model, tokenizer, prompts, targets, batch_size=plan.batch_size, progress=bar.update)
    loc_pred = {key: s.predicted for (key, _, _), s in zip(items, scored[n_rel:])}
    rel = [M.token_accuracy(s.predicted, s.target) for s in scored[:n_rel]]
    ppl = [M.perplexity(s.logprobs) for s in scored[:n_rel]]
    return Reference(loc_pred, {"reliability": M.mean(rel), "target_perplexity": M.mean(ppl)}, model, tokenizer,
                     plan.batch_size)
