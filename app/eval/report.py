"""The human-readable report of a results dict: tables, the comparison with the baselines, report.md and its plots."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from app.eval import plots

TABLE_METRICS = [
    ("reliability", "rel"),
    ("generality", "gen"),
    ("locality", "loc"),
    ("generation_exact_match", "EM"),
    ("generation_exact_match_rephrase", "EM reph"),
    ("generation_locality_unchanged", "loc gen same"),
    ("locality_routed_rate", "loc routed"),
    ("locality_routed_unnamed_rate", "loc routed, subject unnamed"),
    ("probe_other_subject_routed_rate", "other-subj routed"),
    ("probe_same_subject_routed_rate", "same-subj routed"),
    ("cf_efficacy_score", "CF eff"),
    ("cf_paraphrase_score", "CF para"),
    ("cf_neighbourhood_score", "CF nbhd"),
    ("portability", "port"),
    ("target_perplexity", "ppl"),
    ("seconds_per_edit_p50", "s/edit p50"),
    ("seconds_per_edit_p95", "s/edit p95"),
]


def fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def metrics_table(
    methods: dict[str, dict[str, Any]], columns: Sequence[tuple[str, str]] = TABLE_METRICS
) -> list[list[str]]:
    # A metric no method has (CounterFact scores on ZsRE, say) gets no column.
    columns = [(key, label) for key, label in columns if any(m.get(key) is not None for m in methods.values())]
    rows = [["method"] + [label for _, label in columns]]
    for name, m in methods.items():
        rows.append([name] + [fmt(m.get(key)) for key, _ in columns])
    return rows


def markdown_table(rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    lines += ["| " + " | ".join(r) + " |" for r in rows[1:]]
    return "\n".join(lines)


def write_markdown(results: dict[str, Any], path: Path) -> None:
    lines = [
        f"# SCEN evaluation: {results['model']} on {Path(results['dataset']).name}",
        "",
        f"Command: `{results.get('command')}`  ",
        f"Seed {results['seed']}, {results['edits']} sequential edits, format `{results.get('dataset_format')}`.",
        "",
        "Teacher-forced token accuracy over the target plus end-of-turn token (rel, gen); locality is "
        "agreement with the unedited model's own argmax; EM is exact match of greedy generation.",
        "",
    ]
    if results.get("generation_sample") and results["edits"] > results["generation_sample"]:
        lines += [f"Teacher-forced metrics cover every edit. Generation metrics (EM, loc gen same) and sweeps "
                  f"at checkpoints past {results['generation_sample']} edits measure a seeded sample of "
                  f"{results['generation_sample']} of them, the same for every method.", ""]
    unedited = results.get("unedited") or {}
    if unedited:
        lines += [f"Unedited model: reliability {fmt(unedited.get('reliability'))}, "
                  f"target perplexity {fmt(unedited.get('target_perplexity'))}.", ""]
    for c in results.get("checkpoints", []):
        if c["methods"]:
            lines += [f"## After {c['edits']} edits", "", markdown_table(metrics_table(c["methods"])), ""]
    for name, sweep in (results.get("sweeps") or {}).items():
        for option, rows in sweep.items():
            cols = [(k, k) for k in ("reliability", "generality", "locality", "locality_routed_rate")]
            table = [[option] + [c for c, _ in cols]] + [
                [fmt(r["value"])] + [fmt(r.get(k)) for k, _ in cols] for r in rows
            ]
            lines += [f"## {name}: {option} sweep", "", markdown_table(table), ""]
    lines += comparison(results)
    for png in results.get("plots", []):
        lines += [f"![{Path(png).stem}]({Path(png).name})", ""]
    Path(path).write_text("\n".join(lines), encoding="utf-8")


COMPARED = [
    ("reliability", True), ("generality", True), ("locality", True), ("generation_exact_match", True),
    ("generation_exact_match_rephrase", True), ("generation_locality_unchanged", True),
    ("target_perplexity", False), ("seconds_per_edit_p50", False),
]


def comparison(results: dict[str, Any], margin: float = 0.02) -> list[str]:
    """Where SCEN is ahead of or behind each baseline at the last checkpoint.

    Rates count when they differ by more than ``margin``; lower-is-better figures
    (perplexity, seconds) when they differ by more than ``margin`` relative to the baseline.
    """
    methods = results.get("methods") or {}
    scen = methods.get("scen")
    if not scen or len(methods) < 2:
        return []
    lines = [f"## SCEN against each baseline after {results['edits']} edits", ""]
    for name, other in methods.items():
        if name == "scen":
            continue
        wins, losses = [], []
        for key, higher_better in COMPARED:
            a, b = scen.get(key), other.get(key)
            if a is None or b is None:
                continue
            diff = (a - b) if higher_better else (b - a) / max(b, 1e-9)
            text = f"{key} {fmt(a)} vs {fmt(b)}"
            if diff > margin:
                wins.append(text)
            elif diff < -margin:
                losses.append(text)
        lines.append(f"- **vs {name}**: ahead on " + ("; ".join(wins) or "nothing") + ". Behind on "
                     + ("; ".join(losses) or "nothing") + ".")
    return lines + [""]


def render(results: dict[str, Any], out: Path) -> Path:
    """Plots and report.md beside ``out`` (the results JSON); returns the markdown path."""
    folder = Path(out).parent
    folder.mkdir(parents=True, exist_ok=True)
    results["plots"] = [Path(p).name for p in plots.write_all(results, folder)]
    md = folder / "report.md"
    write_markdown(results, md)
    return md
