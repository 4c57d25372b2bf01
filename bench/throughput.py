"""Greedy generation tokens/s and resident memory against the number of live edits, each size
timed against the unedited model in the same rounds.

    PYTHONPATH=. .venv/bin/python bench/throughput.py [--sizes 0,100,1000,10000,100000] [--rounds 3] [--tokens 32]

(``PYTHONPATH=.``: a script's own folder heads ``sys.path``, so the package would otherwise be
whichever checkout is installed; the result records the one used.)

Generation goes through ``app.live.generation.Generator``, the path ``/generate`` takes: greedy,
``--tokens`` new tokens at most, batch 1 and batch 8. The live set grows through the sizes
(0, then 1 real edit and N - 1 synthetic ones) in one editor on the bundled SmolLM2:

* the real edit: CounterFact record 1999 (prompt, rephrase and subject, target ``target_new``),
  trained here by ``Editor.train``;
* synthetic edits: the neurons of bench/real_neurons.py (real keys of the bundled model: trained
  edit neurons of ZsRE and CounterFact prompts, name neurons, near duplicates; as
  bench/routing.py times them), added with ``Editor.add``; each record keeps one raw subject key
  and one raw question key, as an edit posted without rephrases does; each expert is low-rank
  (``ScenConfig.rank``) with its ``b`` factor zero, so a row routed to one gets the base model's
  output through the expert's arithmetic. The experts are paged by the expert cache within
  512 MiB (``SCEN_EXPERT_CACHE_MB``'s default); one paged out is made again when wanted, never
  read from disk.

Cases at each size, interleaved with the unedited model (the edited layer's own down projection
put back, as ``Editor.detach`` does, the live set kept; the editor's two key taps stay), the
order alternating between rounds:

* ``unrouted``: prompts of CounterFact records 1700-1715, which no edit neuron was built from
  (name neurons of their subjects exist from about 3,000 edits on; ``routed_rows`` says how many
  rows some synthetic edit answered, with its zero delta);
* ``routed``: the real edit's prompt and rephrase (batch 8: four of each), routed by its trained
  neuron to its expert, here a full delta of zeros: the arithmetic of a trained full expert with
  the base model's tokens, so both arms generate the same number of tokens. ``routed_rows`` says
  how many rows the real edit answered. ``trained_answer`` is the prompt answered once by the
  trained expert, at the largest size.

Each case also reports ``route_ms``, the router's time per model call (routing is decided at
prefill; decode steps keep it), and ``route_share``, its share of the call.

Resident memory is the process's RSS (``/proc/self/statm``) after each size is built and timed;
it includes the bench's own copies of the keys and neurons (``bench_held_mb``, the same at every
size), which are dropped after the largest size (``rss_without_bench_mb``). Beside it what the
engine holds: neuron rows, subject index, the records' keys, resident experts. Results:
bench/results/throughput.json and throughput.png.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import statistics
import time
from pathlib import Path

import torch
from real_neurons import cache_dir, key_norms, live_edits, load_keys, make_neurons, run_facts, write_result

from app.live.generation import Completion, Generator, Sampling
from app.models import load_model
from app.scen import Editor, ScenConfig
from app.scen.chats import PromptRow
from app.scen.experts import Expert, FullExpert, new_expert

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
OUT = Path("bench/results")
REAL = "real edit"
CACHE_MB = 512


def rss_mb() -> float:
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def held_mb(tensors: dict) -> float:
    """Memory of the tensors of a dict of the bench's own (and of lists of dicts in it)."""
    def parts(v):
        if isinstance(v, torch.Tensor):
            yield v.nbytes
        elif isinstance(v, dict):
            for x in v.values():
                yield from parts(x)
        elif isinstance(v, list):
            for x in v:
                yield from parts(x)

    return sum(parts(tensors)) / 2**20


@contextlib.contextmanager
def unedited(editor: Editor):
    """The edited layer's own down projection in place of the routed one, the live set kept."""
    layer = editor.layers[editor.layer]
    editor.adapter.set_down(layer, editor.routed.base)
    try:
        yield
    finally:
        editor.adapter.set_down(layer, editor.routed)


class RouteClock:
    """Seconds the router spends deciding routes (prefill only: decode steps keep the decision)."""

    def __init__(self, editor: Editor):
        self.seconds = 0.0
        router = editor.routed.router
        route = router.route

        def timed(keys):
            start = time.perf_counter()
            try:
                return route(keys)
            finally:
                self.seconds += time.perf_counter() - start

        # An instance attribute shadows the method: the routed layer calls ``self.router.route``.
        router.route = timed  # type: ignore[method-assign]

    def take(self) -> float:
        seconds, self.seconds = self.seconds, 0.0
        return seconds


def run(gen: Generator, rows: list[PromptRow], sampling: Sampling) -> tuple[float, list[Completion]]:
    start = time.perf_counter()
    out = gen.complete(rows, sampling)
    return time.perf_counter() - start, out


