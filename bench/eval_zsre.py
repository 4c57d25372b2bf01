"""Benchmark: all four methods on the development ZsRE file, scaling checkpoints and a theta sweep.

Full size (about 1.5 h on 2 CPU cores with --jobs 2, minutes on a GPU):

    .venv/bin/python bench/eval_zsre.py --jobs 2
    # = scen eval --dataset /work/shared/data/zsre_mend_train_1k.json --edits 10,50,200,998 --seed 0
    #     --methods scen,ft,ft_kl,grace --sweep theta=0.5:0.9:0.05 --sample 300
    #     --out bench/results/zsre_smollm2/results.json

``--jobs N`` splits the methods into N contiguous groups, runs each group in its own
process with cores/N threads (training one small model scales poorly past one
thread, so this is faster on a CPU) and merges the parts into one report. Each
part's progress bar goes to ``<out folder>/parts/<methods>/log.txt``.
Smaller: ``--edits 10,25``. ``--resume`` keeps methods that an interrupted run already finished.
"""

import argparse
import json
import logging
import os
import shlex
import subprocess
import sys
from pathlib import Path

from app.eval import report
from app.eval.runner import run_from_cli


def split(items: list[str], n: int) -> list[list[str]]:
    size, extra = divmod(len(items), n)
    out, start = [], 0
    for i in range(n):
        end = start + size + (i < extra)
        if end > start:
            out.append(items[start:end])
        start = end
    return out


def run_parallel(args, argv: list[str]) -> None:
    out = Path(args.out)
    groups = split([m.strip() for m in args.methods.split(",") if m.strip()], args.jobs)
    threads = max(1, (os.cpu_count() or 1) // len(groups))
    parts = []
    for group in groups:
        folder = out.parent / "parts" / "_".join(group)
        folder.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, __file__, *argv, "--jobs", "1", "--methods", ",".join(group),
               "--out", str(folder / "results.json")]
        env = os.environ | {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
        log = open(folder / "log.txt", "w")
        print(f"{','.join(group)}: {threads} thread(s), log in {folder / 'log.txt'}", flush=True)
        parts.append((group, folder, subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT), log))
    failed = []
    for group, folder, proc, log in parts:
        if proc.wait() != 0:
            failed.append(f"{','.join(group)} (exit {proc.returncode}, see {folder / 'log.txt'})")
        log.close()
    if failed:
        sys.exit("failed: " + "; ".join(failed))
    merged = report.merge([json.loads((folder / "results.json").read_text()) for _, folder, _, _ in parts])
    merged["command"] = " ".join(shlex.quote(a) for a in ["python", sys.argv[0], *argv, "--jobs", str(args.jobs)])
    report.render(merged, out)
    report.write_json(merged, out)
    report.print_summary(merged)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--dataset", default="/work/shared/data/zsre_mend_train_1k.json")
    # The file holds 1000 records, 998 of them usable (two have an empty target).
    ap.add_argument("--edits", default="10,50,200,998")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--methods", default="scen,ft,ft_kl,grace")
    ap.add_argument("--sweep", action="append", default=None)
    ap.add_argument("--set", action="append", default=[], dest="overrides")
    ap.add_argument("--option", action="append", default=[])
    ap.add_argument("--out", default="bench/results/zsre_smollm2/results.json")
    ap.add_argument("--no-generation", action="store_true")
    ap.add_argument("--sample", type=int, default=300)
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--jobs", type=int, default=1, help="parallel processes, each running a group of methods")
    args = ap.parse_args()
    if args.jobs > 1:
        # Re-run this script once per group with the same arguments, minus --jobs/--methods/--out.
        argv, skip = [], False
        for a in sys.argv[1:]:
            if skip:
                skip = False
                continue
            name = a.split("=", 1)[0]
            if name in ("--jobs", "--methods", "--out"):
                skip = "=" not in a
                continue
            argv.append(a)
        run_parallel(args, argv)
        sys.exit(0)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    run_from_cli(
        dataset=Path(args.dataset), edits=args.edits, seed=args.seed, out=Path(args.out), model=None,
        methods=args.methods, overrides=args.overrides, sweeps=args.sweep or ["theta=0.5:0.9:0.05"],
        resume=args.resume, method_options=args.option, generation=not args.no_generation,
        command=" ".join(shlex.quote(a) for a in ["python", *sys.argv]), sample=args.sample,
    )
