"""Greedy decoding beside one busy core: why the worker process trains in the idle scheduling class.

Times ``model.generate`` (the bundled model, batch ``--batch``, ``--tokens`` new tokens, torch's
default threads) alone, and beside a process that keeps one core busy with matrix products at
each priority the embedded worker process can take (``SCEN_EMBEDDED_WORKER_PRIORITY``). Ratios
against "alone" are measured in one run.

    python bench/decode_beside_busy_core.py --out bench/results/decode_beside_busy_core.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from app.models import load_model

ROOT = Path(__file__).resolve().parent.parent
# The busy neighbour: one thread of 1,024 x 1,024 products, at the priority it is given.
NEIGHBOUR = """
import sys, time, torch
from workers.process import lower_priority
lower_priority(sys.argv[1])
torch.set_num_threads(1)
m = torch.randn(1024, 1024)
print("busy", flush=True)
end = time.time() + float(sys.argv[2])
while time.time() < end:
    m @ m
"""
PROMPTS = ["What is the capital of France?", "Who wrote Hamlet?", "Why is the sky blue?", "What is photosynthesis?",
           "Name a primary colour.", "What does a thermometer measure?", "How many legs does a spider have?",
           "What is the boiling point of water?"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("bench/results/decode_beside_busy_core.json"))
    args = parser.parse_args()

    loaded = load_model(None, device="cpu")
    tokenizer, model = loaded.tokenizer, loaded.model
    tokenizer.padding_side = "left"
    inputs = tokenizer(PROMPTS[: args.batch], return_tensors="pt", padding=True)

    def decode() -> float:
        start = time.perf_counter()
        with torch.no_grad():
            model.generate(**inputs, max_new_tokens=args.tokens, min_new_tokens=args.tokens, do_sample=False,
                           pad_token_id=tokenizer.pad_token_id)
        return time.perf_counter() - start

    decode()  # warm-up
    rows = []
    for neighbour in (None, "normal", "low", "idle"):
        proc = None
        if neighbour is not None:
            proc = subprocess.Popen([sys.executable, "-c", NEIGHBOUR, neighbour, "600"], cwd=ROOT,
                                    stdout=subprocess.PIPE, text=True)
            assert proc.stdout is not None and proc.stdout.readline().strip() == "busy"
        try:
            seconds = [decode() for _ in range(args.repeats)]
        finally:
            if proc is not None:
                proc.kill()
                proc.wait()
        rows.append({"neighbour": neighbour or "none", "p50_s": statistics.median(seconds), "seconds": seconds})
        print(f"beside {neighbour or 'nothing'}: p50 {rows[-1]['p50_s']:.2f}s", flush=True)
    alone = rows[0]["p50_s"]
    for row in rows:
        row["p50_over_alone"] = row["p50_s"] / alone
    report = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch_threads": torch.get_num_threads()},
        "batch": args.batch, "new_tokens": args.tokens, "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
