"""What a sweep is: its ``--sweep`` spelling, and which settings a trained method can change without retraining."""

from __future__ import annotations

# Settings changed in place on the trained method (routing only); any other setting is retrained per value.
INFERENCE_OPTIONS = {
    "scen": {"theta", "subject_margin", "relation_margin", "subject_span_cos", "question_cos",
             "question_lead", "question_floor", "rival_cos"},
    "grace": {"epsilon_scale"},
}
DEFAULTS = {"theta": None, "subject_margin": None, "relation_margin": None, "subject_span_cos": None,
            "question_cos": None, "question_lead": None, "question_floor": None,
            "rival_cos": None, "epsilon_scale": 1.0}


def _number(text: str) -> int | float:
    # Integer-valued options (layer, rank) keep their type so they reach configs and tables as ints.
    text = text.strip()
    try:
        return int(text)
    except ValueError:
        return float(text)


def parse_sweep(spec: str) -> tuple[str, list[int | float]]:
    """``name=start:stop:step`` (stop included) or ``name=v1,v2,...``."""
    name, sep, values = spec.partition("=")
    if not sep or not values:
        raise ValueError(f"bad sweep {spec!r}: expected name=start:stop:step or name=v1,v2")
    name = name.strip()
    try:
        if ":" in values:
            start, stop, step = (_number(x) for x in values.split(":"))
            if step <= 0:
                raise ValueError("step must be positive")
            n = int(round((stop - start) / step)) + 1
            integral = isinstance(start, int) and isinstance(step, int)
            out = [start + i * step if integral else round(start + i * step, 10) for i in range(n)]
        else:
            out = [_number(x) for x in values.split(",")]
    except ValueError as exc:
        raise ValueError(f"bad sweep {spec!r}: {exc}") from None
    return name, out


def retrains(method: str, option: str) -> bool:
    """Whether sweeping ``option`` of ``method`` trains the method again for every value."""
    return option not in INFERENCE_OPTIONS.get(method, set())
