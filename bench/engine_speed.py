"""Seconds per edit: the engine's frozen-prefix replay vs. full-model training steps.

Both train the same expert on the same edits with the same optimiser and stopping
rule (argmax reproduces the target and every target token has probability >=
``expert_min_prob``); the baseline runs the whole model forward and backward at every step (with
the expert attached through forced routing), the engine replays only the layers
above the edited one. Also times batched vs one-by-one greedy generation.

    .venv/bin/python bench/engine_speed.py --edits 20 --out bench/results/engine_speed.json
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from app.models import load_model
from app.scen import Editor, ScenConfig
from app.scen.experts import new_expert
from app.scen.prompts import encode


def full_model_training(editor: Editor, prompt: str, target: str) -> tuple[float, int]:
    """Train an expert with full forward/backward passes; returns (seconds, steps)."""
    cfg = editor.config
    start = time.perf_counter()
    batch = encode(editor.tokenizer, [prompt], [target])
    n = len(batch.targets[0])
    tgt = torch.tensor(batch.targets)
    d, h = editor.adapter.down_weight(editor.routed.base).shape
    expert = new_expert(cfg.expert, d, h, cfg.rank)
    routed = editor.routed
    routed.experts.append(expert)
    slot = len(routed.experts) - 1
    opt = torch.optim.Adam(expert.parameters(), lr=cfg.expert_lr)
    steps = 0
    try:
        with routed.forced(torch.tensor([slot])), torch.enable_grad():
            while True:
                logits = editor.model(**batch.model_inputs(), use_cache=False, logits_to_keep=n + 1).logits[:, :n]
                loss = F.cross_entropy(logits[0], tgt[0])
                min_prob = F.softmax(logits[0], -1).gather(-1, tgt[0, :, None]).min().item()
                reproduced = bool((logits.argmax(-1) == tgt).all()) and min_prob >= cfg.expert_min_prob
                if reproduced or steps >= cfg.expert_max_steps:
                    break
                opt.zero_grad()
                loss.backward()
                opt.step()
                steps += 1
    finally:
        del routed.experts[slot]
    return time.perf_counter() - start, steps


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dataset", default="../shared/data/zsre_mend_train_1k.json")
    parser.add_argument("--edits", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("bench/results/engine_speed.json"))
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    records = json.loads(Path(args.dataset).read_text())
    random.Random(args.seed).shuffle(records)
    records = records[: args.edits]

    lm = load_model()
    t0 = time.perf_counter()
    editor = Editor(lm.model, lm.tokenizer, ScenConfig(seed=args.seed))
    init_s = time.perf_counter() - t0

    ours, ours_steps, base, base_steps = [], [], [], []
    for i, r in enumerate(records):
        edit = editor.train(r["src"], r["alt"].strip())
        ours.append(edit.metrics["seconds"])
        ours_steps.append(edit.metrics["steps"])
        secs, steps = full_model_training(editor, r["src"], r["alt"].strip())
        base.append(secs)
        base_steps.append(steps)
        editor.add(str(i), edit)

    prompts = [r["src"] for r in records[:16]]
    t0 = time.perf_counter()
    editor.generate(prompts, max_new_tokens=16)
    batched = time.perf_counter() - t0
    t0 = time.perf_counter()
    for p in prompts:
        editor.generate([p], max_new_tokens=16)
    single = time.perf_counter() - t0

    result = {
        "edits": len(records), "seed": args.seed, "layer": editor.layer, "threads": torch.get_num_threads(),
        "editor_init_seconds": round(init_s, 3),
        "edit_seconds_p50": round(statistics.median(ours), 3),
        "edit_seconds_p95": round(sorted(ours)[int(0.95 * (len(ours) - 1))], 3),
        "full_model_edit_seconds_p50": round(statistics.median(base), 3),
        "speedup_p50": round(statistics.median(base) / statistics.median(ours), 2),
        "steps_p50": statistics.median(ours_steps), "full_model_steps_p50": statistics.median(base_steps),
        "generate_16_batched_seconds": round(batched, 3), "generate_16_one_by_one_seconds": round(single, 3),
        "generation_batching_speedup": round(single / batched, 2),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
