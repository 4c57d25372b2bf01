import json

import pytest

from app.eval.plan import EvalPlan, parse_checkpoints, parse_methods
from app.eval.runner import run
from tests.utils.tiny_models import tiny_model

QUESTIONS = [
    ("What is the capital of France?", "Which city is the capital of France?", "Rome"),
    ("Who wrote Hamlet?", "Hamlet was written by whom?", "Dickens"),
    ("How many legs does a spider have?", "A spider has how many legs?", "Six"),
    ("Which river flows through Cairo?", "What river runs through Cairo?", "Thames"),
    ("What is the capital of Spain?", "Which city is Spain's capital?", "Lisbon"),
]


def mend_file(tmp_path, n=5):
    recs = [
        {"subject": "s", "src": q, "pred": "p", "rephrase": r, "alt": a, "answers": ["x"],
         "loc": "nq question: the quick brown fox jumps over the lazy dog", "loc_ans": "a fox", "cond": "c"}
        for q, r, a in QUESTIONS[:n]
    ]
    recs.append(dict(recs[0], alt=""))  # an empty target, passed over
    path = tmp_path / "zsre.json"
    path.write_text(json.dumps(recs))
    return path


def test_parse_arguments():
    assert parse_checkpoints("200") == [200]
    assert parse_checkpoints("50,10,200") == [10, 50, 200]
    with pytest.raises(ValueError):
        parse_checkpoints("ten")
    assert parse_methods("scen, ft") == ["scen", "ft"]
    with pytest.raises(ValueError, match="unknown method"):
        parse_methods("scen,rome")


def test_scen_end_to_end_on_tiny_model(tmp_path):
    out = tmp_path / "results.json"
    plan = EvalPlan(
        dataset=mend_file(tmp_path), checkpoints=[2, 4], seed=1, out=out,
        overrides=["layer=2", "expert_lr=1e-2"], sample=3,
    )
    results = run(plan, lm=tiny_model("llama"))
    on_disk = json.loads(out.read_text())
    assert on_disk["methods"] == results["methods"]
    assert (on_disk["edits"], on_disk["seed"], on_disk["model"]) == (4, 1, "tiny-llama")
    assert on_disk["config"]["layer"] == 2 and on_disk["config"]["seed"] == 1
    m = on_disk["methods"]["scen"]
    for key in ("reliability", "generality", "locality", "generation_exact_match", "seconds_per_edit_p50",
                "seconds_per_edit_p95", "locality_routed_rate", "locality_routed_unnamed_rate",
                "generation_exact_match_rephrase"):
        assert m[key] is not None and 0 <= m[key] <= (1 if "seconds" not in key else 1e3), key
    assert m["locality_routed_unnamed_rate"] <= m["locality_routed_rate"]
    # Converged edits on a model that routes them: the edit prompt is reproduced exactly.
    assert m["reliability"] == 1.0 and m["generation_exact_match"] == 1.0
    assert m["counts"] == {"edits": 4, "rephrases": 4, "locality": 4}
    # The routing snapshot reads the sample's prompts; its heatmap, the first edits in order.
    snapshot = on_disk["routing"]["scen"]
    assert {group: len(top) for group, top in snapshot["top"].items()} == {"edit": 3, "rephrase": 3, "locality": 3}
    assert [len(row) for row in snapshot["heatmap"]["edit"]] == [4] * 4
    assert m["skipped"] == {"generality": 0, "locality": 0}
    assert [c["edits"] for c in on_disk["checkpoints"]] == [2, 4]
    assert on_disk["checkpoints"][1]["methods"]["scen"] == m
    assert len(on_disk["per_edit"]["scen"]) == 4 and m["train"]["edits"] == 4


def test_same_seed_same_selection_and_numbers(tmp_path):
    kw = {"dataset": mend_file(tmp_path), "checkpoints": [2], "overrides": ["layer=2", "expert_lr=1e-2"],
          "generation": False}
    a = run(EvalPlan(seed=3, out=tmp_path / "a.json", **kw), lm=tiny_model("llama"))
    b = run(EvalPlan(seed=3, out=tmp_path / "b.json", **kw), lm=tiny_model("llama"))

    def strip(r):
        return {k: v for k, v in r["methods"]["scen"].items() if "seconds" not in k and k != "train"}
    assert [e["id"] for e in a["per_edit"]["scen"]] == [e["id"] for e in b["per_edit"]["scen"]]
    assert strip(a) == strip(b)


