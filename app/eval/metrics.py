"""Metric functions: pure, on token ids, strings and numbers."""

from __future__ import annotations

import math
from collections.abc import Sequence


def token_accuracy(predicted: Sequence[int], target: Sequence[int]) -> float:
    """Share of target positions whose teacher-forced argmax is the target token."""
    if len(predicted) != len(target):
        raise ValueError(f"predicted has {len(predicted)} tokens, target {len(target)}")
    if not target:
        raise ValueError("empty target")
    return sum(p == t for p, t in zip(predicted, target)) / len(target)


def agreement(predicted: Sequence[int], reference: Sequence[int]) -> float:
    """Locality: share of positions where the edited model's argmax equals the unedited model's."""
    return token_accuracy(predicted, reference)


def normalise_text(text: str) -> str:
    return " ".join(text.split())


def exact_match(generated: str, target: str) -> bool:
    return normalise_text(generated) == normalise_text(target)


def contains_match(generated: str, target: str) -> bool:
    target = normalise_text(target)
    return bool(target) and target.lower() in normalise_text(generated).lower()


def perplexity(token_logprobs: Sequence[float]) -> float:
    """exp of the mean negative log-likelihood (natural log) of the target tokens."""
    if not token_logprobs:
        raise ValueError("no tokens")
    return math.exp(-sum(token_logprobs) / len(token_logprobs))


def mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def percentile(values: Sequence[float], q: float) -> float | None:
    """Linear interpolation between closest ranks (numpy's default), q in [0, 100]."""
    if not values:
        return None
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summary(values: Sequence[float]) -> dict[str, float | None]:
    return {
        "mean": mean(values),
        "p50": percentile(values, 50),
        "p95": percentile(values, 95),
        "max": max(values) if values else None,
    }


def rate(flags: Sequence[bool]) -> float | None:
    return sum(bool(f) for f in flags) / len(flags) if flags else None
