"""Sweeps over one setting after the last checkpoint.

An inference-time setting (SCEN's ``theta``, GRACE's ``epsilon_scale``) is changed
in place on the trained method and re-measured: nothing is retrained. Each value
is measured teacher-forced on the run's generation sample (``EvalPlan.sample``). A setting
that changes training (e.g. ``layer``) needs its own sequential run, which
``run_sweeps`` performs on a fresh model copy with teacher-forced metrics only.
"""

from __future__ import annotations

import copy
import logging
from typing import Any, Sequence

from tqdm.auto import tqdm

from app.eval.datasets import EditRecord
from app.eval.method import EditMethod

log = logging.getLogger(__name__)

INFERENCE_OPTIONS = {"scen": {"theta"}, "grace": {"epsilon_scale"}}
DEFAULTS = {"theta": None, "epsilon_scale": 1.0}


def _number(text: str) -> int | float:
    # Integer-valued options (layer, rank) keep their type so they reach configs and tables as ints.
    text = text.strip()
    try:
        return int(text)
    except ValueError:
        return float(text)


def parse_sweep(spec: str) -> tuple[str, list[int | float]]:
    """``name=start:stop:step`` (stop included) or ``name=v1,v2,...``."""
    name, sep, values = spec.partition("=")
    if not sep or not values:
        raise ValueError(f"bad sweep {spec!r}: expected name=start:stop:step or name=v1,v2")
    name = name.strip()
    try:
        if ":" in values:
            start, stop, step = (_number(x) for x in values.split(":"))
            if step <= 0:
                raise ValueError("step must be positive")
            n = int(round((stop - start) / step)) + 1
            integral = isinstance(start, int) and isinstance(step, int)
            out = [start + i * step if integral else round(start + i * step, 10) for i in range(n)]
        else:
            out = [_number(x) for x in values.split(",")]
    except ValueError as exc:
        raise ValueError(f"bad sweep {spec!r}: {exc}") from None
    return name, out


def run_sweeps(
    method: EditMethod, records: Sequence[EditRecord], reference, plan, base_model=None
) -> dict[str, Any]:
    from app.eval.runner import build_method, edit_id, evaluate, sampled

    measured = sampled(records, plan.sample, plan.seed)
    results: dict[str, Any] = {}
    for spec in plan.sweeps:
        name, values = parse_sweep(spec)
        rows = []
        if name in INFERENCE_OPTIONS.get(method.name, set()):
            original = method.config().get(name, DEFAULTS.get(name))
            for v in values:
                method.set_option(name, v)
                rows.append({"value": v, **evaluate(method, measured, reference, plan, generation=False)})
            method.set_option(name, original if original is not None else values[0])
        elif method.name == "scen" and name not in INFERENCE_OPTIONS["scen"]:
            if base_model is None:
                log.warning("sweep %s needs retraining and the unedited model; skipped", name)
                continue
            for v in values:
                sub_plan = copy.copy(plan)
                sub_plan.overrides = list(plan.overrides) + [f"{name}={v}"]
                other = build_method("scen", copy.deepcopy(base_model), method.tokenizer, sub_plan)
                for r in tqdm(records, desc=f"{method.name} {name}={v} edits", unit="edit", leave=False):
                    other.apply(edit_id(r), r)
                rows.append({"value": v, **evaluate(other, measured, reference, plan, generation=False)})
                other.close()
        else:
            continue
        results[name] = rows
    return results