def compare(gen: Generator, rows: list[list[PromptRow]], sampling: Sampling, rounds: int, clock: RouteClock) -> dict:
    """Tokens/s of the live editor and the unedited model on the same rows, round by round
    (``rows[r % len(rows)]`` in round r), the order alternating; one untimed round first."""
    editor = gen.editor
    run(gen, rows[0], sampling)
    with unedited(editor):
        run(gen, rows[0], sampling)
    clock.take()
    edited_tps, base_tps, ratios, route_s, edited_s = [], [], [], [], []
    same, routed = True, []
    for r in range(rounds):
        batch = rows[r % len(rows)]
        arms: dict[str, tuple[float, list[Completion]]] = {}
        for arm in (("edited", "unedited") if r % 2 == 0 else ("unedited", "edited")):
            with unedited(editor) if arm == "unedited" else contextlib.nullcontext():
                arms[arm] = run(gen, batch, sampling)
        (t_e, out_e), (t_b, out_b) = arms["edited"], arms["unedited"]
        route_s.append(clock.take())
        edited_s.append(t_e)
        tokens_e, tokens_b = sum(c.completion_tokens for c in out_e), sum(c.completion_tokens for c in out_b)
        edited_tps.append(tokens_e / t_e)
        base_tps.append(tokens_b / t_b)
        ratios.append(edited_tps[-1] / base_tps[-1])
        same &= [c.text for c in out_e] == [c.text for c in out_b]
        routed.append([c.edit_id for c in out_e])
    return {
        "edited_tokens_per_s": round(statistics.median(edited_tps), 2),
        "unedited_tokens_per_s": round(statistics.median(base_tps), 2),
        "ratio": round(statistics.median(ratios), 4),
        "ratio_min": round(min(ratios), 4),
        "ratio_max": round(max(ratios), 4),
        "route_ms": round(1000 * statistics.median(route_s), 2),
        "route_share": round(statistics.median(r / t for r, t in zip(route_s, edited_s)), 4),
        "same_text": same,
        "routed_rows": sum(i is not None for ids in routed for i in ids),
        "real_edit_rows": sum(i == REAL for ids in routed for i in ids),
        "rows": sum(len(ids) for ids in routed),
    }


