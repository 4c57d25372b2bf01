from collections.abc import Callable

import pytest

from app.eval.datasets import Dataset, EditRecord
from app.eval.selection import EMPTY_TARGET, OVER_LIMITS, select_records, within_limits
from app.scen import ScenConfig
from tests.utils.tiny_models import tiny_tokenizer

LONG = "a very long answer " * 20


def dataset(targets: list[str]) -> Dataset:
    records = [EditRecord(prompt=f"What is item {i}?", target=t, index=i) for i, t in enumerate(targets)]
    return Dataset("d.json", "zsre_mend", records)


def limits() -> Callable[[EditRecord], bool]:
    return within_limits(tiny_tokenizer(), ScenConfig(max_target_tokens=16))


def test_records_are_passed_over_with_their_reason():
    data = dataset(["Paris", "", LONG, "Rome", LONG, "Oslo", "Bern"])
    sel = select_records(data, 4, seed=0, within=limits())
    assert len(sel.records) == 4 and all(r.target and r.target != LONG for r in sel.records)
    assert sorted(sel.passed_over) == [1, 2, 4]
    assert sel.reasons == {1: EMPTY_TARGET, 2: OVER_LIMITS, 4: OVER_LIMITS}
    assert {k: sorted(v) for k, v in sel.by_reason().items()} == {EMPTY_TARGET: [1], OVER_LIMITS: [2, 4]}
    assert select_records(data, 4, seed=0, within=limits()) == sel  # seeded


def test_too_few_records_within_the_limits_counts_those_within_the_limits():
    # Every target is editable (non-empty) but over the token limit: none can be edited.
    data = dataset([LONG] * 75)
    with pytest.raises(ValueError) as err:
        select_records(data, 10, seed=0, within=limits())
    message = str(err.value)
    assert "asked for 10 edits" in message and "holds 0 usable records of 75" in message
    assert "passed over 75 over the engine's token limits" in message and "with an empty target" not in message


def test_too_few_records_names_both_reasons():
    data = dataset(["", "", LONG, "Paris", LONG, LONG])
    with pytest.raises(ValueError, match="holds 1 usable records of 6 .*passed over 2 with an empty target "
                                         "and 3 over the engine's token limits"):
        select_records(data, 2, seed=0, within=limits())
