import json

import pytest

from app.eval import report
from app.eval.results import merge, write_json
from app.eval.sweep_options import parse_sweep


def test_parse_sweep():
    assert parse_sweep("theta=0.5:0.9:0.1") == ("theta", [0.5, 0.6, 0.7, 0.8, 0.9])
    name, layers = parse_sweep("layer=20,25")
    assert (name, layers) == ("layer", [20, 25]) and all(isinstance(v, int) for v in layers)
    assert parse_sweep("rank=8:32:8") == ("rank", [8, 16, 24, 32])
    with pytest.raises(ValueError, match="bad sweep"):
        parse_sweep("theta")
    with pytest.raises(ValueError, match="bad sweep"):
        parse_sweep("theta=0.9:0.5:-0.1")


def fake_results():
    def m(rel, loc, s):
        return {"reliability": rel, "generality": rel - 0.2, "locality": loc,
                "generation_exact_match": rel, "seconds_per_edit_p50": s}

    return {
        "model": "tiny", "dataset": "d.json", "seed": 0, "edits": 50, "config": {"theta": 0.65},
        "methods": {"scen": m(1.0, 0.99, 1.0), "ft": m(0.5, 0.40, 1.0)},
        "checkpoints": [{"edits": 10, "methods": {"scen": m(1.0, 1.0, 1.0), "ft": m(0.9, 0.8, 1.0)}},
                        {"edits": 50, "methods": {"scen": m(1.0, 0.99, 1.0), "ft": m(0.5, 0.40, 1.0)}}],
        "sweeps": {"scen": {"theta": [{"value": 0.5, "reliability": 1.0, "locality": 0.9},
                                      {"value": 0.7, "reliability": 0.9, "locality": 1.0}]}},
        "routing": {"scen": {"top": {"edit": [0.99, 0.97], "locality": [0.01, 0.2]},
                             "heatmap": {"edit": [[0.99, 0.0], [0.1, 0.97]]}}},
    }


def test_comparison_names_wins_and_losses():
    lines = report.comparison(fake_results())
    ft = next(line for line in lines if "vs ft" in line)
    assert "ahead on reliability 1.000 vs 0.500" in ft and "locality 0.990 vs 0.400" in ft
    assert "Behind on nothing" in ft


def test_comparison_lower_is_better_is_relative():
    results = fake_results()
    results["methods"]["scen"].update(target_perplexity=1.05, seconds_per_edit_p50=2.0)
    results["methods"]["ft"].update(target_perplexity=1.50, seconds_per_edit_p50=1.99)
    ft = next(line for line in report.comparison(results) if "vs ft" in line)
    assert "target_perplexity 1.050 vs 1.500" in ft.split("Behind")[0]
    assert "seconds_per_edit_p50" not in ft  # 0.5 % slower is within the margin


def test_render_writes_markdown_and_plots(tmp_path):
    results = fake_results()
    md = report.render(results, tmp_path / "results.json")
    text = md.read_text()
    assert "| scen | 1.000 |" in text and "## After 10 edits" in text and "theta sweep" in text
    for name in ("scaling.png", "sweep_theta.png", "activations_heatmap.png", "top_activation.png"):
        assert (tmp_path / name).stat().st_size > 1000 and f"({name})" in text
    write_json(results, tmp_path / "results.json")
    assert json.loads((tmp_path / "results.json").read_text())["plots"]


def test_merge_combines_methods_of_parallel_runs():
    a, b = fake_results(), fake_results()
    a["methods"].pop("ft")
    for c in a["checkpoints"]:
        c["methods"].pop("ft")
    b["methods"].pop("scen")
    for c in b["checkpoints"]:
        c["methods"].pop("scen")
    b["sweeps"], b["routing"] = {}, {}
    merged = merge([a, b])
    assert set(merged["methods"]) == {"scen", "ft"}
    assert [set(c["methods"]) for c in merged["checkpoints"]] == [{"scen", "ft"}, {"scen", "ft"}]
    assert merged["sweeps"]["scen"] == a["sweeps"]["scen"] and "ft" not in a["methods"]  # inputs untouched
    with pytest.raises(ValueError, match="differ in seed"):
        merge([a, dict(b, seed=1)])
