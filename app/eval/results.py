"""The results file: its layout, atomic writes, resuming from it, and merging the parts of a parallel run."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from app.eval.datasets import Dataset
from app.eval.plan import EvalPlan
from app.scen import ScenConfig
from app.scen.store import write_atomic

Results = dict[str, Any]


def new_results(plan: EvalPlan, model_name: str, dataset: Dataset, cfg: ScenConfig, passed_over: list[int]) -> Results:
    """An empty results dict for ``plan``: every section present, no method measured yet."""
    return {
        "model": model_name,
        "dataset": str(plan.dataset),
        "dataset_format": dataset.format,
        "edits": plan.edits,
        "seed": plan.seed,
        "config": dataclasses.asdict(cfg),
        "method_config": {},
        "command": plan.command,
        "checkpoint_edits": plan.checkpoints,
        "generation_sample": plan.sample,
        "records_passed_over": passed_over,
        "methods": {},
        "checkpoints": [{"edits": n, "methods": {}} for n in plan.checkpoints],
        "per_edit": {},
        "sweeps": {},
    }


def write_json(results: Results, path: Path) -> None:
    """Atomic write: an interrupted run never leaves a truncated results file."""
    write_atomic(Path(path), json.dumps(results, indent=1).encode("utf-8"))


def read_json(path: Path) -> Results:
    results: Results = json.loads(Path(path).read_text(encoding="utf-8"))
    return results


def load_partial(plan: EvalPlan) -> Results:
    """What an earlier run of the same plan left in ``plan.out``, for ``--resume``; {} if nothing."""
    path = Path(plan.out)
    if not path.exists():
        return {}
    results = read_json(path)
    same = (
        results.get("dataset") == str(plan.dataset)
        and results.get("seed") == plan.seed
        and results.get("checkpoint_edits") == plan.checkpoints
        and results.get("generation_sample", plan.sample) == plan.sample
    )
    if not same:
        raise ValueError(
            f"{path} was written by a different run (dataset {results.get('dataset')}, seed {results.get('seed')}, "
            f"edits {results.get('checkpoint_edits')}); remove it or drop --resume"
        )
    return results


def merge(parts: Sequence[Results]) -> Results:
    """One results dict from runs of different methods on the same data, seed and checkpoints
    (e.g. methods run in parallel processes). Later parts win where a method appears twice."""
    if not parts:
        raise ValueError("nothing to merge")
    key = ("model", "dataset", "seed", "checkpoint_edits", "records_passed_over", "generation_sample")
    first = parts[0]
    for other in parts[1:]:
        differ = [k for k in key if other.get(k) != first.get(k)]
        if differ:
            raise ValueError(f"cannot merge runs that differ in {', '.join(differ)}")
    out: Results = json.loads(json.dumps(first))
    for other in parts[1:]:
        for section in ("methods", "method_config", "per_edit", "sweeps", "routing"):
            out.setdefault(section, {}).update(other.get(section) or {})
        for mine, theirs in zip(out["checkpoints"], other["checkpoints"]):
            mine["methods"].update(theirs["methods"])
        out["command"] = "; ".join(c for c in (out.get("command"), other.get("command")) if c)
    return out
