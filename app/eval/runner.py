"""Sequential-editing evaluation: apply edits one after another, measure at checkpoints.

One run shuffles the data file with ``random.Random(seed)``, keeps the first
``max(checkpoints)`` records and, for each method on its own copy of the unedited
model, applies them in that order. At every checkpoint n it measures on the
first n records (see ``evaluate``); scaling curves therefore come from one
sequential run, never from restarts.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from tqdm.auto import tqdm

from app.eval import metrics as M
from app.eval.datasets import Dataset, EditRecord, load_dataset
from app.eval.method import EditMethod
from app.eval.scoring import generation_limit, greedy, teacher_forced
from app.scen import InvalidEditError

log = logging.getLogger(__name__)

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
    # Free generation and sweeps at a checkpoint past this many edits measure a seeded sample
    # of this many of its edits (the same sample for every method); teacher-forced metrics
    # always cover every edit. 0 measures every edit.
    sample: int = 300
    resume: bool = False
    # Options of the baselines, "method.key=value" (e.g. "grace.epsilon=3").
    method_options: list[str] = field(default_factory=list)
    command: str | None = None

    @property
    def edits(self) -> int:
        return max(self.checkpoints)


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


def select_records(
    dataset: Dataset, n: int, seed: int, usable: Callable[[EditRecord], bool] = lambda r: True
) -> tuple[list[EditRecord], list[int]]:
    """The first ``n`` usable records after a seeded shuffle, and the indices of unusable ones passed over."""
    order = list(range(len(dataset)))
    random.Random(seed).shuffle(order)
    chosen, passed = [], []
    for i in order:
        if len(chosen) == n:
            break
        r = dataset.records[i]
        (chosen if r.editable and usable(r) else passed).append(i)
    if len(chosen) < n:
        usable = sum(r.editable for r in dataset.records)
        raise ValueError(f"asked for {n} edits but {dataset.path} holds {usable} usable records")
    return [dataset.records[i] for i in chosen], passed


def within_limits(tokenizer, cfg) -> Callable[[EditRecord], bool]:
    """The engine's request limits, applied to every method so all edit the same records."""
    from app.scen.prompts import prompt_ids, target_ids

    def ok(r: EditRecord) -> bool:
        return (
            len(prompt_ids(tokenizer, r.prompt)) <= cfg.max_prompt_tokens
            and len(target_ids(tokenizer, r.target)) - 1 <= cfg.max_target_tokens
        )

    return ok


def edit_id(record: EditRecord) -> str:
    return f"r{record.index}"


def sampled(records: Sequence[EditRecord], size: int, seed: int) -> list[EditRecord]:
    """The records that generation and sweeps measure: all of them, or a seeded sample of ``size``
    that depends only on the seed and on which records there are, so every method gets the same."""
    if not size or len(records) <= size:
        return list(records)
    keep = set(random.Random(f"{seed}:{len(records)}").sample(range(len(records)), size))
    return [r for i, r in enumerate(records) if i in keep]


# ---- the unedited model's reference answers ------------------------------------------------


@dataclass
class Reference:
    """What the unedited model does on every prompt of the run, for locality and "before" numbers."""

    loc_predicted: dict[tuple[int, int], list[int]]  # (record index, locality j) -> argmax ids
    metrics: dict[str, Any]
    model: Any = None  # the unedited model, for greedy generations asked for later
    tokenizer: Any = None
    batch_size: int = 16
    loc_generated: dict[tuple[int, int], str] = field(default_factory=dict)

    def generations(self, items: Sequence[tuple[tuple[int, int], str, str]]) -> dict[tuple[int, int], str]:
        """The unedited model's greedy generation on locality ``items``, each generated once per run."""
        todo = [item for item in items if item[0] not in self.loc_generated]
        if todo:
            limits = [generation_limit(self.tokenizer, a) for _, _, a in todo]
            with tqdm(total=len(todo), desc="unedited generation", leave=False) as bar:
                gens = greedy(self.model, self.tokenizer, [p for _, p, _ in todo], limits,
                              batch_size=self.batch_size, progress=bar.update)
            self.loc_generated |= {key: g.text for (key, _, _), g in zip(todo, gens)}
        return {key: self.loc_generated[key] for key, _, _ in items}


