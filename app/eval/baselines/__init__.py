"""Baseline editors driven by the same harness as SCEN."""

from __future__ import annotations


def build_baseline(name: str, model, tokenizer, scen_config, options: dict[str, str]):
    raise ValueError(f"baseline {name!r} is not available yet")
