"""Sweeps over one setting after the last checkpoint.

An inference-time setting (SCEN's ``theta``, GRACE's ``epsilon_scale``) is changed
in place on the trained method and re-measured: nothing is retrained. Each value
is measured teacher-forced on the run's generation sample (``EvalPlan.sample``). A setting
that changes training (e.g. ``layer``) needs its own sequential run, which
``run_sweeps`` performs on a fresh model copy with teacher-forced metrics only.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from collections.abc import Sequence
from typing import Any

from tqdm.auto import tqdm
from transformers import PreTrainedModel

from app.eval.datasets import EditRecord
from app.eval.factory import build_method
from app.eval.measure import evaluate
from app.eval.method import EditMethod
from app.eval.plan import EvalPlan
from app.eval.reference import Reference
from app.eval.selection import edit_id, sampled
from app.eval.sweep_options import DEFAULTS, parse_sweep, retrains

log = logging.getLogger(__name__)

Row = dict[str, Any]


def run_sweeps(
    method: EditMethod,
    records: Sequence[EditRecord],
    reference: Reference,
    plan: EvalPlan,
    base_model: PreTrainedModel | None = None,
) -> dict[str, list[Row]]:
    """Per swept setting, one row of teacher-forced metrics per value. ``method`` has applied ``records``;
    ``base_model`` (the unedited model) is needed only for settings that retrain."""
    measured = sampled(records, plan.sample, plan.seed)
    results: dict[str, list[Row]] = {}
    for spec in plan.sweeps:
        name, values = parse_sweep(spec)
        if not retrains(method.name, name):
            results[name] = _sweep_in_place(method, name, values, measured, reference, plan)
        elif method.name == "scen":
            if base_model is None:
                log.warning("sweep %s needs retraining and the unedited model; skipped", name)
                continue
            results[name] = _sweep_retrained(method, name, values, records, measured, reference, plan, base_model)
    return results


def _sweep_in_place(
    method: EditMethod,
    name: str,
    values: Sequence[int | float],
    measured: Sequence[EditRecord],
    reference: Reference,
    plan: EvalPlan,
) -> list[Row]:
    original = method.config().get(name, DEFAULTS.get(name))
    rows = []
    for v in values:
        method.set_option(name, v)
        rows.append({"value": v, **evaluate(method, measured, reference, plan, generation=False)})
    method.set_option(name, original if original is not None else values[0])
    return rows


def _sweep_retrained(
    method: EditMethod,
    name: str,
    values: Sequence[int | float],
    records: Sequence[EditRecord],
    measured: Sequence[EditRecord],
    reference: Reference,
    plan: EvalPlan,
    base_model: PreTrainedModel,
) -> list[Row]:
    rows = []
    for v in values:
        sub_plan = dataclasses.replace(plan, overrides=[*plan.overrides, f"{name}={v}"])
        other = build_method(method.name, copy.deepcopy(base_model), method.tokenizer, sub_plan)
        for r in tqdm(records, desc=f"{method.name} {name}={v} edits", unit="edit", leave=False):
            other.apply(edit_id(r), r)
        rows.append({"value": v, **evaluate(other, measured, reference, plan, generation=False)})
        other.close()
    return rows
