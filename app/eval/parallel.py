"""Running the methods of one evaluation in parallel processes and merging their results.

Training one small model barely uses a second CPU thread, so on a CPU the methods
finish sooner side by side, each in its own process with cores/jobs threads, than
one after another with every thread. Each group of methods is run by ``run_part`` in
a spawned process (forking is unsafe once torch has started OpenMP threads or CUDA) that receives
the plan narrowed to its methods and writes ``<out folder>/parts/<methods>/results.json``,
its progress bars and log going to ``log.txt`` beside it; the parts are then merged
into one results dict.
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing
import os
from pathlib import Path

import torch

from app.eval.plan import EvalPlan
from app.eval.results import Results, merge, read_json
from app.eval.runner import run
from app.logs import configure_logging

log = logging.getLogger(__name__)


def split(items: list[str], n: int) -> list[list[str]]:
    """``items`` in at most ``n`` contiguous groups of near-equal size."""
    size, extra = divmod(len(items), n)
    out, start = [], 0
    for i in range(n):
        end = start + size + (i < extra)
        if end > start:
            out.append(items[start:end])
        start = end
    return out


def part_plan(plan: EvalPlan, methods: list[str]) -> EvalPlan:
    """``plan`` for ``methods`` only, writing into its own folder under ``parts`` beside ``plan.out``."""
    folder = Path(plan.out).parent / "parts" / "_".join(methods)
    return dataclasses.replace(plan, methods=list(methods), out=folder / "results.json")


def run_part(plan: EvalPlan, threads: int, log_file: Path, verbose: bool = False) -> None:
    """The body of one spawned process: ``run(plan)`` with ``threads`` threads, all output into ``log_file``."""
    with open(log_file, "w", encoding="utf-8") as f:
        # File descriptors, not sys.stdout/sys.stderr: tqdm, logging, warnings and native
        # libraries all write to them.
        os.dup2(f.fileno(), 1)
        os.dup2(f.fileno(), 2)
    os.environ |= {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    torch.set_num_threads(threads)
    configure_logging(verbose)
    run(plan)


def run_parallel(plan: EvalPlan, jobs: int) -> Results:
    """``plan``'s methods in at most ``jobs`` processes; their results merged, ``command`` the plan's."""
    parts = [part_plan(plan, group) for group in split(plan.methods, jobs)]
    threads = max(1, (os.cpu_count() or 1) // len(parts))
    verbose = logging.getLogger().isEnabledFor(logging.DEBUG)
    spawn = multiprocessing.get_context("spawn")
    running = []
    failed = []
    try:
        for part in parts:
            log_file = part.out.parent / "log.txt"
            log_file.parent.mkdir(parents=True, exist_ok=True)
            proc = spawn.Process(target=run_part, args=(part, threads, log_file, verbose),
                                 name=f"eval-{'_'.join(part.methods)}")
            proc.start()
            running.append((part, proc, log_file))
            log.info("%s: %d thread(s); progress in %s", ",".join(part.methods), threads, log_file)
        for part, proc, log_file in running:
            proc.join()
            if proc.exitcode != 0:
                failed.append(f"{','.join(part.methods)} (exit {proc.exitcode}; see {log_file})")
    finally:
        for _, proc, _ in running:
            if proc.is_alive():  # interrupted: stop the others too
                proc.terminate()
                proc.join()
    if failed:
        raise RuntimeError("evaluation part(s) failed: " + "; ".join(failed))
    results = merge([read_json(part.out) for part in parts])
    results["command"] = plan.command
    return results
