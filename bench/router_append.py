"""Cost of growing the live set: appending N neurons to the router, against appending by
concatenating the whole neuron matrix each time (how the router grew before).

    .venv/bin/python bench/router_append.py [--sizes 1000,3000,10000]

Random neurons of SmolLM2's key sizes (1536 for both factors); no model is loaded. Both ways
run in this process, one after the other per size, so the ratio is what to read. Results go
to bench/results/router_append.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from app.scen.routed import Neuron, Router

H = 1536


def neurons(n: int) -> list[Neuron]:
    g = torch.Generator().manual_seed(0)
    return [Neuron(torch.randn(H, generator=g), torch.randn((), generator=g), torch.randn(H, generator=g),
                   torch.randn((), generator=g), torch.tensor(2), torch.randn(H, generator=g)) for _ in range(n)]


def ours(batch: list[Neuron]) -> float:
    router = Router(H, H, theta=0.65)
    start = time.perf_counter()
    for n in batch:
        router.append(n)
    return time.perf_counter() - start


def concatenating(batch: list[Neuron]) -> float:
    subject_w, relation_w = torch.zeros(0, H), torch.zeros(0, H)
    biases = torch.zeros(0)
    start = time.perf_counter()
    for n in batch:
        subject_w = torch.cat([subject_w, n.subject.reshape(1, -1)])
        relation_w = torch.cat([relation_w, n.relation.reshape(1, -1)])
        biases = torch.cat([biases, n.subject_bias.reshape(1)])
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000,3000,10000")
    args = parser.parse_args()
    rows = []
    for size in (int(s) for s in args.sizes.split(",")):
        batch = neurons(size)
        a, b = ours(batch), concatenating(batch)
        rows.append({"neurons": size, "append_s": round(a, 4), "concatenate_s": round(b, 4),
                     "speedup": round(b / a, 1)})
        print(rows[-1], flush=True)
    out = Path("bench/results/router_append.json")
    out.write_text(json.dumps({"threads": torch.get_num_threads(), "rows": rows}, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
