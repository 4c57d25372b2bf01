"""What one evaluation run does: the ``EvalPlan`` and the parsing of its command-line values.

A plan is a plain dataclass so that it can be handed, pickled, to a spawned process
(``app.eval.parallel``) that runs part of it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from app.scen import ScenConfig

KNOWN_METHODS = ("scen", "ft", "ft_kl", "grace")


@dataclass
class EvalPlan:
    dataset: Path
    checkpoints: list[int]
    seed: int = 0
    methods: list[str] = field(default_factory=lambda: ["scen"])
    overrides: list[str] = field(default_factory=list)
    sweeps: list[str] = field(default_factory=list)
    out: Path = Path("results.json")
    model: str | None = None
    batch_size: int = 16
    generation: bool = True
    # Free generation, sweeps and the routing snapshot past this many edits measure a seeded
    # sample of this many of the edits (the same sample for every method); teacher-forced
    # metrics always cover every edit. 0 measures every edit.
    sample: int = 300
    resume: bool = False
    # Options of the baselines, "method.key=value" (e.g. "grace.epsilon=3").
    method_options: list[str] = field(default_factory=list)
    command: str | None = None

    @property
    def edits(self) -> int:
        return max(self.checkpoints)

    def scen_config(self) -> ScenConfig:
        """The engine's settings with the plan's ``--set`` overrides; the plan's seed unless overridden."""
        return ScenConfig.from_overrides(self.overrides, base=ScenConfig(seed=self.seed))

    def options_for(self, method: str) -> dict[str, str]:
        """The ``--option`` values addressed to ``method``, without the method prefix."""
        opts = {}
        for item in self.method_options:
            key, sep, value = item.partition("=")
            owner, dot, option = key.partition(".")
            if not sep or not dot:
                raise ValueError(f"bad method option {item!r}: expected method.key=value")
            if owner == method:
                opts[option] = value
        return opts


def parse_checkpoints(edits: str | int) -> list[int]:
    try:
        values = sorted({int(x) for x in str(edits).split(",") if x.strip()})
    except ValueError:
        raise ValueError(f"--edits must be a number or comma-separated numbers, got {edits!r}") from None
    if not values or values[0] < 1:
        raise ValueError(f"--edits needs positive numbers, got {edits!r}")
    return values


def parse_methods(methods: str | Sequence[str]) -> list[str]:
    names = [m.strip() for m in (methods.split(",") if isinstance(methods, str) else methods) if m.strip()]
    unknown = [m for m in names if m not in KNOWN_METHODS]
    if unknown or not names:
        raise ValueError(f"unknown method(s) {unknown}; choose from {', '.join(KNOWN_METHODS)}")
    return names
