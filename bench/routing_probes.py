"""Where edits route, without training experts: neurons trained sequentially on N records, then
the share of prompts routed per kind.

    .venv/bin/python bench/routing_probes.py --edits 100 --tag two_factor [--set key=value ...]

Per data file (seeded shuffle, seed 0): the edit prompt routed to its own edit, each rephrase
routed to its own edit, locality prompts routed to any edit, and two hard-negative probe sets
built from the data itself, as the evaluation builds them (``app.eval.neighbours``).
Routing needs no expert, so experts are skipped (``expert_max_steps=0``); the routed rates are
those the full engine has. Results go to bench/results/routing_probes/<tag>.json.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch

from app.eval.datasets import load_dataset
from app.eval.neighbours import build_probes
from app.models import load_model
from app.scen import Editor, ScenConfig

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
FILES = ["zsre_mend_train_1k.json", "counterfact_dev_2k.json"]


def measure(lm, path: Path, n: int, config: ScenConfig) -> dict[str, float]:
    records = [r for r in load_dataset(path).records if r.editable and r.subject]
    random.Random(0).shuffle(records)
    edited, held = records[:n], records[n : n + 300]
    editor = Editor(lm.model, lm.tokenizer, config)
    start = time.perf_counter()
    for i, r in enumerate(edited):
        editor.add(f"e{i}", editor.train(r.prompt, r.target, subject=r.subject))
    seconds = (time.perf_counter() - start) / n

    def routed(prompts: list[str]) -> torch.Tensor:  # (n,) routed slot, -1 = base
        with torch.no_grad():
            return torch.tensor([-1 if g.edit_id is None else int(g.edit_id[1:])
                                 for g in editor.generate(prompts, max_new_tokens=1)])

    own = routed([r.prompt for r in edited])
    rephrases = [(i, p) for i, r in enumerate(edited) for p in r.rephrases]
    reph = routed([p for _, p in rephrases])
    loc = routed([p for r in edited for p, _ in r.locality])
    probes = build_probes(edited, held, seed=0)
    other = [p for _, p in probes.other_subject]
    same = [p for _, p in probes.same_subject]
    results = {
        "prompt_routed_own": (own == torch.arange(n)).float().mean().item(),
        "rephrase_routed_own": sum(int(x) == i for (i, _), x in zip(rephrases, reph.tolist())) / len(rephrases),
        "locality_routed": (loc >= 0).float().mean().item(),
        "probe_other_subject_routed": (routed(other) >= 0).float().mean().item(),
        "probe_same_subject_routed": (routed(same) >= 0).float().mean().item(),
        "neuron_seconds_per_edit": seconds,
    }
    editor.detach()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--edits", type=int, default=100)
    parser.add_argument("--tag", default="default")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--files", nargs="+", default=FILES)
    args = parser.parse_args()
    config = ScenConfig.from_overrides([*args.overrides, "expert_max_steps=0"])
    lm = load_model()
    results = {}
    for name in args.files:
        results[name] = measure(lm, args.data / name, args.edits, config)
        print(name, {k: round(v, 3) for k, v in results[name].items()}, flush=True)
    out = Path("bench/results/routing_probes") / f"{args.tag}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"edits": args.edits, "overrides": args.overrides, "results": results}, indent=1))


if __name__ == "__main__":
    main()