def engine_bytes(editor: Editor) -> dict:
    router = editor.routed.router
    buffers = sum(t.nbytes for name, t in router.named_buffers() if name.startswith("_"))
    keys = sum(e.keys.nbytes + e.subject_keys.nbytes for e in editor._edits.values())
    stats = editor.expert_cache.stats()
    return {"neuron_rows_mb": round(buffers / 2**20, 1), "index_mb": round(router.index.nbytes / 2**20, 1),
            "record_keys_mb": round(keys / 2**20, 1), "resident_experts": stats.resident,
            "resident_experts_mb": round(stats.resident_bytes / 2**20, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="0,100,1000,10000,100000")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds per case and batch size")
    parser.add_argument("--tokens", type=int, default=32, help="max_new_tokens")
    parser.add_argument("--out", default=str(OUT / "throughput.json"))
    args = parser.parse_args()
    sizes = sorted(int(s) for s in args.sizes.split(","))
    torch.manual_seed(0)
    wall = time.perf_counter()
    load = os.getloadavg()
    cfg = ScenConfig()
    lm = load_model()
    editor = Editor(lm.model, lm.tokenizer, cfg, cache_dir=cache_dir().parent)
    gen = Generator(editor)
    clock = RouteClock(editor)
    sampling = Sampling(max_new_tokens=args.tokens)
    d, h = editor.adapter.down_weight(editor.routed.base).shape
    zero_full = FullExpert(d, h).requires_grad_(False)

    def synthetic_expert(_: int) -> Expert:
        return new_expert("lowrank", d, h, cfg.rank).requires_grad_(False)

    editor.page_experts(CACHE_MB * 2**20, lambda edit_id: zero_full if edit_id == REAL else synthetic_expert(0))

    cf = json.loads((DATA / "counterfact_dev_2k.json").read_text())
    record = cf[1999]
    start = time.perf_counter()
    real = editor.train(record["prompt"], record["target_new"], [record["rephrase_prompt"]], record["subject"])
    real_train_s = time.perf_counter() - start
    trained_expert = real.expert
    plain = [gen.encode(r["prompt"]) for r in cf[1700:1716]]
    unrouted = {1: [[p] for p in plain], 8: [plain[:8], plain[8:]]}
    asked = [gen.encode(record["prompt"]), gen.encode(record["rephrase_prompt"])]
    routed = {1: [[asked[0]], [asked[1]]], 8: [asked * 4]}

    keys = load_keys()
    s_norm, _ = key_norms(keys)
    neurons = make_neurons(keys, max(sizes), cfg, *key_norms(keys))
    kinds = neurons["kinds"]
    rows = []
    for n in sizes:
        row: dict = {"live_edits": n}
        live = len(editor.edit_ids)
        start = time.perf_counter()
        if n and not live:
            editor.add(REAL, real)
            editor.provide_expert(REAL, zero_full)
            live = 1
        for at in range(live - 1, n - 1, 10_000):
            chunk = range(at, min(at + 10_000, n - 1))
            for i, edit in zip(chunk, live_edits(neurons, keys, s_norm, editor.layer, chunk, synthetic_expert)):
                editor.add(f"synthetic {i}", edit)
        row["add_s"] = round(time.perf_counter() - start, 2)
        row["synthetic_kinds"] = {k: kinds[: max(n - 1, 0)].count(k) for k in sorted(set(kinds))}
        start = time.perf_counter()
        editor.routed.router.index_now()
        row["index_build_s"] = round(time.perf_counter() - start, 2)
        row["index_active"] = editor.routed.router.index.active(n)
        for B in (1, 8):
            row[f"unrouted_b{B}"] = compare(gen, unrouted[B], sampling, args.rounds, clock)
            if n:
                row[f"routed_b{B}"] = compare(gen, routed[B], sampling, args.rounds, clock)
            print(n, B, row[f"unrouted_b{B}"], row.get(f"routed_b{B}"), flush=True)
        gc.collect()
        row["rss_mb"] = round(rss_mb())
        row["bench_held_mb"] = round(held_mb(neurons) + held_mb(keys))
        if n == max(sizes):
            neurons, keys = {}, {}
            gc.collect()
            row["rss_without_bench_mb"] = round(rss_mb())
        row |= engine_bytes(editor)
        print({k: v for k, v in row.items() if not k.startswith(("unrouted", "routed"))}, flush=True)
        rows.append(row)
        # Each size is kept as soon as it is measured: a later one may not fit in memory or time.
        Path(args.out).with_suffix(".partial.json").write_text(json.dumps(rows, indent=1) + "\n")
    answer: dict = {}
    if max(sizes):
        editor.provide_expert(REAL, trained_expert)
        out = gen.complete(asked, sampling)
        with unedited(editor):
            base = gen.complete(asked, sampling)
        answer = {"prompts": [record["prompt"], record["rephrase_prompt"]], "target": record["target_new"],
                  "answers": [c.text for c in out], "edit_ids": [c.edit_id for c in out],
                  "unedited_answers": [c.text for c in base]}
    result = run_facts(__doc__, load) | {
        "command": "PYTHONPATH=. .venv/bin/python bench/throughput.py " + " ".join(
            f"--{k} {v}" for k, v in (("sizes", args.sizes), ("rounds", args.rounds), ("tokens", args.tokens))),
        "real_edit": {"train_s": round(real_train_s, 2), "activation": real.metrics.get("activation"),
                      "steps": real.metrics.get("steps")},
        "trained_answer": answer,
        "expert_cache_mb": CACHE_MB,
        "rows": rows,
        "wall_s": round(time.perf_counter() - wall, 1),
    }
    write_result(args.out, result, plot)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (speed, ratio, memory) = plt.subplots(1, 3, figsize=(15, 4))
    xs = [max(r["live_edits"], 10) for r in rows]
    for B, style in ((1, "-o"), (8, "-s")):
        case = f"unrouted_b{B}"
        speed.plot(xs, [r[case]["edited_tokens_per_s"] for r in rows], style, label=f"live editor, batch {B}")
        speed.plot(xs, [r[case]["unedited_tokens_per_s"] for r in rows], style, alpha=0.4,
                   label=f"unedited, batch {B}")
        for kind, alpha in (("unrouted", 1.0), ("routed", 0.5)):
            pts = [(x, r[f"{kind}_b{B}"]["ratio"]) for x, r in zip(xs, rows) if f"{kind}_b{B}" in r]
            ratio.plot([x for x, _ in pts], [y for _, y in pts], style, alpha=alpha, label=f"{kind}, batch {B}")
    ratio.axhline(0.95, color="grey", lw=0.8, ls=":")
    memory.plot(xs, [r["rss_mb"] for r in rows], "-o", label="process RSS")
    memory.plot(xs, [r["neuron_rows_mb"] + r["index_mb"] + r["record_keys_mb"] for r in rows], "-s",
                label="neuron rows + index + keys")
    memory.plot(xs, [r["resident_experts_mb"] for r in rows], "-^", label="resident experts")
    for ax, title, ylabel in ((speed, "Greedy tokens/s (unrouted prompts)", "tokens/s"),
                              (ratio, "Live editor / unedited model", "tokens/s ratio, median of rounds"),
                              (memory, "Resident memory", "MiB")):
        ax.set_xscale("log")
        ax.set_xlabel("live edits (0 drawn at 10)")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
