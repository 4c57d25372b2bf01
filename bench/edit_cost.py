"""Seconds per edit against the number of live edits already in the editor, and where an edit
spends them.

    PYTHONPATH=. .venv/bin/python bench/edit_cost.py [--sizes 0,1000,10000] [--edits 8] [--set expert=full]

(``PYTHONPATH=.``: see bench/throughput.py.)

``Editor.train`` trains real edits (the first ``--edits`` ZsRE records of
../shared/data/zsre_mend_train_1k.json: prompt, rephrase, subject, target ``alt``) with 0, 1,000
and 10,000 synthetic live edits in the editor. Each training runs against the same live set (an
edit trained is not added), so the sizes differ only in the live edits: an edit's subject factor
is trained against every earlier edit about another subject, its relation factor against those
about its subject, and its checks read every live neuron. One untimed edit first.

The synthetic live edits are the neurons of bench/real_neurons.py (real keys of the bundled model,
as bench/routing.py uses them), less the edit neurons built from the records trained here, each with one
raw subject key and one raw question key, as an edit posted without rephrases keeps; their
expert is one shared rank-1 low-rank expert (training never routes, so it is never used).

Phases: ``expert`` and ``neuron`` come from the metrics ``Editor.train`` returns
(``expert_seconds``; ``seconds`` less that). Within them, timed by wrapping the editor's steps:
``record`` (the forward pass recording the edited layer's output and keys, subject and relation
keys), ``expert_training`` (the rest of ``expert``: the training steps), ``other_subjects`` (the
pass reading the prompt with other subjects' keys), ``neuron_training`` (both factors), and
``checks`` (the new neuron's activations, every live neuron's on the prompt, overrides). Results:
bench/results/edit_cost.json and edit_cost.png.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import time
from pathlib import Path

import torch
from real_neurons import cache_dir, key_norms, live_edits, load_keys, make_neurons, run_facts, twins, write_result

import app.scen.editor as editor_module
from app.models import load_model
from app.scen import Editor, ScenConfig
from app.scen.experts import new_expert

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
OUT = Path("bench/results")
PHASES = ("record", "expert_training", "other_subjects", "neuron_training", "checks")


class Phases:
    """Seconds spent in wrapped callables since the last ``take``, by name."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def wrap(self, name: str, fn):
        @functools.wraps(fn)
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

        return timed

    def take(self) -> dict[str, float]:
        seconds, self.seconds = self.seconds, {}
        return seconds


