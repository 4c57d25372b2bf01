"""Running the methods of one evaluation in parallel processes and merging their results.

Training one small model barely uses a second CPU thread, so on a CPU the methods
finish sooner side by side, each in its own process with cores/jobs threads, than
one after another with every thread. Each group of methods is an ordinary
``scen eval`` run writing ``<out folder>/parts/<methods>/results.json`` (its
progress bar goes to ``log.txt`` beside it); the parts are then merged into one
``results.json`` and report.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from app.eval import report


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


def eval_args(plan, methods: list[str], out: Path) -> list[str]:
    """The ``scen eval`` arguments that run ``plan`` for ``methods`` only, writing to ``out``."""
    args = ["--dataset", str(plan.dataset), "--edits", ",".join(map(str, plan.checkpoints)),
            "--seed", str(plan.seed), "--methods", ",".join(methods), "--out", str(out),
            "--sample", str(plan.sample)]
    if plan.model:
        args += ["--model", plan.model]
    for flag, values in (("--set", plan.overrides), ("--sweep", plan.sweeps), ("--option", plan.method_options)):
        for value in values:
            args += [flag, value]
    if not plan.generation:
        args.append("--no-generation")
    if plan.resume:
        args.append("--resume")
    return args


def run_parallel(plan, jobs: int) -> dict[str, Any]:
    groups = split(plan.methods, jobs)
    threads = max(1, (os.cpu_count() or 1) // len(groups))
    env = os.environ | {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    running = []
    for group in groups:
        folder = Path(plan.out).parent / "parts" / "_".join(group)
        folder.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "app.cli", "eval", *eval_args(plan, group, folder / "results.json")]
        log = open(folder / "log.txt", "w", encoding="utf-8")
        print(f"{','.join(group)}: {threads} thread(s); progress in {folder / 'log.txt'}", flush=True)
        running.append((group, folder, subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT), log))
    failed = []
    try:
        for group, folder, proc, log in running:
            if proc.wait() != 0:
                failed.append(f"{','.join(group)} (exit {proc.returncode}; see {folder / 'log.txt'})")
    finally:
        for _, _, proc, log in running:
            if proc.poll() is None:  # interrupted: stop the others too
                proc.terminate()
            log.close()
    if failed:
        raise RuntimeError("evaluation part(s) failed: " + "; ".join(failed))
    results = report.merge([json.loads((folder / "results.json").read_text()) for _, folder, _, _ in running])
    results["command"] = plan.command
    return results