def test_all_methods_and_theta_sweep_on_tiny_model(tmp_path):
    out = tmp_path / "results.json"
    plan = EvalPlan(
        dataset=mend_file(tmp_path), checkpoints=[1, 2], seed=0, out=out, methods=["scen", "ft", "ft_kl", "grace"],
        overrides=["layer=2", "expert_lr=1e-2"], sweeps=["theta=0.5:0.9:0.4"], generation=False,
        method_options=["grace.epsilon=1.0", "grace.lr=0.5"],
    )
    results = run(plan, lm=tiny_model("llama"))
    assert set(results["methods"]) == {"scen", "ft", "ft_kl", "grace"}
    for name, m in results["methods"].items():
        assert 0 <= m["reliability"] <= 1 and 0 <= m["locality"] <= 1, name
        assert results["checkpoints"][0]["methods"][name]["counts"]["edits"] == 1
    assert results["methods"]["ft"]["locality_routed_rate"] is None
    assert results["methods"]["ft"]["locality_routed_unnamed_rate"] is None
    assert results["methods"]["grace"]["locality_routed_rate"] is not None
    assert results["method_config"]["grace"]["epsilon"] == 1.0
    assert [r["value"] for r in results["sweeps"]["scen"]["theta"]] == [0.5, 0.9]
    # Every edit prompt is its own neuron's positive: it routes to its own edit at every theta swept.
    assert results["sweeps"]["scen"]["theta"][0]["reliability_routed_own_rate"] == 1.0
    assert set(results["routing"]["scen"]["top"]) == {"edit", "rephrase", "locality"}


def test_resume_skips_finished_methods(tmp_path, caplog):
    kw = {"dataset": mend_file(tmp_path), "checkpoints": [2], "seed": 0, "out": tmp_path / "r.json",
          "overrides": ["layer=2", "expert_lr=1e-2"], "generation": False}
    first = run(EvalPlan(methods=["ft"], **kw), lm=tiny_model("llama"))
    caplog.set_level("INFO")
    second = run(EvalPlan(methods=["ft", "grace"], resume=True, **kw), lm=tiny_model("llama"))
    assert "ft already complete" in caplog.text
    assert second["methods"]["ft"] == first["methods"]["ft"] and "grace" in second["methods"]
    with pytest.raises(ValueError, match="different run"):
        run(EvalPlan(methods=["ft"], resume=True, **(kw | {"seed": 5})), lm=tiny_model("llama"))


def test_records_over_the_engine_limits_are_passed_over_for_every_method(tmp_path):
    path = mend_file(tmp_path)
    recs = json.loads(path.read_text())
    recs[1]["alt"] = "a very long answer " * 20
    path.write_text(json.dumps(recs))
    plan = EvalPlan(dataset=path, checkpoints=[4], seed=0, out=tmp_path / "r.json", methods=["ft"],
                    overrides=["layer=2", "max_target_tokens=16"], generation=False)
    results = run(plan, lm=tiny_model("llama"))
    assert sorted(results["records_passed_over"]) == [1, 5]
    assert 1 not in [int(e["id"][1:]) for e in results["per_edit"]["ft"]]


def test_generation_sample_is_seeded_and_shared():
    from app.eval.datasets import EditRecord
    from app.eval.selection import sampled

    records = [EditRecord(index=i, prompt=f"p{i}", target="t") for i in range(50)]
    assert sampled(records, 0, 0) == records and sampled(records[:10], 20, 0) == records[:10]
    a = sampled(records, 20, 0)
    assert len(a) == 20 and a == sampled(list(records), 20, 0)  # same for every method
    assert [r.index for r in a] == sorted(r.index for r in a)  # edit order kept
    assert a != sampled(records, 20, 1)


def test_generation_and_sweeps_measure_the_sample(tmp_path):
    plan = EvalPlan(
        dataset=mend_file(tmp_path), checkpoints=[2, 4], seed=0, out=tmp_path / "r.json", methods=["scen"],
        overrides=["layer=2", "expert_lr=1e-2"], sweeps=["theta=0.5,0.9"], sample=3,
    )
    results = run(plan, lm=tiny_model("llama"))
    first, last = (c["methods"]["scen"] for c in results["checkpoints"])
    assert first["generation_edits"] == 2 and first["counts"]["edits"] == 2
    assert last["generation_edits"] == 3 and last["counts"]["edits"] == 4  # teacher-forced: every edit
    assert all(row["counts"]["edits"] == 3 for row in results["sweeps"]["scen"]["theta"])
    assert results["generation_sample"] == 3


