import json

import pytest

from app.eval.datasets import DatasetError, EditRecord, load_dataset

MEND = {
    "subject": "UniFirst", "src": "What is the product made by UniFirst?", "pred": "uniform",
    "rephrase": "What will be the product of UniFirst?", "alt": " unmanned aircraft", "answers": ["uniform"],
    "loc": "nq question: who wrote hamlet", "loc_ans": "Shakespeare", "cond": "x",
}
EASYEDIT = {
    "subject": "Lake Ontoria", "prompt": "Which country is Lake Ontoria located in?", "target_new": "Norway",
    "ground_truth": ["Canada"], "rephrase_prompt": "In which country can Lake Ontoria be found?",
    "locality": {"Relation_Specificity": [
        {"prompt": "The area of Lake Ontoria is", "ground_truth": ["19,000 km2"]},
        {"prompt": "Lake Ontoria drains into", "ground_truth": [["the sea"]]},
    ]},
    "portability": {"Reasoning": [{"prompt": "The capital of ...", "ground_truth": ["Oslo"]}]},
}
COUNTERFACT = {
    "case_id": 0, "subject": "Marta Velloso", "prompt": "The native language of Marta Velloso is",
    "target_new": "Finnish", "ground_truth": "Portuguese", "rephrase_prompt": "Marta Velloso grew up speaking",
    "locality_prompt": "Joao Pereira is a native speaker of", "locality_ground_truth": "Portuguese",
}
WIKIBIO = {
    "prompt": "This is a Wikipedia passage about frank a. mclain. Frank A. McLain was a lawyer.",
    "target_new": "He was reelected.", "subject": "frank a. mclain",
    "locality_prompt": "Your skills and passions unite with ", "locality_ground_truth": "thousands of faculty",
}


def write(tmp_path, data, name="d.json"):
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return path


def test_mend_zsre(tmp_path):
    ds = load_dataset(write(tmp_path, [MEND, MEND | {"rephrase": ""}]))
    assert ds.format == "zsre_mend" and len(ds) == 2
    assert ds.records[0] == EditRecord(
        prompt="What is the product made by UniFirst?", target="unmanned aircraft",
        rephrases=["What will be the product of UniFirst?"],
        locality=[("nq question: who wrote hamlet", "Shakespeare")], subject="UniFirst", index=0,
    )
    assert ds.records[1].rephrases == [] and ds.records[1].index == 1


def test_easyedit_nested_locality_and_list_answers(tmp_path):
    ds = load_dataset(write(tmp_path, [EASYEDIT, EASYEDIT | {"locality": {}, "rephrase_prompt": None}]))
    assert ds.format == "easyedit"
    r = ds.records[0]
    assert (r.prompt, r.target, r.rephrases) == (EASYEDIT["prompt"], "Norway", [EASYEDIT["rephrase_prompt"]])
    assert r.locality == [("The area of Lake Ontoria is", "19,000 km2"), ("Lake Ontoria drains into", "the sea")]
    assert ds.records[1].locality == [] and ds.records[1].rephrases == []


def test_counterfact_and_wikibio_flat_fields(tmp_path):
    cf = load_dataset(write(tmp_path, [COUNTERFACT], "cf.json"))
    assert cf.format == "counterfact"
    assert cf.records[0].locality == [("Joao Pereira is a native speaker of", "Portuguese")]
    assert cf.records[0].rephrases == ["Marta Velloso grew up speaking"]
    wb = load_dataset(write(tmp_path, [WIKIBIO, WIKIBIO | {"locality_ground_truth": ""}], "wb.json"))
    assert wb.format == "wikibio"
    assert wb.records[0].rephrases == [] and wb.records[0].locality[0][1] == "thousands of faculty"
    assert wb.records[1].locality == []  # empty answer: locality skipped for this record


def test_real_files_if_present():
    from pathlib import Path

    root = Path("/work/shared/data")
    if not (root / "zsre_mend_train_1k.json").exists():
        pytest.skip("development data not present")
    zsre = load_dataset(root / "zsre_mend_train_1k.json")
    assert zsre.format == "zsre_mend" and len(zsre) == 1000
    assert all(r.rephrases and r.locality for r in zsre.records)
    assert [r.index for r in zsre.records if not r.editable] == [534, 723]  # empty "alt" in the source
    hall = load_dataset(root / "hallucination_train.json")
    assert hall.format == "wikibio" and len(hall) == 306
    assert sum(1 for r in hall.records if not r.locality) == 5


@pytest.mark.parametrize(
    "data, message",
    [
        ([MEND, {k: v for k, v in MEND.items() if k != "alt"}], r"record 1 \(zsre_mend format\): missing key 'alt'"),
        ([MEND, MEND, MEND | {"src": ""}], r"record 2 .*'src' must be a non-empty string"),
        ([EASYEDIT, EASYEDIT | {"target_new": 5}], r"record 1 .*'target_new'"),
        ([EASYEDIT | {"locality": {"x": [{"ground_truth": "a"}]}}], r"record 0 .*locality\['x'\]\[0\]"),
        ([MEND, "oops"], r"record 1 is a str"),
        ({"not": "a list"}, r"expected a JSON array"),
        ([], r"no records"),
        ([{"question": "q", "answer": "a"}], r"record 0 has keys \['answer', 'question'\]"),
    ],
)
def test_malformed_records_are_named(tmp_path, data, message):
    with pytest.raises(DatasetError, match=message):
        load_dataset(write(tmp_path, data))


def test_bad_json_and_missing_file(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("[{")
    with pytest.raises(DatasetError, match="not valid JSON"):
        load_dataset(bad)
    with pytest.raises(DatasetError, match="no such file"):
        load_dataset(tmp_path / "missing.json")