def quantile(xs: list[float], q: float) -> float:
    return round(float(torch.tensor(xs).quantile(q)), 3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="0,1000,10000")
    parser.add_argument("--edits", type=int, default=8, help="edits trained (timed) per size")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="engine setting, e.g. --set expert=full")
    parser.add_argument("--out", default=str(OUT / "edit_cost.json"))
    args = parser.parse_args()
    sizes = sorted(int(s) for s in args.sizes.split(","))
    torch.manual_seed(0)
    wall = time.perf_counter()
    load = os.getloadavg()
    cfg = ScenConfig.from_overrides(args.overrides)
    lm = load_model()
    editor = Editor(lm.model, lm.tokenizer, cfg, cache_dir=cache_dir().parent)
    zsre = json.loads((DATA / "zsre_mend_train_1k.json").read_text())
    records = zsre[: args.edits + 1]

    phases = Phases()
    # Instance attributes shadow the methods: the editor calls these through ``self``.
    editor._record = phases.wrap("record", editor._record)
    editor._subject_keys = phases.wrap("other_subjects", editor._subject_keys)
    editor._neuron_metrics = phases.wrap("checks", editor._neuron_metrics)
    editor_module.two_factor_neuron = phases.wrap("neuron_training", editor_module.two_factor_neuron)

    def train(record: dict) -> dict:
        phases.take()
        edit = editor.train(record["src"], record["alt"], [record["rephrase"]], record["subject"])
        m, took = edit.metrics, phases.take()
        split = {name: took.get(name, 0.0) for name in PHASES}
        split["expert_training"] = m["expert_seconds"] - split["record"]
        neuron_parts = split["other_subjects"] + split["neuron_training"] + split["checks"]
        split["other"] = m["seconds"] - m["expert_seconds"] - neuron_parts
        return {"seconds": m["seconds"], "expert": m["expert_seconds"], "neuron": m["seconds"] - m["expert_seconds"],
                "steps": m["steps"], "converged": m["converged"], "activation": m["activation"],
                "fires_on_prompt": len(m.get("fires_on_prompt", ())), **split}

    train(records[0])  # untimed: first-call allocations
    keys = load_keys()
    s_norm, _ = key_norms(keys)
    neurons = make_neurons(keys, max(sizes) + len(records), cfg, *key_norms(keys))
    # The records trained here are ZsRE's first, the first rows of the corpus's edits.
    skip = twins(neurons, range(len(records)))
    order = [i for i in range(len(neurons["kinds"])) if i not in skip][: max(sizes)]
    d, h = editor.adapter.down_weight(editor.routed.base).shape
    shared = new_expert("lowrank", d, h, 1).requires_grad_(False)
    rows = []
    for n in sizes:
        live = len(editor.edit_ids)
        start = time.perf_counter()
        if n > live:
            added = live_edits(neurons, keys, s_norm, editor.layer, order[live:n], lambda _: shared)
            for i, edit in zip(order[live:n], added):
                editor.add(f"synthetic {i}", edit)
        add_s = time.perf_counter() - start
        per_edit = [train(r) for r in records[1:]]
        row: dict = {"live_edits": n, "add_s": round(add_s, 2),
                     "earlier_subject_keys": sum(len(e.subject_keys) for e in editor._edits.values())}
        for name in ("seconds", "expert", "neuron", *PHASES, "other"):
            xs = [e[name] for e in per_edit]
            row[name] = {"p50": quantile(xs, 0.5), "p95": quantile(xs, 0.95), "mean": round(statistics.mean(xs), 3)}
        row["steps_mean"] = round(statistics.mean(e["steps"] for e in per_edit), 1)
        row["converged"] = sum(e["converged"] for e in per_edit)
        row["fires_on_prompt_mean"] = round(statistics.mean(e["fires_on_prompt"] for e in per_edit), 2)
        row["per_edit"] = per_edit
        print({k: v for k, v in row.items() if k != "per_edit"}, flush=True)
        rows.append(row)
        Path(args.out).with_suffix(".partial.json").write_text(json.dumps(rows, indent=1) + "\n")
    result = run_facts(__doc__, load) | {
        "command": " ".join(["PYTHONPATH=. .venv/bin/python bench/edit_cost.py", f"--sizes {args.sizes}",
                             f"--edits {args.edits}", *(f"--set {o}" for o in args.overrides)]),
        "expert": cfg.expert,
        "rank": cfg.rank,
        "prompts": [r["src"] for r in records[1:]],
        "rows": rows,
        "wall_s": round(time.perf_counter() - wall, 1),
    }
    write_result(args.out, result, plot)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (total, split) = plt.subplots(1, 2, figsize=(11, 4))
    labels = [f"{r['live_edits']:,}" for r in rows]
    xs = range(len(rows))
    total.plot(xs, [r["seconds"]["p50"] for r in rows], "-o", label="p50")
    total.plot(xs, [r["seconds"]["p95"] for r in rows], "-s", label="p95")
    total.set_ylabel("seconds per edit")
    total.set_title("Training one edit")
    bottom = [0.0] * len(rows)
    for name in (*PHASES, "other"):
        values = [r[name]["mean"] for r in rows]
        split.bar(xs, values, bottom=bottom, label=name.replace("_", " "))
        bottom = [b + v for b, v in zip(bottom, values)]
    split.set_ylabel("seconds per edit (mean)")
    split.set_title("Where an edit spends them")
    for ax in (total, split):
        ax.set_xticks(list(xs), labels)
        ax.set_xlabel("live edits already in the editor")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
