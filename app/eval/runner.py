"""Sequential-editing evaluation: apply edits one after another, measure at checkpoints.

One run shuffles the data file with ``random.Random(seed)``, keeps the first
``max(checkpoints)`` usable records (``app.eval.selection``) and, for each method on
its own copy of the unedited model, applies them in that order. At every checkpoint
n it measures on the first n records (``app.eval.measure.evaluate``); scaling curves
therefore come from one sequential run, never from restarts.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from app.eval.datasets import EditRecord, load_dataset
from app.eval.factory import build_method
from app.eval.measure import evaluate, routing_snapshot, train_summary
from app.eval.method import EditMethod
from app.eval.neighbours import build_probes
from app.eval.plan import EvalPlan
from app.eval.reference import Reference, build_reference
from app.eval.results import Results, load_partial, new_results, write_json
from app.eval.selection import Selection, edit_id, select_records, within_limits
from app.eval.sweeps import run_sweeps
from app.models import LoadedModel, load_model
from app.scen import InvalidEditError

log = logging.getLogger(__name__)

OnCheckpoint = Callable[[Results], None]


def run(plan: EvalPlan, lm: LoadedModel | None = None, on_checkpoint: OnCheckpoint | None = None) -> Results:
    """Every method of ``plan``, one after another; ``results`` is written to ``plan.out`` at each checkpoint."""
    dataset = load_dataset(plan.dataset)
    if lm is None:
        lm = load_model(plan.model)
    cfg = plan.scen_config()
    selection = select_records(dataset, plan.edits, plan.seed, within_limits(lm.tokenizer, cfg))
    _warn_passed_over(selection)
    results = load_partial(plan) if plan.resume else {}
    if not results:
        results = new_results(plan, lm.name, dataset, cfg, selection.passed_over)
    log.info("%s: %s format, %d records; editing %d (seed %d)", plan.dataset, dataset.format, len(dataset),
             plan.edits, plan.seed)

    torch.manual_seed(plan.seed)
    reference = build_reference(lm.model, lm.tokenizer, selection.records, plan)
    chosen = {r.index for r in selection.records}
    reference.probes = build_probes(selection.records, [r for r in dataset.records if r.index not in chosen],
                                    plan.seed)
    results["unedited"] = reference.metrics

    for name in plan.methods:
        if name in results["methods"] and all(name in c["methods"] for c in results["checkpoints"]):
            log.info("%s already complete in %s; skipping", name, plan.out)
            continue
        torch.manual_seed(plan.seed)
        method = build_method(name, copy.deepcopy(lm.model), lm.tokenizer, plan)
        results["method_config"][name] = method.config()
        edited = MethodRun(name, method, reference, plan, results, on_checkpoint).apply(selection.records)
        if plan.sweeps:
            results["sweeps"][name] = run_sweeps(method, edited, reference, plan, lm.model)
        if method.routes:
            results.setdefault("routing", {})[name] = routing_snapshot(method, edited, plan)
        write_json(results, plan.out)
        method.close()
    return results


def _warn_passed_over(selection: Selection) -> None:
    for reason, indices in selection.by_reason().items():
        log.warning("records %s passed over: %s", indices, reason)


@dataclass
class MethodRun:
    """One method's sequential edits, measured at the plan's checkpoints into ``results``."""

    name: str
    method: EditMethod
    reference: Reference
    plan: EvalPlan
    results: Results
    on_checkpoint: OnCheckpoint | None = None
    per_edit: list[dict[str, Any]] = field(default_factory=list)
    edited: list[EditRecord] = field(default_factory=list)

    def apply(self, records: Sequence[EditRecord]) -> list[EditRecord]:
        """Apply ``records`` in order; returns those the method accepted."""
        with tqdm(total=self.plan.edits, desc=f"{self.name} edits", unit="edit", dynamic_ncols=True) as bar:
            for n, record in enumerate(records, start=1):
                m = self._apply_one(record)
                bar.update(1)
                bar.set_postfix(steps=m.get("steps"), s=f"{m['seconds']:.2f}" if m.get("seconds") else "-")
                if n in self.plan.checkpoints:
                    bar.set_description(f"{self.name} eval@{n}")
                    self._checkpoint(n)
                    bar.set_description(f"{self.name} edits")
        return self.edited

    def _apply_one(self, record: EditRecord) -> dict[str, Any]:
        eid = edit_id(record)
        try:
            m = self.method.apply(eid, record)
            self.edited.append(record)
        except InvalidEditError as exc:
            log.warning("%s: record %d not edited: %s", self.name, record.index, exc)
            m = {"error": str(exc), "seconds": None}
        self.per_edit.append({"id": eid, **m})
        return m

    def _checkpoint(self, n: int) -> None:
        secs = [e["seconds"] for e in self.per_edit if e.get("seconds") is not None]
        metrics = evaluate(self.method, self.edited, self.reference, self.plan, secs)
        metrics["train"] = train_summary(self.per_edit)
        for c in self.results["checkpoints"]:
            if c["edits"] == n:
                c["methods"][self.name] = metrics
        if n == self.plan.edits:
            self.results["methods"][self.name] = metrics
        self.results["per_edit"][self.name] = self.per_edit
        write_json(self.results, self.plan.out)
        if self.on_checkpoint:
            self.on_checkpoint(self.results)