def locality_items(records: Sequence[EditRecord]) -> list[tuple[tuple[int, int], str, str]]:
    return [((r.index, j), p, a) for r in records for j, (p, a) in enumerate(r.locality)]


def build_reference(model, tokenizer, records: Sequence[EditRecord], plan: EvalPlan) -> Reference:
    items = locality_items(records)
    loc_prompts = [p for _, p, _ in items]
    loc_answers = [a for _, _, a in items]
    n_rel = len(records)
    prompts = [r.prompt for r in records] + loc_prompts
    targets = [r.target for r in records] + loc_answers
    with tqdm(total=len(prompts), desc="unedited model", leave=False) as bar:
        scored = teacher_forced(model, tokenizer, prompts, targets, batch_size=plan.batch_size, progress=bar.update)
    loc_pred = {key: s.predicted for (key, _, _), s in zip(items, scored[n_rel:])}
    rel = [M.token_accuracy(s.predicted, s.target) for s in scored[:n_rel]]
    ppl = [M.perplexity(s.logprobs) for s in scored[:n_rel]]
    return Reference(loc_pred, {"reliability": M.mean(rel), "target_perplexity": M.mean(ppl)}, model, tokenizer,
                     plan.batch_size)


# ---- measuring one method at one checkpoint ------------------------------------------------


def evaluate(
    method: EditMethod,
    records: Sequence[EditRecord],
    reference: Reference,
    plan: EvalPlan,
    edit_seconds: Sequence[float] = (),
    generation: bool | None = None,
) -> dict[str, Any]:
    """All metrics of ``method`` on ``records`` (the edits applied so far)."""
    generation = plan.generation if generation is None else generation
    tok = method.tokenizer
    rel, gen, loc = prompt_sets(records)
    prompts = [p for _, p, _ in rel] + [p for _, p, _ in gen] + [p for _, p, _ in loc]
    targets = [t for _, _, t in rel] + [t for _, _, t in gen] + [a for _, _, a in loc]
    n_rel, n_gen = len(rel), len(gen)

    start = time.perf_counter()
    with tqdm(total=len(prompts), desc=f"{method.name}: scoring", leave=False) as bar:
        scored = teacher_forced(
            method.model, tok, prompts, targets, probe=method.probe, batch_size=plan.batch_size, progress=bar.update
        )
    s_rel, s_gen, s_loc = scored[:n_rel], scored[n_rel : n_rel + n_gen], scored[n_rel + n_gen :]
    out: dict[str, Any] = {
        "reliability": M.mean([M.token_accuracy(s.predicted, s.target) for s in s_rel]),
        "generality": M.mean([M.token_accuracy(s.predicted, s.target) for s in s_gen]),
        "locality": M.mean([M.agreement(s.predicted, reference.loc_predicted[k]) for (k, _, _), s in zip(loc, s_loc)]),
        "target_perplexity": M.mean([M.perplexity(s.logprobs) for s in s_rel]),
    }
    if method.routes:
        out["locality_routed_rate"] = M.rate([s.served_by is not None for s in s_loc])
        out["reliability_routed_own_rate"] = M.rate([s.served_by == e for (e, _, _), s in zip(rel, s_rel)])
        out["generality_routed_own_rate"] = M.rate([s.served_by == e for (e, _, _), s in zip(gen, s_gen)])
    else:
        out["locality_routed_rate"] = None

    if generation:
        out |= generation_metrics(method, sampled(records, plan.sample, plan.seed), reference, plan)
    secs = list(edit_seconds)
    out |= {
        "seconds_per_edit_p50": M.percentile(secs, 50),
        "seconds_per_edit_p95": M.percentile(secs, 95),
        "counts": {"edits": len(records), "rephrases": n_gen, "locality": len(loc)},
        "skipped": {
            "generality": sum(1 for r in records if not r.rephrases),
            "locality": sum(1 for r in records if not r.locality),
        },
        "eval_seconds": time.perf_counter() - start,
    }
    return out


