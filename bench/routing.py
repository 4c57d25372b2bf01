"""Routing time against the number of live neurons, reading every neuron (dense) or only the
candidates of the subject index (app/scen/router_index.py), and how often the index changes
a routing decision.

    .venv/bin/python bench/routing.py [--sizes 0,100,1000,10000,100000] [--repeats 40]
        [--index probe_floor=0.1] [--sweep-floor none,0.1,0.2] [--sweep-span 0,0.5] [--out bench/results/routing.json]

The neurons and prompts come from real keys of the bundled SmolLM2 (subject layer 10,
relation layer 6), recorded once and cached in ``SCEN_CACHE_DIR`` (default ~/.cache/scen)
under bench-routing/:

* edit neurons: ZsRE (1,000 records) and CounterFact (the first 1,700 records): the subject
  key at the subject's last token of the edit prompt and the question key of the prompt
  (its text less the subject), each whitened and scaled to unit length; both factors start
  as the engine's do (20 x key, biases -8 and -5) and the subject factors are trained with
  the engine's loss and optimiser (``neuron_loss``, Adam, 50 steps) against the pool
  prompts' token keys and 500 other entities' keys, all at once (Adam is per coordinate,
  so this is each neuron trained alone);
* name neurons: every distinct entity name in the two data files (subjects and answers)
  and app/scen/entities.txt, plus first x last name pairs of entities.txt, each read at its
  last token inside a list of names (one prompt holds 24 names, so the cost is per name,
  not per template); their subject factor is 20 x key plus the change training made to a
  real edit neuron's (weights and bias, taken round-robin), their relation factor a real
  edit neuron's;
* near duplicates up to the largest size: a name neuron's key plus 0.35 x another recorded
  text token's key (a cosine of about 0.94 to the name's), renormalised, with that name
  neuron's other parts: several edits about one subject.

Each neuron's whole-name key (``subject_span``) is its unit subject key: a stand-in, read at the
cost of a real one, for the check that ``--sweep-span`` times on and off.

A size N takes the first N of: the edit neurons (shuffled), the name neurons, the near
duplicates. Probes are prompts as a user sends them (chat template, the user's text marked):
rephrases of 300 edited records (should route), the prompts of the 300 CounterFact records
left out of the edits (should not) and 200 CounterFact neighbourhood prompts (same relation,
another subject: should not). Recall is the share of probes whose indexed routing (slot)
equals the dense one. Times are of ``Router.route`` on the recorded keys of one prompt
(batch 1) or eight, the model's forward pass excluded; dense and indexed run in this process
one after the other, so the ratio is what to read. Results go to bench/results/routing.json
and routing.png.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import resource
import time
import typing
from pathlib import Path

import torch
from real_neurons import key_norms, load_keys, make_neurons, router_with

from app.scen.config import ScenConfig, parse_value
from app.scen.routed import Router, Routing, RoutingKeys
from app.scen.router_index import IndexSettings

OUT = Path("bench/results")


# ---- phase 3: measure ------------------------------------------------------------------------


def probe_batches(probes: list[dict], size: int) -> list[RoutingKeys]:
    """Left-padded batches of ``size`` probes, as the routed layer sees them."""
    out = []
    for i in range(0, len(probes) - size + 1, size):
        chunk = probes[i : i + size]
        T = max(len(p["content"]) for p in chunk)
        h_s, h = chunk[0]["subject"].shape[1], chunk[0]["relation"].shape[1]
        s, r = torch.zeros(size, T, h_s), torch.zeros(size, T, h)
        content = torch.zeros(size, T, dtype=torch.bool)
        for j, p in enumerate(chunk):
            t = len(p["content"])
            s[j, T - t :], r[j, T - t :] = p["subject"].float(), p["relation"].float()
            content[j, T - t :] = p["content"]
        out.append(RoutingKeys(s, content, r, torch.full((size,), T - 1)))
    return out


class Dense:
    """A router read the way it is below ``min_neurons``: every neuron."""

    def __init__(self, router: Router):
        self.router = router

    def route(self, keys: RoutingKeys) -> Routing:
        index = self.router.index
        on = index.settings
        index.settings = dataclasses.replace(on, min_neurons=2**62) if on is not None else None
        try:
            return self.router.route(keys)
        finally:
            index.settings = on


def timed(
    router: Router | Dense, batches: list[RoutingKeys], repeats: int, budget_s: float = 1e9
) -> tuple[list[float], list]:
    """Times of ``route`` on each batch, ``repeats`` rounds or fewer once ``budget_s`` is spent;
    the slots of the first round."""
    times: list[float] = []
    slots = []
    for rep in range(repeats):
        if rep and sum(times) > budget_s:
            break
        for keys in batches:
            start = time.perf_counter()
            routing = router.route(keys)
            times.append(time.perf_counter() - start)
            if rep == 0:
                slots.append(routing.slots.clone())
    return times, slots


def quantile(xs: list[float], q: float) -> float:
    return round(1000 * float(torch.tensor(xs).quantile(q)), 3)


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timings(dense: Dense | None, indexed: Router, probes: list[dict], args) -> dict:
    """p50 and p95 of ``route`` at batch 1 and 8, indexed (and dense, unless None)."""
    row: dict = {}
    for B in (1, 8):
        batches = probe_batches(probes, B)
        for name, router in (("dense", dense), ("indexed", indexed)):
            if router is None:
                continue
            times, _ = timed(router, batches, max(1, args.repeats // B), args.budget)
            row[f"{name}_b{B}_p50_ms"] = quantile(times, 0.5)
            row[f"{name}_b{B}_p95_ms"] = quantile(times, 0.95)
        if dense is not None:
            row[f"speedup_b{B}_p50"] = round(row[f"dense_b{B}_p50_ms"] / max(row[f"indexed_b{B}_p50_ms"], 1e-6), 1)
    return row


def routings(dense: Dense, indexed: Router, probes: list[dict], cfg: ScenConfig,
             want: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """The dense slots of every probe (``want`` where already known) and how the index's compare."""
    batches = probe_batches(probes, 1)
    if want is None:
        want = torch.cat(timed(dense, batches, 1)[1])
    got = torch.cat(timed(indexed, batches, 1)[1])
    kinds = [p["kind"] for p in probes]
    routed = want >= 0
    row: dict = {
        "recall": round(float((want == got).float().mean()), 4),
        "dense_routed": round(float(routed.float().mean()), 4),
        "recall_of_routed": round(float((want[routed] == got[routed]).float().mean()), 4) if routed.any() else None,
        "routed_by_kind": {
            k: round(sum(int(w) >= 0 for w, kk in zip(want, kinds) if kk == k) / kinds.count(k), 3)
            for k in sorted(set(kinds))},
    }
    with torch.no_grad():
        cand = [len(indexed.index.candidates(
            indexed.subject_norm(b.subject[b.content]), indexed.subject_w, indexed.subject_b,
            _floor(cfg))) for b in batches]
    row["candidates_mean"] = round(sum(cand) / len(cand), 1)
    row["candidates_max"] = max(cand)
    return want, row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="0,100,1000,10000,100000")
    parser.add_argument("--repeats", type=int, default=40, help="rounds of timing over the timed probes")
    parser.add_argument("--timed", type=int, default=48, help="probes timed (batch 1; batch 8 uses as many)")
    parser.add_argument("--probes", type=int, default=800, help="probes checked for recall")
    parser.add_argument("--budget", type=float, default=10.0, help="seconds of timing per case, at least one round")
    parser.add_argument("--index", action="append", default=[], metavar="KEY=VALUE",
                        help="an index setting other than the default (router_index.IndexSettings)")
    parser.add_argument("--out", type=Path, default=OUT / "routing.json")
    parser.add_argument("--recall", action=argparse.BooleanOptionalAction, default=True,
                        help="check the index's decisions against reading every neuron (slow at 100,000)")
    parser.add_argument("--sweep-floor", default="", metavar="F,F,...",
                        help="at the largest size, time and check the index again at each probe floor")
    parser.add_argument("--sweep-span", default="", metavar="C,C,...",
                        help="at the largest size, time both reads again at each subject_span_cos (0: unchecked)")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    torch.manual_seed(0)
    cfg = ScenConfig()
    keys = load_keys()
    h = keys["edit_question"].shape[1]
    s_norm, r_norm = key_norms(keys)
    neurons = make_neurons(keys, max(sizes), cfg, s_norm, r_norm)
    probes = keys["probes"][: args.probes]
    rng = random.Random(0)
    timed_probes = rng.sample(probes, min(args.timed, len(probes)))
    settings = index_settings(args.index)
    floors = [None if f.lower() == "none" else float(f) for f in args.sweep_floor.split(",") if f]
    spans = [float(c) for c in args.sweep_span.split(",") if c]
    rows = []
    for n in sizes:
        # One router (one copy of the rows), read both ways.
        indexed = router_with(neurons, n, cfg, s_norm, r_norm, dataclasses.replace(settings, min_neurons=0))
        dense = Dense(indexed)
        row: dict = {"neurons": n}
        if n:
            start = time.perf_counter()
            indexed.index.sync(indexed.subject_w, indexed.subject_b)
            row["index_build_s"] = round(time.perf_counter() - start, 3)
            row["index_mb"] = round(indexed.index.nbytes / 2**20, 1)
            row["neuron_rows_mb"] = round(2 * n * h * 4 / 2**20, 1)
        row |= timings(dense, indexed, timed_probes, args)
        want = None
        if n and args.recall:
            want, found = routings(dense, indexed, probes, cfg)
            row |= found
        print(row, flush=True)
        rows.append(row)
        if n == max(sizes) and n:
            for cos in spans:
                indexed.subject_span_cos = cos  # read at routing, by both reads of the one router
                swept = {"neurons": n, "subject_span_cos": cos, **timings(dense, indexed, timed_probes, args)}
                print(swept, flush=True)
                rows.append(swept)
            indexed.subject_span_cos = cfg.subject_span_cos
            for floor in floors:
                # The floor is read at search time: the same index, scanned less.
                for index in (indexed.index, indexed.index._index):
                    index.settings = dataclasses.replace(index.settings, probe_floor=floor)
                swept = {"neurons": n, "probe_floor": floor, **timings(None, indexed, timed_probes, args)}
                if args.recall:
                    want, found = routings(dense, indexed, probes, cfg, want)
                    swept |= found
                print(swept, flush=True)
                rows.append(swept)
    result = {
        "what": __doc__.split("\n\n")[0].replace("\n", " "),
        "threads": torch.get_num_threads(),
        "index": settings.__dict__,
        "neurons": {"how": _how(), "edit_neurons": len(keys["edit_subject"]),
                    "name_neurons": len(keys["name_subject"]), "names_in_lists": keys["names"],
                    "trained_subject_bias_mean": round(neurons["trained_bias_mean"], 3),
                    "trained_change_norm_mean": round(neurons["trained_change_norm"], 3)},
        "probes": {k: sum(p["kind"] == k for p in probes) for k in sorted({p["kind"] for p in probes})},
        "timed_probes": len(timed_probes),
        "content_tokens_mean": round(sum(int(p["content"].sum()) for p in timed_probes) / len(timed_probes), 1),
        "positions_mean": round(sum(len(p["content"]) for p in timed_probes) / len(timed_probes), 1),
        "max_rss_mb": round(rss_mb()),
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    plot(rows, args.out.with_suffix(".png"))
    print(f"wrote {args.out}")


def index_settings(overrides: list[str]) -> IndexSettings:
    """The default index settings with ``KEY=VALUE`` overrides (``none`` for an optional one)."""
    hints = typing.get_type_hints(IndexSettings)
    changes = {}
    for item in overrides:
        key, _, raw = item.partition("=")
        if key not in hints:
            raise SystemExit(f"unknown index setting {key!r}")
        changes[key] = parse_value(raw, hints[key], key)
    return dataclasses.replace(IndexSettings(), **changes)


def _how() -> str:
    """The docstring's account of the neurons, the probes and the measure, on one line."""
    parts = [p for p in (__doc__ or "").split("\n\n") if p.startswith(("The neurons", "* ", "A size"))]
    return " ".join(" ".join(p.split()) for p in parts)


def _floor(cfg: ScenConfig) -> float:
    return float(torch.logit(torch.tensor(cfg.theta))) + cfg.subject_margin


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    rows = [r for r in rows if "probe_floor" not in r]  # the sweep's rows are in the JSON alone
    xs = [max(r["neurons"], 10) for r in rows]
    for name, style in (("dense", "-o"), ("indexed", "-s")):
        for B, alpha in ((1, 1.0), (8, 0.5)):
            ax.plot(xs, [r[f"{name}_{f'b{B}'}_p50_ms"] for r in rows], style, alpha=alpha, label=f"{name}, batch {B}")
    ax.axhline(5, color="grey", lw=0.8, ls=":")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("live neurons (0 drawn at 10)")
    ax.set_ylabel("Router.route, p50 ms per batch")
    ax.set_title("Routing time: every neuron vs the subject index")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
