"""What the router's question encoder costs: seconds per edit trained, and seconds of the router's
read (``Editor.activations``) and of a one-token generation (the routed prefill) over rephrases
that name an edited subject, with the encoder off and on, alternating in one process on the same
edits (the fastest of a few repeats for the reads; the median for training).

    PYTHONPATH=.:bench .venv/bin/python bench/question_encoder_cost.py --edits 20 \
        --out bench/results/specificity/question_encoder/cost.json
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from pathlib import Path

from sentences_apart import seconds as fastest

from app.eval.datasets import load_dataset
from app.models import load_model
from app.scen import Editor, ScenConfig

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "zsre_mend_train_1k.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--edits", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("bench/results/specificity/question_encoder/cost.json"))
    args = parser.parse_args()
    records = [r for r in load_dataset(DATA).records if r.editable and r.subject and r.rephrases]
    random.Random(0).shuffle(records)
    records = records[: args.edits]
    prompts = [p for r in records for p in r.rephrases]
    lm = load_model()
    runs: dict[str, list[dict]] = {"off": [], "on": []}
    with tempfile.TemporaryDirectory() as cache:
        for _ in range(args.rounds):
            for name in ("off", "on"):
                editor = Editor(lm.model, lm.tokenizer, ScenConfig(question_encoder=name == "on"), cache_dir=cache)
                train = []
                for i, r in enumerate(records):
                    start = time.perf_counter()
                    editor.add(f"e{i}", editor.train(r.prompt, r.target, subject=r.subject))
                    train.append(time.perf_counter() - start)
                runs[name].append({
                    "seconds_per_edit_p50": statistics.median(train),
                    "router_read_seconds": fastest(lambda editor=editor: editor.activations(prompts), 3),
                    "prefill_seconds": fastest(lambda editor=editor: editor.generate(prompts, max_new_tokens=1), 3),
                })
                editor.detach()
                print(name, json.dumps(runs[name][-1]), flush=True)
    summary = {name: {k: min(run[k] for run in rs) for k in rs[0]} for name, rs in runs.items()}
    ratios = {k: summary["on"][k] / summary["off"][k] for k in summary["on"]}
    out = {"edits": len(records), "prompts": len(prompts), "runs": runs, "best": summary, "on_over_off": ratios}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1))
    print(json.dumps(ratios))


if __name__ == "__main__":
    main()
