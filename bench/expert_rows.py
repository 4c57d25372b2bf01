"""What the conversation row costs an edit, on the bundled SmolLM2.

    .venv/bin/python bench/expert_rows.py [--edits 20] [--rounds 2]

The expert of each edit is trained on its prompt and, with ``expert_in_conversation``
(the default), on the prompt once more as the last turn of a generic conversation
(``chats.TRAINING_CONVERSATION``: a system message of its own). Here the first ``--edits``
ZsRE development records are trained three ways, in alternating rounds on one model in one
process (each round a fresh editor, so all train against the same live set): the prompt alone,
with the conversation row, and with a longer conversation row (that system message and an
earlier exchange, the row as it first was). Compared on seconds per edit (p50/p95), seconds spent
on the expert, and expert steps. Results go to bench/results/expert_rows.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from app.eval.datasets import load_dataset
from app.models import load_model
from app.scen import Editor, ScenConfig, chats
from app.scen.chats import Message

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "zsre_mend_train_1k.json"


def _quantile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[round(q * 100) - 1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--edits", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--out", type=Path, default=Path("bench/results/expert_rows.json"))
    args = parser.parse_args()

    lm = load_model()
    records = [r for r in load_dataset(args.data).records if r.editable][: args.edits]
    default = chats.TRAINING_CONVERSATION
    longer = (*default, Message("user", "Hello, could I ask you something?"), Message("assistant", "Sure, go ahead."))
    settings = {"prompt_alone": (False, default), "with_conversation": (True, default),
                "with_longer_conversation": (True, longer)}
    seen: dict[str, list[dict]] = {name: [] for name in settings}
    for _ in range(args.rounds):
        for name, (in_conversation, conversation) in settings.items():
            # The editor reads the module's conversation for each edit it trains.
            chats.TRAINING_CONVERSATION = conversation
            editor = Editor(lm.model, lm.tokenizer, ScenConfig(expert_in_conversation=in_conversation))
            for i, r in enumerate(records):
                edit = editor.train(r.prompt, r.target, subject=r.subject)
                editor.add(f"e{i}", edit)
                seen[name].append(edit.metrics)
            editor.detach()
    chats.TRAINING_CONVERSATION = default

    def summary(metrics: list[dict]) -> dict:
        seconds = [m["seconds"] for m in metrics]
        return {
            "edits": len(metrics),
            "seconds_p50": statistics.median(seconds), "seconds_p95": _quantile(seconds, 0.95),
            "expert_seconds_p50": statistics.median(m["expert_seconds"] for m in metrics),
            "expert_steps_mean": statistics.fmean(m["steps"] for m in metrics),
            "converged_rate": statistics.fmean(bool(m["converged"]) for m in metrics),
        }

    result = {name: summary(metrics) for name, metrics in seen.items()}
    alone = result["prompt_alone"]["seconds_p50"]
    result["ratio_seconds_p50"] = {name: result[name]["seconds_p50"] / alone for name in settings}
    result |= {"records": args.edits, "rounds": args.rounds, "dataset": args.data.name,
               "command": "bench/expert_rows.py " + " ".join(f"--{k} {v}" for k, v in vars(args).items() if k != "out")}
    for name in settings:
        s = result[name]
        print(f"{name:25s} s/edit p50 {s['seconds_p50']:.2f} p95 {s['seconds_p95']:.2f} "
              f"expert s p50 {s['expert_seconds_p50']:.2f} steps {s['expert_steps_mean']:.1f} "
              f"ratio p50 {result['ratio_seconds_p50'][name]:.2f}")
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
