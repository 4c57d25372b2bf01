"""Where edits route, without training experts: neurons trained sequentially on N records, then
the share of prompts routed per kind.

    .venv/bin/python bench/routing_probes.py --edits 100 --tag two_factor [--set key=value ...] \
        [--margins 0,-1,-2] [--subject-margins 3,4]

Per data file (seeded shuffle, seed 0): the edit prompt routed to its own edit, each rephrase
routed to its own edit, locality prompts routed to any edit, and two hard-negative probe sets
built from the data itself, as the evaluation builds them (``app.eval.neighbours``).
Routing needs no expert, so experts are skipped (``expert_max_steps=0``); the routed rates are
those the full engine has. ``--margins`` and ``--subject-margins`` re-read the same trained neurons at
every pair of relation and subject margins (both are read at routing), under "margins" as
"subject,relation". Results go to bench/results/routing_probes/<tag>.json.
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
from app.scen.routed import RoutingKeys

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
FILES = ["zsre_mend_train_1k.json", "counterfact_dev_2k.json"]


def _chunks(items: list[str], n: int) -> list[list[str]]:
    return [items[i : i + n] for i in range(0, len(items), n)]


def measure(lm, path: Path, n: int, config: ScenConfig, margins: list[tuple[float, float]]) -> dict:
    records = [r for r in load_dataset(path).records if r.editable and r.subject]
    random.Random(0).shuffle(records)
    edited, held = records[:n], records[n : n + 300]
    n = len(edited)  # a file may hold fewer editable records than asked for
    editor = Editor(lm.model, lm.tokenizer, config)
    start = time.perf_counter()
    for i, r in enumerate(edited):
        editor.add(f"e{i}", editor.train(r.prompt, r.target, subject=r.subject))
    seconds = (time.perf_counter() - start) / n

    router = editor.routed.router
    keys_of: dict[tuple[str, ...], list[RoutingKeys]] = {}

    def routed(prompts: list[str]) -> torch.Tensor:  # (n,) routed slot, -1 = base
        # Keys are recorded once per prompt set: the margins re-read them without a model pass.
        if tuple(prompts) not in keys_of:
            keys_of[tuple(prompts)] = [editor.routing_keys(chunk) for chunk in _chunks(prompts, 64)]
        with torch.no_grad():
            return torch.cat([router.route(k).slots.cpu() for k in keys_of[tuple(prompts)]])

    rephrases = [(i, p) for i, r in enumerate(edited) for p in r.rephrases]
    loc = [p for r in edited for p, _ in r.locality]
    probes = build_probes(edited, held, seed=0)
    other = [p for _, p in probes.other_subject]
    same = [p for _, p in probes.same_subject]

    def rates() -> dict[str, float]:
        own = routed([r.prompt for r in edited])
        reph = routed([p for _, p in rephrases])
        return {
            "prompt_routed_own": (own == torch.arange(n)).float().mean().item(),
            "rephrase_routed_own": sum(int(x) == i for (i, _), x in zip(rephrases, reph.tolist())) / len(rephrases),
            "locality_routed": (routed(loc) >= 0).float().mean().item(),
            "probe_other_subject_routed": (routed(other) >= 0).float().mean().item(),
            "probe_same_subject_routed": (routed(same) >= 0).float().mean().item(),
        }

    results: dict = {**rates(), "neuron_seconds_per_edit": seconds}
    if margins:
        results["margins"] = {}
        for subject_margin, relation_margin in margins:
            router.subject_margin, router.relation_margin = subject_margin, relation_margin
            results["margins"][f"{subject_margin},{relation_margin}"] = rates()
        router.subject_margin, router.relation_margin = config.subject_margin, config.relation_margin
    editor.detach()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--edits", type=int, default=100)
    parser.add_argument("--tag", default="default")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--files", nargs="+", default=FILES)
    parser.add_argument("--margins", default="", help="relation margins to re-read routing at, e.g. 0,-1,-2")
    parser.add_argument("--subject-margins", default="", help="subject margins to re-read routing at, e.g. 3,4")
    args = parser.parse_args()
    config = ScenConfig.from_overrides([*args.overrides, "expert_max_steps=0"])
    lm = load_model()
    results = {}
    for name in args.files:
        relation = [float(m) for m in args.margins.split(",") if m] or [config.relation_margin]
        subject = [float(m) for m in args.subject_margins.split(",") if m] or [config.subject_margin]
        margins = [(s, r) for s in subject for r in relation] if args.margins or args.subject_margins else []
        results[name] = measure(lm, args.data / name, args.edits, config, margins)
        print(name, json.dumps(results[name]), flush=True)
    out = Path("bench/results/routing_probes") / f"{args.tag}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"edits": args.edits, "overrides": args.overrides, "results": results}, indent=1))


if __name__ == "__main__":
    main()
