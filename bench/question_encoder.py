"""What the router's question encoder buys beside the relation factor, routing only.

    PYTHONPATH=.:bench .venv/bin/python bench/question_encoder.py --edits 300 [--files F ...]

Neurons are trained sequentially on N records of each development file as the engine trains them
(experts skipped; neither factor's training depends on the encoder). Every prompt of the routing
sets (the edits' rephrases, the two hard-negative probe sets, the locality prompts) is then read as
the router reads it, and wherever an edit's subject factor ``s`` passes theta, its question as the
encoder reads it (``app.scen.questions``) is compared with the edit prompt's. ``q`` passes theta
at cosine ``c`` (``Router.question_factor``). Routing rules compared, re-read from the same keys:

* ``engine m``: min(s, r), the relation factor ``r`` alone, read at relation margin m;
* ``encoder c``: min(s, q), the encoder instead of the relation factor;
* ``either c m``: min(s, max(r, q)), what the router does with ``question_cos`` c;
* ``rivals c m lead L floor F unlike U``: the same with the rival rule (``--leads``, ``--floors``,
  ``--rival-cos``).

On CounterFact, the rephrases labelled in ``bench/data/counterfact_rephrase_kinds.json`` (the
edit's question reworded, or another question about the subject) are also counted per kind.

Results: bench/results/specificity/question_encoder/routing.json.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import random
import time
from pathlib import Path

import torch

from app.eval.datasets import load_dataset
from app.eval.neighbours import build_probes
from app.models import load_model
from app.scen import Editor, ScenConfig

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
# CounterFact rephrase prompts labelled by hand: the edit's question reworded, or another question
KINDS = Path(__file__).resolve().parent / "data" / "counterfact_rephrase_kinds.json"
FILES = ["zsre_mend_train_1k.json", "counterfact_dev_2k.json"]


def measure(
    lm, path: Path, n: int, cuts: list[float], margins: list[float], leads: list[float], floors: list[float],
    rival_cos: list[float],
) -> dict:
    records = [r for r in load_dataset(path).records if r.editable and r.subject]
    random.Random(0).shuffle(records)
    edited, held = records[:n], records[n : n + 300]
    n = len(edited)
    editor = Editor(lm.model, lm.tokenizer, ScenConfig(expert_max_steps=0))
    start = time.perf_counter()
    for i, r in enumerate(edited):
        editor.add(f"e{i}", editor.train(r.prompt, r.target, subject=r.subject))
    seconds = (time.perf_counter() - start) / n
    router = editor.routed.router
    reader, theta = router.questions, router.theta
    assert reader is not None
    own = router.question  # (E, d) each edit prompt's question, read at training

    def read(prompts: list[str]):
        """Per prompt: s (E,), r (E,) per relation margin, the encoder's cosine (E,) and the rival's
        per ``rival_cos`` (E,) (-1 where s fails)."""
        S, R, C = [], [], []
        for i in range(0, len(prompts), 64):
            with torch.no_grad():
                keys = editor.routing_keys(prompts[i : i + 64])
                s, at = router.subject_factor(keys.subject, keys.content)
                r = {}
                for m in margins:
                    router.relation_margin = m
                    r[m] = router.relation_factor(keys, at)
                router.relation_margin = ScenConfig().relation_margin
                c = torch.full_like(s, -1.0)
                nb = {u: torch.full_like(s, -1.0) for u in rival_cos}
                rows, cols = (s > theta).nonzero().T
                if len(rows):
                    length = router.subject_len[cols]
                    asked = reader(keys.ids, keys.content, keys.sentence, rows, at[rows, cols], length)
                    c[rows, cols] = (asked * own[cols]).sum(-1)
                    for u in rival_cos:
                        nb[u][rows, cols] = reader.rival(asked, own[cols], u)
            S.append(s)
            R.append(r)
            C.append((c, nb))
        return (
            torch.cat(S), {m: torch.cat([r[m] for r in R]) for m in margins},
            (torch.cat([c for c, _ in C]), {u: torch.cat([nb[u] for _, nb in C]) for u in rival_cos}),
        )

    def qf(c: tuple, cut: float, lead: float | None = None, floor: float = 0.3, unlike: float = 0.5):
        cos, rival = c[0], c[1][unlike] if lead is not None else None
        above = cos - cut
        if lead is not None:
            above = torch.maximum(above, torch.minimum(cos - rival - lead, cos - floor))
        return torch.sigmoid(20 * above + math.log(theta / (1 - theta)))

    def route(a: torch.Tensor) -> torch.Tensor:
        top, slot = a.max(-1)
        return torch.where(top > theta, slot, -1)

    rules = {f"engine {m}": lambda s, r, c, m=m: torch.minimum(s, r[m]) for m in margins}
    for cut in cuts:
        rules[f"encoder {cut}"] = lambda s, r, c, cut=cut: torch.minimum(s, qf(c, cut))
        for m in margins:
            rules[f"either {cut} {m}"] = lambda s, r, c, cut=cut, m=m: torch.minimum(s, torch.maximum(r[m], qf(c, cut)))
            for lead, floor, unlike in itertools.product(leads, floors, rival_cos):
                rules[f"rivals {cut} {m} lead {lead} floor {floor} unlike {unlike}"] = (
                    lambda s, r, c, cut=cut, m=m, lead=lead, floor=floor, unlike=unlike:
                    torch.minimum(s, torch.maximum(r[m], qf(c, cut, lead, floor, unlike)))
                )

    rephrases = [(i, p) for i, r in enumerate(edited) for p in r.rephrases]
    probes = build_probes(edited, held, seed=0)
    sets = {
        "prompt": [r.prompt for r in edited],
        "rephrase": [p for _, p in rephrases],
        "locality": [p for r in edited for p, _ in r.locality],
        "probe_other_subject": [p for _, p in probes.other_subject],
        "probe_same_subject": [p for _, p in probes.same_subject],
    }
    read_sets = {k: read(v) for k, v in sets.items()}
    owner = torch.tensor([i for i, _ in rephrases])
    out: dict = {
        "neuron_seconds_per_edit": seconds, "sizes": {k: len(v) for k, v in sets.items()},
        # which rephrase is which: its record's position in the file, for per-prompt reading
        "rephrase_record_index": [edited[i].index for i, _ in rephrases], "rules": {},
    }
    for name, rule in rules.items():
        routed = {k: route(rule(*v)) for k, v in read_sets.items()}
        out["rules"][name] = {
            "prompt_routed_own": (routed["prompt"] == torch.arange(n)).float().mean().item(),
            "rephrase_routed_own": (routed["rephrase"] == owner).float().mean().item(),
            "locality_routed": (routed["locality"] >= 0).float().mean().item(),
            "probe_other_subject_routed": (routed["probe_other_subject"] >= 0).float().mean().item(),
            "probe_same_subject_routed": (routed["probe_same_subject"] >= 0).float().mean().item(),
            "rephrase_routed_own_each": "".join("01"[x] for x in (routed["rephrase"] == owner).tolist()),
        }
        rates = {k: v for k, v in out["rules"][name].items() if not k.endswith("_each")}
        print(path.name, name, json.dumps(rates), flush=True)
    editor.detach()
    return out


def rephrases_by_kind(result: dict, kinds: dict) -> dict:
    """Per rule, the share of labelled rephrases routed to their own edit, per kind."""
    index = result["rephrase_record_index"]
    labelled = {kind: [j for j, i in enumerate(index) if i in set(kinds[kind])] for kind in ("same", "other")}
    out = {}
    for name, rule in result["rules"].items():
        each = rule["rephrase_routed_own_each"]
        out[name] = {
            kind: {"n": len(at), "routed_own": sum(each[j] == "1" for j in at) / max(len(at), 1)}
            for kind, at in labelled.items()
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--edits", type=int, default=300)
    parser.add_argument("--cuts", default="0.45,0.5,0.55,0.6")
    parser.add_argument("--margins", default="-2.5,-2,-1.5,-1")
    parser.add_argument("--leads", default="", help="question_lead values to read the rival rule at")
    parser.add_argument("--floors", default="0.3")
    parser.add_argument("--rival-cos", default="0.5", help="rival_cos values to read the rival rule at")
    parser.add_argument("--files", nargs="+", default=FILES)
    parser.add_argument("--out", type=Path, default=Path("bench/results/specificity/question_encoder/routing.json"))
    args = parser.parse_args()
    lm = load_model()
    cuts = [float(c) for c in args.cuts.split(",")]
    margins = [float(m) for m in args.margins.split(",")]
    leads = [float(v) for v in args.leads.split(",") if v]
    floors = [float(v) for v in args.floors.split(",")]
    rival_cos = [float(v) for v in args.rival_cos.split(",")]
    results = {
        name: measure(lm, DATA / name, args.edits, cuts, margins, leads, floors, rival_cos) for name in args.files
    }
    kinds = json.loads(KINDS.read_text())
    if kinds["file"] in results:
        results[kinds["file"]]["rephrases_by_kind"] = by_kind = rephrases_by_kind(results[kinds["file"]], kinds)
        for name, rates in by_kind.items():
            print(kinds["file"], name, json.dumps(rates))
    args.out.write_text(json.dumps({"edits": args.edits, "results": results}, indent=1))


if __name__ == "__main__":
    main()