def test_ft_kl_draws_a_minibatch_of_its_kl_prompts(tmp_path):
    plan = EvalPlan(
        dataset=mend_file(tmp_path), checkpoints=[2], seed=0, out=tmp_path / "r.json", methods=["ft_kl"],
        overrides=["layer=2", "expert_lr=1e-2"], generation=False,
        method_options=["ft_kl.kl_prompts=6", "ft_kl.kl_batch=2"],
    )
    results = run(plan, lm=tiny_model("llama"))
    assert results["method_config"]["ft_kl"] | {"kl_prompts": 6, "kl_batch": 2} == results["method_config"]["ft_kl"]
    assert all(e["kl"] > 0 for e in results["per_edit"]["ft_kl"] if e["steps"])


def test_jobs_run_method_groups_in_processes_and_merge(tmp_path):
    from app.eval.command import run_from_cli
    from app.eval.parallel import split

    assert split(["scen", "ft", "ft_kl", "grace"], 2) == [["scen", "ft"], ["ft_kl", "grace"]]
    assert split(["scen", "ft", "grace"], 2) == [["scen", "ft"], ["grace"]]
    assert split(["scen"], 4) == [["scen"]]
    lm = tiny_model("llama")
    lm.model.save_pretrained(tmp_path / "tiny")
    lm.tokenizer.save_pretrained(tmp_path / "tiny")
    out = tmp_path / "run" / "results.json"
    results = run_from_cli(
        dataset=mend_file(tmp_path), edits="1,2", seed=0, out=out, model=str(tmp_path / "tiny"),
        methods="ft,grace", overrides=["layer=2"], sweeps=[], resume=False, generation=False, jobs=2,
        method_options=["grace.epsilon=1.0"],
    )
    assert set(results["methods"]) == {"ft", "grace"} and results["method_config"]["grace"]["epsilon"] == 1.0
    assert [set(c["methods"]) for c in results["checkpoints"]] == [{"ft", "grace"}] * 2
    assert json.loads(out.read_text())["methods"] == results["methods"]
    assert (out.parent / "report.md").exists()
    # Each process logged into its own file; the merged report lists the parts' methods together.
    log_text = (out.parent / "parts" / "grace" / "log.txt").read_text()
    assert "editing 2 (seed 0)" in log_text and "grace edits" in log_text
    assert (out.parent / "parts" / "ft" / "results.json").exists()


def test_counterfact_scores_probes_and_portability(tmp_path):
    subjects = ["France", "Hamlet", "Spain", "Cairo", "Egypt", "Paris"]
    recs = [
        {"case_id": i, "subject": s, "prompt": f"The capital of {s} is", "target_new": "Rome", "ground_truth": "Paris",
         "rephrase_prompt": f"{s} has its capital in", "locality_prompt": "The capital of Italy is",
         "locality_ground_truth": "Rome"}
        for i, s in enumerate(subjects)
    ]
    recs[1]["prompt"] = "Hamlet was written by"  # another question, for the same-subject probes
    path = tmp_path / "cf.json"
    path.write_text(json.dumps(recs))
    plan = EvalPlan(dataset=path, checkpoints=[3], seed=0, out=tmp_path / "r.json",
                    overrides=["layer=2", "expert_lr=1e-2"], generation=False)
    m = run(plan, lm=tiny_model("llama"))["methods"]["scen"]
    for key in ("cf_efficacy_score", "cf_paraphrase_score", "cf_neighbourhood_score",
                "probe_other_subject_routed_rate"):
        assert 0 <= m[key] <= 1, key
    # Every edited record names its subject and three records are left over: one probe of each kind per edit.
    assert m["counts_probes"]["other_subject"] == 3


def test_portability_is_read_and_scored(tmp_path):
    recs = [
        {"subject": s, "prompt": f"Which country is {s} in?", "target_new": "Norway", "ground_truth": ["Canada"],
         "rephrase_prompt": f"Where is {s}?",
         "locality": {"Relation_Specificity": [{"prompt": f"The area of {s} is", "ground_truth": ["19 km2"]}]},
         "portability": {"Reasoning": [{"prompt": f"The capital of the country of {s} is", "ground_truth": ["Oslo"]}]}}
        for s in ["Lake Ontoria", "Mount Pell"]
    ]
    path = tmp_path / "knowedit.json"
    path.write_text(json.dumps(recs))
    plan = EvalPlan(dataset=path, checkpoints=[2], seed=0, out=tmp_path / "r.json",
                    overrides=["layer=2", "expert_lr=1e-2"], generation=False)
    m = run(plan, lm=tiny_model("llama"))["methods"]["scen"]
    assert 0 <= m["portability"] <= 1 and 0 <= m["cf_efficacy_score"] <= 1