def prompt_sets(records: Sequence[EditRecord]):
    """(edit id, prompt, answer) triples of the edit prompts, the rephrases and the locality prompts."""
    rel = [(edit_id(r), r.prompt, r.target) for r in records]
    gen = [(edit_id(r), p, r.target) for r in records for p in r.rephrases]
    return rel, gen, locality_items(records)


def generation_metrics(
    method: EditMethod, records: Sequence[EditRecord], reference: Reference, plan: EvalPlan
) -> dict[str, Any]:
    """Greedy generation with the chat template on ``records``' prompts: exact and contains match
    of the target, and whether locality generations are unchanged from the unedited model."""
    tok = method.tokenizer
    rel, gen, loc = prompt_sets(records)
    prompts = [p for _, p, _ in rel + gen + loc]
    limits = [generation_limit(tok, t) for _, _, t in rel + gen + loc]
    with tqdm(total=len(prompts), desc=f"{method.name}: generation", leave=False) as bar:
        gens = greedy(method.model, tok, prompts, limits, probe=method.probe, batch_size=plan.batch_size,
                      progress=bar.update)
    n_rel, n_gen = len(rel), len(gen)
    g_rel, g_gen, g_loc = gens[:n_rel], gens[n_rel : n_rel + n_gen], gens[n_rel + n_gen :]
    before = reference.generations(loc)
    return {
        "generation_exact_match": M.rate([M.exact_match(g.text, t) for (_, _, t), g in zip(rel, g_rel)]),
        "generation_exact_match_rephrase": M.rate([M.exact_match(g.text, t) for (_, _, t), g in zip(gen, g_gen)]),
        "generation_contains": M.rate([M.contains_match(g.text, t) for (_, _, t), g in zip(rel, g_rel)]),
        "generation_contains_rephrase": M.rate([M.contains_match(g.text, t) for (_, _, t), g in zip(gen, g_gen)]),
        "generation_locality_unchanged": M.rate(
            [M.exact_match(g.text, before[k]) for (k, _, _), g in zip(loc, g_loc)]
        ),
        "generation_edits": len(records),
    }


def train_summary(per_edit: Sequence[dict[str, Any]]) -> dict[str, Any]:
    steps = [e["steps"] for e in per_edit if e.get("steps") is not None]
    secs = [e["seconds"] for e in per_edit if e.get("seconds") is not None]
    conv = [e["converged"] for e in per_edit if e.get("converged") is not None]
    return {
        "edits": len(per_edit),
        "failed": sum(1 for e in per_edit if e.get("error")),
        "steps": M.summary(steps),
        "seconds": M.summary(secs),
        "converged_rate": M.rate(conv),
    }


# ---- building methods ---------------------------------------------------------------------


def scen_config(plan: EvalPlan):
    from app.scen import ScenConfig

    return ScenConfig.from_overrides(plan.overrides, base=ScenConfig(seed=plan.seed))


def method_options(plan: EvalPlan, name: str) -> dict[str, str]:
    opts = {}
    for item in plan.method_options:
        key, sep, value = item.partition("=")
        owner, dot, option = key.partition(".")
        if not sep or not dot:
            raise ValueError(f"bad method option {item!r}: expected method.key=value")
        if owner == name:
            opts[option] = value
    return opts


def build_method(name: str, model, tokenizer, plan: EvalPlan) -> EditMethod:
    cfg = scen_config(plan)
    if name == "scen":
        from app.eval.scen_method import ScenMethod

        return ScenMethod(model, tokenizer, cfg)
    from app.eval.baselines import build_baseline

    return build_baseline(name, model, tokenizer, cfg, method_options(plan, name))


# ---- the run -------------------------------------------------------------------------------


