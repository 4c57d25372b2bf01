"""The ``scen eval`` command: a plan from command-line values, the run (sequential or in
parallel processes), report.md with its plots, results.json, and a summary table on the console."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from app.eval.parallel import run_parallel
from app.eval.plan import EvalPlan, parse_checkpoints, parse_methods
from app.eval.report import metrics_table, render
from app.eval.results import Results, write_json
from app.eval.runner import run


def run_from_cli(
    dataset: Path,
    edits: str,
    seed: int,
    out: Path,
    model: str | None,
    methods: str,
    overrides: list[str],
    sweeps: list[str],
    resume: bool,
    method_options: list[str] | None = None,
    generation: bool = True,
    command: str | None = None,
    sample: int = EvalPlan.sample,
    jobs: int = 1,
) -> Results:
    plan = EvalPlan(
        dataset=Path(dataset), checkpoints=parse_checkpoints(edits), seed=seed, methods=parse_methods(methods),
        overrides=list(overrides), sweeps=list(sweeps), out=Path(out), model=model, resume=resume,
        method_options=list(method_options or []), generation=generation, sample=sample,
    )
    plan.scen_config()  # fail on a bad --set before loading anything
    plan.command = command or "scen " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    results = run_parallel(plan, jobs) if jobs > 1 and len(plan.methods) > 1 else run(plan)
    render(results, plan.out)
    write_json(results, plan.out)
    print_summary(results)
    return results


def print_summary(results: Results, console: Console | None = None) -> None:
    rows = metrics_table(results["methods"])
    table = Table(title=f"{results['edits']} edits, seed {results['seed']}")
    for col in rows[0]:
        table.add_column(col)
    for row in rows[1:]:
        table.add_row(*row)
    (console or Console()).print(table)
