"""Readers for knowledge-editing data files, normalised to one ``EditRecord``.

Four layouts are recognised from their keys:

* ``zsre_mend``   - MEND's ZsRE release (``src``, ``alt``, ``rephrase``, ``loc``, ``loc_ans``).
* ``easyedit``    - EasyEdit / KnowEdit ZsRE (``prompt``, ``target_new``, ``rephrase_prompt``,
  ``locality`` as a dict of named lists of ``{prompt, ground_truth}``).
* ``counterfact`` - EasyEdit CounterFact (flat ``locality_prompt`` / ``locality_ground_truth``
  and a ``rephrase_prompt``).
* ``wikibio``     - WISE hallucination split (flat locality fields, no rephrase).

Targets and answers are stripped of surrounding whitespace: the answer follows the
assistant header of the chat template, where a leading space is not something
the model would produce. A target that is present but empty is kept (the record
is not ``editable``; ``app.eval.selection`` leaves it out and says so). Missing or
empty rephrase / locality fields leave the record's list empty; the measurements
count those as skipped for that metric.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class DatasetError(ValueError):
    """A data file or one of its records cannot be read."""


@dataclass(frozen=True)
class EditRecord:
    prompt: str
    target: str
    rephrases: list[str] = field(default_factory=list)
    locality: list[tuple[str, str]] = field(default_factory=list)  # (prompt, answer)
    subject: str | None = None
    index: int = 0  # position in the source file
    true_answer: str | None = None  # the object before the edit (CounterFact's ``ground_truth``)
    portability: list[tuple[str, str]] = field(default_factory=list)  # (prompt, answer) that follow from the edit

    @property
    def editable(self) -> bool:
        # Two records of the MEND ZsRE file have an empty "alt": there is nothing to teach.
        return bool(self.target)


@dataclass(frozen=True)
class Dataset:
    path: str
    format: str
    records: list[EditRecord]

    def __len__(self) -> int:
        return len(self.records)


def load_dataset(path: str | Path) -> Dataset:
    path = Path(path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DatasetError(f"{path}: no such file") from None
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{path}: not valid JSON ({exc})") from None
    return parse_records(raw, source=str(path))


def parse_records(raw: Any, source: str = "<data>") -> Dataset:
    if isinstance(raw, dict) and isinstance(raw.get("data"), list):
        raw = raw["data"]
    if not isinstance(raw, list):
        raise DatasetError(f"{source}: expected a JSON array of records, got {type(raw).__name__}")
    if not raw:
        raise DatasetError(f"{source}: the file holds no records")
    fmt = detect_format(raw[0], source)
    reader = _READERS[fmt]
    records = []
    for i, item in enumerate(raw):
        if not isinstance(item, dict):
            raise DatasetError(f"{source}: record {i} is a {type(item).__name__}, expected an object")
        try:
            records.append(reader(_Fields(item, i, fmt)))
        except DatasetError as exc:
            raise DatasetError(f"{source}: {exc}") from None
    return Dataset(source, fmt, records)


def detect_format(first: Any, source: str = "<data>") -> str:
    if not isinstance(first, dict):
        raise DatasetError(f"{source}: record 0 is a {type(first).__name__}, expected an object")
    keys = set(first)
    if {"src", "alt"} <= keys:
        return "zsre_mend"
    if {"prompt", "target_new"} <= keys:
        if isinstance(first.get("locality"), dict):
            return "easyedit"
        if "rephrase_prompt" in keys or "case_id" in keys:
            return "counterfact"
        if "locality_prompt" in keys:
            return "wikibio"
        return "easyedit"
    raise DatasetError(
        f"{source}: record 0 has keys {sorted(keys)}; expected MEND ZsRE (src, alt, rephrase, loc, loc_ans) "
        "or EasyEdit style (prompt, target_new, rephrase_prompt, locality...)"
    )


class _Fields:
    """One raw record, with errors that name the record and the key."""

    def __init__(self, item: dict, index: int, fmt: str):
        self.item, self.index, self.fmt = item, index, fmt

    def fail(self, message: str) -> DatasetError:
        return DatasetError(f"record {self.index} ({self.fmt} format): {message}")

    def text(self, key: str, allow_empty: bool = False) -> str:
        if key not in self.item:
            raise self.fail(f"missing key {key!r}")
        value = _first_text(self.item[key])
        if value is None or (not value.strip() and not allow_empty):
            raise self.fail(f"key {key!r} must be a non-empty string, got {self.item[key]!r}")
        return value.strip()

    def optional_text(self, key: str) -> str | None:
        value = _first_text(self.item.get(key))
        return value.strip() if value is not None and value.strip() else None

    def texts(self, key: str) -> list[str]:
        value = self.item.get(key)
        items = value if isinstance(value, list) else [value]
        out = [t.strip() for t in (_first_text(v) for v in items) if t is not None and t.strip()]
        return out


def _first_text(value: Any) -> str | None:
    """A string, or the first string inside (possibly nested) lists, as answer lists are."""
    while isinstance(value, list) and value:
        value = value[0]
    return value if isinstance(value, str) else None


def _read_zsre_mend(f: _Fields) -> EditRecord:
    loc, loc_ans = f.optional_text("loc"), f.optional_text("loc_ans")
    return EditRecord(
        prompt=f.text("src"),
        target=f.text("alt", allow_empty=True),
        rephrases=f.texts("rephrase"),
        locality=[(loc, loc_ans)] if loc and loc_ans else [],
        subject=f.optional_text("subject"),
        index=f.index,
    )


def _named_pairs(f: _Fields, key: str) -> list[tuple[str, str]]:
    """Every (prompt, answer) of an EasyEdit dict of named lists (``locality``, ``portability``)."""
    pairs: list[tuple[str, str]] = []
    groups = f.item.get(key) or {}
    if not isinstance(groups, dict):
        raise f.fail(f"key {key!r} must be an object of named lists, got {type(groups).__name__}")
    for name, entries in groups.items():
        entries = entries if isinstance(entries, list) else [entries]
        for j, entry in enumerate(entries):
            if not isinstance(entry, dict) or "prompt" not in entry:
                raise f.fail(f"{key}[{name!r}][{j}] must be an object with 'prompt' and 'ground_truth'")
            prompts = entry["prompt"] if isinstance(entry["prompt"], list) else [entry["prompt"]]
            answers = entry.get("ground_truth")
            answers = answers if isinstance(answers, list) and len(prompts) > 1 else [answers]
            for p, a in zip(prompts, answers):
                p, a = _first_text(p), _first_text(a)
                if p and p.strip() and a and a.strip():
                    pairs.append((p.strip(), a.strip()))
    return pairs


def _read_easyedit(f: _Fields) -> EditRecord:
    return EditRecord(
        prompt=f.text("prompt"),
        target=f.text("target_new", allow_empty=True),
        rephrases=f.texts("rephrase_prompt"),
        locality=_named_pairs(f, "locality"),
        subject=f.optional_text("subject"),
        index=f.index,
        true_answer=f.optional_text("ground_truth"),
        portability=_named_pairs(f, "portability"),
    )


def _read_flat(f: _Fields) -> EditRecord:
    prompts = f.texts("locality_prompt")
    answers = f.texts("locality_ground_truth")
    return EditRecord(
        prompt=f.text("prompt"),
        target=f.text("target_new", allow_empty=True),
        rephrases=f.texts("rephrase_prompt"),
        locality=list(zip(prompts, answers)),
        subject=f.optional_text("subject"),
        index=f.index,
        true_answer=f.optional_text("ground_truth"),
    )


_READERS = {
    "zsre_mend": _read_zsre_mend,
    "easyedit": _read_easyedit,
    "counterfact": _read_flat,
    "wikibio": _read_flat,
}
