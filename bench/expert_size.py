"""Expert size against accuracy: the full expert and low-rank experts of several ranks, from
evaluation runs on the same records.

    .venv/bin/python bench/expert_size.py --full FULL/results.json --lowrank LOW/results.json [...]

Each ``--full`` / ``--lowrank`` pair is one development file: the full expert's run
(``scen eval ... --set expert=full``) and a low-rank run with a rank sweep (``scen eval ...
--set expert=lowrank --set rank=8 --sweep rank=2,4,16``), both with the same records, seed
and edit count. The low-rank run's own rank gives its last checkpoint; the swept ranks, each
retrained from the unedited model, give their sweep rows (teacher-forced metrics only). Size
is the bytes one expert stores for the bundled model's edited layer (float32). Results:
bench/results/expert_size.json and expert_size.png.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

OUT = Path("bench/results/expert_size.json")
METRICS = ("reliability", "generality", "locality",
           "cf_efficacy_score", "cf_paraphrase_score", "cf_neighbourhood_score")


def expert_bytes(d: int, h: int, rank: int | None) -> int:
    return 4 * (d * h if rank is None else rank * (d + h))


def points(full: dict, lowrank: dict, d: int, h: int) -> list[dict]:
    def point(name: str, rank: int | None, row: dict) -> dict:
        return {"expert": name, "rank": rank, "bytes": expert_bytes(d, h, rank),
                **{m: round(row[m], 4) for m in METRICS if row.get(m) is not None}}

    rows = [point("full", None, full["methods"]["scen"])]
    own = lowrank["config"]["rank"]
    rows.append(point("lowrank", own, lowrank["methods"]["scen"]))
    for row in lowrank.get("sweeps", {}).get("scen", {}).get("rank", []):
        rows.append(point("lowrank", int(row["value"]), row))
    return sorted(rows, key=lambda r: r["bytes"])


def edited_layer_shape() -> tuple[int, int]:
    from app.models import load_model
    from app.scen.adapters import adapter_for
    from app.scen.config import ScenConfig

    model = load_model().model
    adapter = adapter_for(model)
    layers = adapter.layer_list(model)
    d, h = adapter.down_weight(adapter.get_down(layers[ScenConfig().resolved_layer(len(layers))])).shape
    return int(d), int(h)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", type=Path, action="append", required=True)
    parser.add_argument("--lowrank", type=Path, action="append", required=True)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    if len(args.full) != len(args.lowrank):
        parser.error("give one --lowrank run for each --full run")
    d, h = edited_layer_shape()
    files = []
    for full_path, low_path in zip(args.full, args.lowrank):
        full, low = json.loads(full_path.read_text()), json.loads(low_path.read_text())
        for key in ("dataset", "seed", "edits"):
            if full[key] != low[key]:
                raise SystemExit(f"{full_path} and {low_path} differ in {key}")
        files.append({"dataset": Path(full["dataset"]).name, "edits": full["edits"], "seed": full["seed"],
                      "commands": [full["command"], low["command"]], "points": points(full, low, d, h)})
    result = {"what": __doc__.split("\n\n")[0].replace("\n", " "), "edited_layer": {"d": d, "h": h},
              "files": files}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    plot(files, args.out.with_suffix(".png"))
    print(f"wrote {args.out}")


def plot(files: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(files), figsize=(5.5 * len(files), 4), squeeze=False)
    for ax, f in zip(axes[0], files):
        kb = [p["bytes"] / 1024 for p in f["points"]]
        for metric in METRICS:
            ys = [p.get(metric) for p in f["points"]]
            if all(y is not None for y in ys):
                ax.plot(kb, ys, "-o", label=metric.replace("_", " "))
        for p, x in zip(f["points"], kb):
            ax.annotate("full" if p["rank"] is None else f"r{p['rank']}", (x, 0.02), fontsize=7, ha="center")
        ax.set_xscale("log")
        ax.set_ylim(0, 1.05)
        ax.set_xlabel("KB per expert (log)")
        ax.set_title(f"{f['dataset']}, {f['edits']} sequential edits")
        ax.legend(fontsize=7, loc="center right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
