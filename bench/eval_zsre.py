"""Benchmark: all four methods on the development ZsRE file, scaling checkpoints and a theta sweep.

Full size (about 1.5 h on 2 CPU cores, minutes on a GPU):

    .venv/bin/python bench/eval_zsre.py
    # = scen eval --dataset /work/shared/data/zsre_mend_train_1k.json --edits 10,50,200,998 --seed 0
    #     --methods scen,ft,ft_kl,grace --sweep theta=0.5:0.9:0.05 --sample 300 --jobs 2
    #     --out bench/results/zsre_smollm2/results.json

The file holds 1000 records, 998 of them usable (two have an empty target), hence 998.
``--jobs 2`` runs scen+ft and ft_kl+grace in two one-thread processes and merges them
(``app/eval/parallel.py``); ``--jobs 1`` runs them one after another. Smaller:
``--edits 10,25``. ``--resume`` keeps methods that an interrupted run already finished.
"""

import argparse
import logging
import shlex
import sys
from pathlib import Path

from app.eval.command import run_from_cli

if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--dataset", default="/work/shared/data/zsre_mend_train_1k.json")
    ap.add_argument("--edits", default="10,50,200,998")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--methods", default="scen,ft,ft_kl,grace")
    ap.add_argument("--sweep", action="append", default=None)
    ap.add_argument("--set", action="append", default=[], dest="overrides")
    ap.add_argument("--option", action="append", default=[])
    ap.add_argument("--out", default="bench/results/zsre_smollm2/results.json")
    ap.add_argument("--no-generation", action="store_true")
    ap.add_argument("--sample", type=int, default=300)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--resume", action="store_true")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    run_from_cli(
        dataset=Path(args.dataset), edits=args.edits, seed=args.seed, out=Path(args.out), model=None,
        methods=args.methods, overrides=args.overrides, sweeps=args.sweep or ["theta=0.5:0.9:0.05"],
        resume=args.resume, method_options=args.option, generation=not args.no_generation,
        command=" ".join(shlex.quote(a) for a in ["python", *sys.argv]), sample=args.sample, jobs=args.jobs,
    )
