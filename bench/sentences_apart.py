"""What reading each sentence apart (``routed.ApartKeys``) costs at serving time: seconds of the
router's read (``Editor.activations``) and of a one-token generation (the routed prefill) over
CounterFact rephrases that open with another sentence, and over the same questions without it,
with edits live.

The second pass runs only for texts of several sentences, so the engine before it is the
baseline: run this file from both checkouts side by side (one thread each) and compare.

    PYTHONPATH=. OMP_NUM_THREADS=1 .venv/bin/python bench/sentences_apart.py --out bench/results/sentences_apart.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import time
from pathlib import Path

import app
from app.models import load_model
from app.scen import Editor, ScenConfig
from app.scen.prompts import prompt_tokens

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "counterfact_dev_2k.json"


def seconds(run, repeats: int) -> float:
    """The fastest of ``repeats`` runs: the least disturbed by whatever else the machine does."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--edits", type=int, default=20)
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    lm = load_model()
    editor = Editor(lm.model, lm.tokenizer, ScenConfig())
    records = json.loads(args.data.read_text(encoding="utf-8"))
    for i, r in enumerate(records[: args.edits]):
        editor.add(f"e{i}", editor.train(r["prompt"], r["target_new"], subject=r["subject"]))
    prefixed, alone = [], []
    for r in records:
        tokens = prompt_tokens(lm.tokenizer, r["rephrase_prompt"])
        if any(tokens.opens):
            prefixed.append(r["rephrase_prompt"])
            alone.append(tokens.text[tokens.spans[tokens.opens.index(True)][0]:].strip())
        if len(prefixed) == args.prompts:
            break
    found: dict = {}
    for name, prompts in (("after another sentence", prefixed), ("alone", alone)):
        read = seconds(lambda p=prompts: editor.activations(p), args.repeats)
        prefill = seconds(lambda p=prompts: editor.generate(p, max_new_tokens=1), args.repeats)
        found[name] = {"prompts": len(prompts), "activations_ms_per_prompt": round(1000 * read / len(prompts), 2),
                       "prefill_ms_per_prompt": round(1000 * prefill / len(prompts), 2),
                       "tokens_mean": statistics.mean(len(prompt_tokens(lm.tokenizer, p).ids) for p in prompts)}
        print(name, found[name])
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(app.__file__).parent).stdout.strip()
    settings = {"engine": commit, "edits": args.edits, "repeats": args.repeats, "batch_size": editor.batch_size}
    args.out.write_text(json.dumps({**settings, "results": found}, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
