"""Re-render report.md and the PNG plots from results.json, or merge the results of runs of
different methods (same data, seed and checkpoints; e.g. run in parallel) into one report.

    .venv/bin/python bench/eval_report.py bench/results/zsre_smollm2/results.json
    .venv/bin/python bench/eval_report.py runs/a/results.json runs/b/results.json --out runs/all/results.json
"""

import argparse
import json
from pathlib import Path

from app.eval.report import render
from app.eval.results import merge, write_json

if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("results", nargs="+", type=Path)
    ap.add_argument("--out", type=Path, help="where to write the merged results.json (default: the first input)")
    args = ap.parse_args()
    results = merge([json.loads(p.read_text()) for p in args.results])
    out = args.out or args.results[0]
    md = render(results, out)
    write_json(results, out)
    print(md.read_text())
