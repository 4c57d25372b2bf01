"""Cost and accuracy of an edit against its target's length, on the bundled SmolLM2.

    .venv/bin/python bench/long_targets.py [--lengths 16 64 128 256 512] [--per-length 3] [--set expert_lr=1e-2]

Prompts and target text come from the WikiBio development file: each target is the
record's own target followed by further target sentences of the file, cut to the
wanted number of tokens. Per length: seconds and steps per edit, whether training
reproduced the target (teacher-forced argmax on every token) and whether free greedy
generation after the edit equals the target. Edits are trained one after another on
one editor, as the service does. Results go to bench/results/long_targets.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from app.eval.datasets import load_dataset
from app.models import load_model
from app.scen import Editor, ScenConfig

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "hallucination_train.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[16, 64, 128, 256, 512])
    parser.add_argument("--per-length", type=int, default=3)
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="engine setting, as scen eval --set")
    parser.add_argument("--out", type=Path, default=Path("bench/results/long_targets.json"))
    args = parser.parse_args()
    config = ScenConfig.from_overrides(args.overrides)

    lm = load_model()
    tok = lm.tokenizer
    editor = Editor(lm.model, tok, config)
    records = load_dataset(args.data).records
    text_ids = tok(" ".join(r.target for r in records), add_special_tokens=False).input_ids
    rows, i = [], 0
    for n in args.lengths:
        for _ in range(args.per_length):
            record = records[i % len(records)]
            own = tok(record.target + " ", add_special_tokens=False).input_ids
            target = tok.decode((own + text_ids[i * 97 :])[:n]).strip()
            start = time.perf_counter()
            edit = editor.train(record.prompt, target)
            seconds = time.perf_counter() - start
            editor.add(f"e{i}", edit)
            budget = len(tok(target, add_special_tokens=False).input_ids) + 2
            generated = editor.generate([record.prompt], max_new_tokens=budget)[0]
            rows.append({"target_tokens": n, "seconds": seconds, "steps": edit.metrics["steps"],
                         "reproduced": edit.metrics["reproduced"], "converged": edit.metrics["converged"],
                         "generation_equal": generated.text.strip() == target,
                         "routed_own": generated.edit_id == f"e{i}"})
            print(rows[-1], flush=True)
            i += 1
    summary = {
        n: {key: sum(r[key] for r in rows if r["target_tokens"] == n) / args.per_length
            for key in ("seconds", "steps", "reproduced", "generation_equal", "routed_own")}
        for n in args.lengths
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    report = {"settings": args.overrides, "expert_lr": config.expert_lr, "per_edit": rows, "by_length": summary}
    args.out.write_text(json.dumps(report, indent=1))
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
