"""Measuring one method at one checkpoint: teacher-forced and generation metrics, training and routing summaries."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from tqdm.auto import tqdm

from app.eval import metrics as M
from app.eval.datasets import EditRecord
from app.eval.method import EditMethod
from app.eval.plan import EvalPlan
from app.eval.reference import LocalityItem, Reference, locality_items
from app.eval.scoring import generation_limit, greedy, teacher_forced
from app.eval.selection import edit_id, sampled

EditItem = tuple[str, str, str]  # (edit id, prompt, target)


def prompt_sets(records: Sequence[EditRecord]) -> tuple[list[EditItem], list[EditItem], list[LocalityItem]]:
    """(edit id, prompt, answer) triples of the edit prompts and the rephrases, and the locality items."""
    rel = [(edit_id(r), r.prompt, r.target) for r in records]
    gen = [(edit_id(r), p, r.target) for r in records for p in r.rephrases]
    return rel, gen, locality_items(records)


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
    rel, gen, loc = prompt_sets(records)
    prompts = [p for _, p, _ in rel] + [p for _, p, _ in gen] + [p for _, p, _ in loc]
    targets = [t for _, _, t in rel] + [t for _, _, t in gen] + [a for _, _, a in loc]
    n_rel, n_gen = len(rel), len(gen)

    start = time.perf_counter()
    with tqdm(total=len(prompts), desc=f"{method.name}: scoring", leave=False) as bar:
        scored = teacher_forced(
            method.model, method.tokenizer, prompts, targets, probe=method.probe, batch_size=plan.batch_size,
            progress=bar.update,
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


def generation_metrics(
    method: EditMethod, records: Sequence[EditRecord], reference: Reference, plan: EvalPlan
) -> dict[str, Any]:
    """Greedy generation with the chat template on ``records``' prompts: exact and contains match
    of the target, and whether locality generations are unchanged from the unedited model."""
    tok = method.tokenizer
    rel, gen, loc = prompt_sets(records)
    items: list[tuple[Any, str, str]] = [*rel, *gen, *loc]
    prompts = [p for _, p, _ in items]
    limits = [generation_limit(tok, t) for _, _, t in items]
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


def routing_snapshot(method: EditMethod, records: Sequence[EditRecord], limit: int = 40) -> dict[str, Any]:
    """Top routing score of every edit prompt, rephrase and locality prompt, plus a small
    prompts-by-edits block of scores for the heatmap."""
    prompts = {
        "edit": [r.prompt for r in records],
        "rephrase": [p for r in records for p in r.rephrases[:1]],
        "locality": [p for r in records for p, _ in r.locality[:1]],
    }
    out: dict[str, Any] = {"top": {}, "heatmap": {}}
    for group, texts in prompts.items():
        if not texts:
            continue
        scores = method.routing_scores(texts)
        if scores is None or scores.shape[1] == 0:
            return {}
        out["top"][group] = scores.max(-1).values.tolist()
        out["heatmap"][group] = scores[:limit, :limit].tolist()
    return out
