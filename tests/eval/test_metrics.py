import math

import pytest

from app.eval import metrics as M


def test_token_accuracy_exact_values():
    assert M.token_accuracy([1, 2, 3, 4], [1, 2, 3, 4]) == 1.0
    assert M.token_accuracy([1, 9, 3, 9], [1, 2, 3, 4]) == 0.5
    assert M.token_accuracy([5, 6, 7], [1, 2, 3]) == 0.0
    assert M.token_accuracy([7], [7]) == 1.0
    assert M.token_accuracy([1, 2, 0], [1, 2, 3]) == pytest.approx(2 / 3)


def test_token_accuracy_rejects_mismatched_or_empty():
    with pytest.raises(ValueError, match="predicted has 2 tokens, target 3"):
        M.token_accuracy([1, 2], [1, 2, 3])
    with pytest.raises(ValueError):
        M.token_accuracy([], [])


def test_agreement_is_positionwise():
    assert M.agreement([3, 4, 5, 6], [3, 0, 5, 0]) == 0.5


def test_exact_and_contains_match():
    assert M.exact_match(" Rome \n", "Rome")
    assert M.exact_match("New  York", "New York")
    assert not M.exact_match("Rome.", "Rome")
    assert not M.exact_match("rome", "Rome")
    assert M.contains_match("It is Rome.", "rome")
    assert not M.contains_match("It is Paris.", "Rome")
    assert not M.contains_match("anything", "  ")


def test_perplexity():
    assert M.perplexity([0.0, 0.0]) == 1.0
    assert M.perplexity([math.log(0.5)] * 3) == pytest.approx(2.0)
    assert M.perplexity([math.log(0.5), math.log(0.125)]) == pytest.approx(4.0)


def test_percentile_matches_linear_interpolation():
    xs = [4.0, 1.0, 3.0, 2.0]
    assert M.percentile(xs, 50) == 2.5
    assert M.percentile(xs, 0) == 1.0
    assert M.percentile(xs, 100) == 4.0
    assert M.percentile(list(range(1, 21)), 95) == pytest.approx(19.05)
    assert M.percentile([7.0], 95) == 7.0
    assert M.percentile([], 50) is None


def test_mean_rate_summary():
    assert M.mean([1.0, 0.5]) == 0.75 and M.mean([]) is None
    assert M.rate([True, False, False, True]) == 0.5 and M.rate([]) is None
    assert M.summary([1, 2, 3]) == {"mean": 2.0, "p50": 2.0, "p95": 2.9, "max": 3}