def run(plan: EvalPlan, lm=None, on_checkpoint: Callable[[dict], None] | None = None) -> dict[str, Any]:
    from app.eval import report

    dataset = load_dataset(plan.dataset)
    if lm is None:
        from app.models import load_model

        lm = load_model(plan.model)
    base_model, tokenizer = lm.model, lm.tokenizer
    cfg = scen_config(plan)
    records, passed_over = select_records(dataset, plan.edits, plan.seed, within_limits(tokenizer, cfg))
    if passed_over:
        log.warning("records %s have an empty target or exceed the engine's token limits; passed over", passed_over)
    results: dict[str, Any] = report.load_partial(plan) if plan.resume else {}
    if not results:
        results = {
            "model": lm.name,
            "dataset": str(plan.dataset),
            "dataset_format": dataset.format,
            "edits": plan.edits,
            "seed": plan.seed,
            "config": dataclasses.asdict(cfg),
            "method_config": {},
            "command": plan.command,
            "checkpoint_edits": plan.checkpoints,
            "generation_sample": plan.sample,
            "records_passed_over": passed_over,
            "methods": {},
            "checkpoints": [{"edits": n, "methods": {}} for n in plan.checkpoints],
            "per_edit": {},
            "sweeps": {},
        }
    log.info("%s: %s format, %d records; editing %d (seed %d)", plan.dataset, dataset.format, len(dataset),
             plan.edits, plan.seed)

    torch.manual_seed(plan.seed)
    reference = build_reference(base_model, tokenizer, records, plan)
    results["unedited"] = reference.metrics

    for name in plan.methods:
        if name in results["methods"] and all(name in c["methods"] for c in results["checkpoints"]):
            log.info("%s already complete in %s; skipping", name, plan.out)
            continue
        torch.manual_seed(plan.seed)
        method = build_method(name, copy.deepcopy(base_model), tokenizer, plan)
        results["method_config"][name] = method.config()
        per_edit: list[dict[str, Any]] = []
        ok: list[EditRecord] = []
        with tqdm(total=plan.edits, desc=f"{name} edits", unit="edit", dynamic_ncols=True) as bar:
            for i, record in enumerate(records):
                eid = edit_id(record)
                try:
                    m = method.apply(eid, record)
                    ok.append(record)
                except InvalidEditError as exc:
                    log.warning("%s: record %d not edited: %s", name, record.index, exc)
                    m = {"error": str(exc), "seconds": None}
                per_edit.append({"id": eid, **m})
                bar.update(1)
                bar.set_postfix(steps=m.get("steps"), s=f"{m['seconds']:.2f}" if m.get("seconds") else "-")
                n = i + 1
                if n in plan.checkpoints:
                    secs = [e["seconds"] for e in per_edit if e.get("seconds") is not None]
                    bar.set_description(f"{name} eval@{n}")
                    metrics = evaluate(method, ok, reference, plan, secs)
                    metrics["train"] = train_summary(per_edit)
                    bar.set_description(f"{name} edits")
                    for c in results["checkpoints"]:
                        if c["edits"] == n:
                            c["methods"][name] = metrics
                    if n == plan.edits:
                        results["methods"][name] = metrics
                    results["per_edit"][name] = per_edit
                    report.write_json(results, plan.out)
                    if on_checkpoint:
                        on_checkpoint(results)
        if plan.sweeps:
            from app.eval.sweeps import run_sweeps

            results["sweeps"][name] = run_sweeps(method, ok, reference, plan, base_model)
        if method.routes:
            results.setdefault("routing", {})[name] = report.routing_snapshot(method, ok)
        report.write_json(results, plan.out)
        method.close()
        del method
    return results


def run_from_cli(
    dataset: Path,
    edits: str,
    seed: int,
    out: Path,
    model: str | None,
    methods: str,
    overrides: list[str],
    sweeps: list[str],
    resume: bool,
    method_options: list[str] | None = None,
    generation: bool = True,
    command: str | None = None,
    sample: int = EvalPlan.sample,
    jobs: int = 1,
) -> dict[str, Any]:
    import shlex
    import sys

    from app.eval import report

    plan = EvalPlan(
        dataset=Path(dataset), checkpoints=parse_checkpoints(edits), seed=seed, methods=parse_methods(methods),
        overrides=list(overrides), sweeps=list(sweeps), out=Path(out), model=model, resume=resume,
        method_options=list(method_options or []), generation=generation, sample=sample,
    )
    scen_config(plan)  # fail on a bad --set before loading anything
    plan.command = command or "scen " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    if jobs > 1 and len(plan.methods) > 1:
        from app.eval.parallel import run_parallel

        results = run_parallel(plan, jobs)
    else:
        results = run(plan)
    report.render(results, plan.out)
    report.write_json(results, plan.out)
    report.print_summary(results)
    return results
