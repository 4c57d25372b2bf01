"""PNG plots of a results dictionary (matplotlib, no display needed)."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType
from typing import Any

from app.eval.sweep_options import retrains

CURVES = [
    ("reliability", "reliability (teacher-forced)"),
    ("generality", "generality (teacher-forced)"),
    ("locality", "locality (agreement with unedited)"),
    ("generation_exact_match", "exact match, edit prompt"),
    ("generation_exact_match_rephrase", "exact match, rephrase"),
    ("generation_locality_unchanged", "locality generation unchanged"),
    ("target_perplexity", "target perplexity (log scale)"),
]


def _plt() -> ModuleType:
    # Agg is chosen only when a plot is drawn, so importing this module never changes the backend
    # of a program that shows its own figures.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def scaling(results: dict[str, Any], path: Path) -> Path | None:
    checkpoints = [c for c in results.get("checkpoints", []) if c["methods"]]
    if not checkpoints:
        return None
    plt = _plt()
    methods = sorted({m for c in checkpoints for m in c["methods"]})
    # Only the metrics this run measured (no generation panels for --no-generation, ...).
    curves = [(k, t) for k, t in CURVES if any(c["methods"][m].get(k) is not None for c in checkpoints
                                                 for m in c["methods"])]
    rows = (len(curves) + 2) // 3
    fig, axes = plt.subplots(rows, 3, figsize=(13, 3.5 * rows), squeeze=False)
    edits = [c["edits"] for c in checkpoints]
    for ax in axes.flat[len(curves):]:
        ax.set_visible(False)
    for ax, (key, title) in zip(axes.flat, curves):
        for name in methods:
            pts = [(c["edits"], c["methods"][name].get(key)) for c in checkpoints if name in c["methods"]]
            pts = [(x, y) for x, y in pts if y is not None]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=name)
        ax.set_title(title, fontsize=10)
        ax.set_xscale("log")
        ax.set_xticks(edits, [str(n) for n in edits])
        ax.minorticks_off()
        if key == "target_perplexity":
            ax.set_yscale("log")
        else:
            ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        ax.set_xlabel("edits applied (sequential)")
    axes[0, 0].legend()
    fig.suptitle(f"{results['model']}: metrics as edits accumulate (seed {results['seed']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def sweep(results: dict[str, Any], method: str, option: str, path: Path) -> Path | None:
    rows = (results.get("sweeps") or {}).get(method, {}).get(option)
    if not rows:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    xs = [r["value"] for r in rows]
    for key in ("reliability", "generality", "locality", "locality_routed_rate", "generality_routed_own_rate"):
        ys = [r.get(key) for r in rows]
        if any(y is not None for y in ys):
            ax.plot(xs, ys, marker="o", label=key)
    ax.set_xticks(xs, [f"{x:g}" for x in xs])
    ax.set_xlabel(option)
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    how = "retrained per value" if retrains(method, option) else "no retraining"
    ax.set_title(f"{method}: {option} sweep after {results['edits']} edits ({how})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def heatmap(results: dict[str, Any], path: Path, method: str = "scen") -> Path | None:
    snap = (results.get("routing") or {}).get(method) or {}
    maps = snap.get("heatmap") or {}
    if not maps:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, len(maps), figsize=(5 * len(maps), 4.6), squeeze=False)
    for ax, (group, grid) in zip(axes[0], maps.items()):
        im = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto")
        ax.set_title(f"{group} prompts")
        ax.set_xlabel("indexing neuron (edit order)")
        ax.set_ylabel("prompt (edit order)")
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="activation")
    fig.suptitle(f"{method}: neuron activations (first {len(next(iter(maps.values())))} edits)")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def top_activation(results: dict[str, Any], path: Path, method: str = "scen") -> Path | None:
    snap = (results.get("routing") or {}).get(method) or {}
    top = snap.get("top") or {}
    if not top:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    bins = [i / 40 for i in range(41)]
    for group, values in top.items():
        ax.hist(values, bins=bins, alpha=0.5, label=f"{group} (n={len(values)})")
    ax.set_yscale("log")  # the few prompts near theta matter more than the thousands near 0 or 1
    theta = (results.get("method_config") or {}).get(method, {}).get("theta") or results["config"].get("theta")
    if theta is not None:
        ax.axvline(theta, color="k", linestyle="--", label=f"theta = {theta}")
    ax.set_xlabel("top neuron activation")
    ax.set_ylabel("prompts")
    ax.legend(fontsize=8)
    ax.set_title(f"{method}: top activation, edited vs unrelated prompts")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_all(results: dict[str, Any], folder: Path) -> list[str]:
    folder = Path(folder)
    made = [scaling(results, folder / "scaling.png")]
    for method, options in (results.get("sweeps") or {}).items():
        for option in options:
            name = f"sweep_{option}.png" if method == "scen" else f"sweep_{method}_{option}.png"
            made.append(sweep(results, method, option, folder / name))
    made += [
        heatmap(results, folder / "activations_heatmap.png"),
        top_activation(results, folder / "top_activation.png"),
    ]
    return [str(p) for p in made if p is not None]
