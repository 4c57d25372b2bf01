"""What an edit trained under another relation map costs as it comes live: N ZsRE edits are
trained without the rewording discount (routing only: experts are skipped), then brought live in
an editor with the default settings, which refits each one's relation factor, and in one that
needs no refit (the same edits marked as trained under its map).

    .venv/bin/python bench/relation_refit.py [--edits 200] [--out bench/results/relation_refit.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import time
from pathlib import Path

from app.eval.datasets import load_dataset
from app.models import load_model
from app.scen import Editor, ScenConfig

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "zsre_mend_train_1k.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--edits", type=int, default=200)
    parser.add_argument("--out", type=Path, default=Path("bench/results/relation_refit.json"))
    args = parser.parse_args()
    records = [r for r in load_dataset(DATA).records if r.editable and r.subject]
    random.Random(0).shuffle(records)
    records = records[: args.edits]

    def editor(**changes) -> Editor:
        lm = load_model()
        return Editor(lm.model, lm.tokenizer, ScenConfig(expert_max_steps=0).replace(**changes))

    old = editor(rephrase_invariance=0.0)
    trained = {}
    for i, r in enumerate(records):
        trained[f"e{i}"] = old.train(r.prompt, r.target, subject=r.subject)
        old.add(f"e{i}", trained[f"e{i}"])

    refitting = editor()
    start = time.perf_counter()
    refitting.sync(list(trained), trained.__getitem__)
    with_refit = time.perf_counter() - start
    current = {k: dataclasses.replace(v, relation_map=refitting.relation_map) for k, v in trained.items()}
    plain = editor()
    start = time.perf_counter()
    plain.sync(list(current), current.__getitem__)
    without = time.perf_counter() - start

    routed = refitting.generate([r.prompt for r in records], max_new_tokens=1)
    results = {
        "edits": len(records), "refits": refitting.refits, "sync_seconds_with_refit": with_refit,
        "sync_seconds_without": without, "refit_ms_per_edit": 1000 * (with_refit - without) / len(records),
        "prompts_routed_own_after_refit": sum(g.edit_id == f"e{i}" for i, g in enumerate(routed)) / len(records),
    }
    print(json.dumps(results, indent=1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
