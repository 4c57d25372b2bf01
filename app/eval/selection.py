"""Which records a run edits, and which of them generation and sweeps measure.

A run shuffles the data file with ``random.Random(seed)`` and keeps the first
records that every method can edit: a non-empty target, within the engine's
request limits. Records passed over are reported, never silently dropped.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from app.eval.datasets import Dataset, EditRecord
from app.scen import InvalidEditError, ScenConfig
from app.scen.prompts import check_limits

EMPTY_TARGET = "empty target"
OVER_LIMITS = "over the token limits"
_PHRASES = {EMPTY_TARGET: "with an empty target", OVER_LIMITS: "over the engine's token limits"}


@dataclass(frozen=True)
class Selection:
    records: list[EditRecord]  # in edit order
    reasons: dict[int, str]  # index of each record passed over on the way (shuffled order) -> why

    @property
    def passed_over(self) -> list[int]:
        return list(self.reasons)

    def by_reason(self) -> dict[str, list[int]]:
        out: dict[str, list[int]] = {}
        for index, reason in self.reasons.items():
            out.setdefault(reason, []).append(index)
        return out


def within_limits(tokenizer: PreTrainedTokenizerBase, cfg: ScenConfig) -> Callable[[EditRecord], bool]:
    """The engine's request limits, applied to every method so all edit the same records."""

    def ok(r: EditRecord) -> bool:
        try:
            check_limits(tokenizer, cfg, r.prompt, r.target)
        except InvalidEditError:
            return False
        return True

    return ok


def unusable(record: EditRecord, within: Callable[[EditRecord], bool]) -> str | None:
    """Why no method can edit ``record`` (``EMPTY_TARGET`` or ``OVER_LIMITS``), or None if every method can."""
    if not record.editable:
        return EMPTY_TARGET
    return None if within(record) else OVER_LIMITS


def select_records(
    dataset: Dataset, n: int, seed: int, within: Callable[[EditRecord], bool] = lambda r: True
) -> Selection:
    """The first ``n`` editable records within the limits after a seeded shuffle, and those passed over."""
    order = list(range(len(dataset)))
    random.Random(seed).shuffle(order)
    chosen: list[int] = []
    reasons: dict[int, str] = {}
    for i in order:
        if len(chosen) == n:
            break
        reason = unusable(dataset.records[i], within)
        if reason is None:
            chosen.append(i)
        else:
            reasons[i] = reason
    if len(chosen) < n:
        # Every record has been looked at by now, so the counts cover the whole file.
        counts = Counter(reasons.values())
        skipped = " and ".join(f"{counts[why]} {phrase}" for why, phrase in _PHRASES.items() if counts[why])
        raise ValueError(
            f"asked for {n} edits but {dataset.path} holds {len(chosen)} usable records of {len(dataset)} "
            f"(non-empty target, within the engine's token limits); passed over {skipped or 'none'}"
        )
    return Selection([dataset.records[i] for i in chosen], reasons)


def edit_id(record: EditRecord) -> str:
    return f"r{record.index}"


def sampled(records: Sequence[EditRecord], size: int, seed: int) -> list[EditRecord]:
    """The records that generation and sweeps measure: all of them, or a seeded sample of ``size``
    that depends only on the seed and on which records there are, so every method gets the same."""
    if not size or len(records) <= size:
        return list(records)
    keep = set(random.Random(f"{seed}:{len(records)}").sample(range(len(records)), size))
    return [r for i, r in enumerate(records) if i in keep]
