"""Measuring one method at one checkpoint: teacher-forced and generation metrics, training and routing summaries."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from tqdm.auto import tqdm

from app.eval import metrics as M
from app.eval.datasets import EditRecord
from app.eval.method import EditMethod
from app.eval.neighbours import prefers
from app.eval.plan import EvalPlan
from app.eval.reference import LocalityItem, Reference, locality_items
from app.eval.scoring import Scored, generation_limit, greedy, teacher_forced
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
        # A locality prompt may name the subject of another edit of the run (CounterFact's
        # neighbourhoods do now and then): a route there can be that edit answering about its own
        # subject. Routes to an edit whose subject the prompt does not name are leaks for sure.
        subjects = {edit_id(r): r.subject for r in records}
        out["locality_routed_unnamed_rate"] = M.rate([
            s.served_by is not None and not _names(p, subjects.get(s.served_by)) for (_, p, _), s in zip(loc, s_loc)
        ])
        out["reliability_routed_own_rate"] = M.rate([s.served_by == e for (e, _, _), s in zip(rel, s_rel)])
        out["generality_routed_own_rate"] = M.rate([s.served_by == e for (e, _, _), s in zip(gen, s_gen)])
    else:
        out["locality_routed_rate"] = out["locality_routed_unnamed_rate"] = None

    out |= neighbour_metrics(method, records, reference, plan, (rel, gen, loc), (s_rel, s_gen, s_loc))
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


def _names(prompt: str, subject: str | None) -> bool:
    return subject is not None and subject != "" and subject.casefold() in prompt.casefold()


def neighbour_metrics(
    method: EditMethod, records: Sequence[EditRecord], reference: Reference, plan: EvalPlan,
    sets: tuple[list[EditItem], list[EditItem], list[LocalityItem]],
    scored_sets: tuple[Sequence[Scored], Sequence[Scored], Sequence[Scored]],
) -> dict[str, Any]:
    """Hard-negative probes routed, CounterFact scores and portability (see ``neighbours``), given
    ``prompt_sets(records)`` and their scores with the edits' own answers."""
    rel, gen, loc = sets
    s_rel, s_gen, s_loc = scored_sets
    by_id = {edit_id(r): r for r in records}
    by_index = {r.index: r for r in records}
    probes = reference.probes.upto(set(by_id))
    counterfact = all(r.true_answer for r in records)
    # Each group is scored with the answer it needs; routing is decided by the prompt alone.
    groups: list[list[tuple[str, str]]] = [
        [(p, by_id[e].target) for e, p in probes.other_subject],
        [(p, by_id[e].target) for e, p in probes.same_subject],
        [(p, by_id[e].true_answer or "") for e, p, _ in rel] if counterfact else [],
        [(p, by_id[e].true_answer or "") for e, p, _ in gen] if counterfact else [],
        [(p, by_index[k[0]].target) for k, p, _ in loc] if counterfact else [],
        [(p, a) for r in records for p, a in r.portability],
    ]
    flat = [pair for group in groups for pair in group]
    scored = iter(_score(method, [p for p, _ in flat], [a for _, a in flat], plan, "neighbours"))
    other, same, true_rel, true_gen, new_loc, port = ([next(scored) for _ in group] for group in groups)
    out: dict[str, Any] = {"counts_probes": {"other_subject": len(other), "same_subject": len(same)}}
    if method.routes:
        out["probe_other_subject_routed_rate"] = M.rate([s.served_by is not None for s in other])
        out["probe_same_subject_routed_rate"] = M.rate([s.served_by is not None for s in same])
    if counterfact:
        out["cf_efficacy_score"] = M.rate([prefers(a.logprobs, b.logprobs) for a, b in zip(s_rel, true_rel)])
        out["cf_paraphrase_score"] = M.rate([prefers(a.logprobs, b.logprobs) for a, b in zip(s_gen, true_gen)])
        out["cf_neighbourhood_score"] = M.rate([prefers(a.logprobs, b.logprobs) for a, b in zip(s_loc, new_loc)])
    if port:
        out["portability"] = M.mean([M.token_accuracy(s.predicted, s.target) for s in port])
    return out


def _score(method: EditMethod, prompts: list[str], targets: list[str], plan: EvalPlan, what: str) -> list[Scored]:
    if not prompts:
        return []
    with tqdm(total=len(prompts), desc=f"{method.name}: {what}", leave=False) as bar:
        return teacher_forced(method.model, method.tokenizer, prompts, targets, probe=method.probe,
                              batch_size=plan.batch_size, progress=bar.update)


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


def routing_snapshot(
    method: EditMethod, records: Sequence[EditRecord], plan: EvalPlan, limit: int = 40
) -> dict[str, Any]:
    """Top routing score of each edit prompt, rephrase and locality prompt of the run's sample
    (``EvalPlan.sample``: reading every prompt of a 1,000-edit run took minutes), plus a
    prompts-by-edits block of scores of the first ``limit`` edits for the heatmap."""
    top = {group: scores.max(-1).values.tolist()
           for group, scores in _snapshot_scores(method, sampled(records, plan.sample, plan.seed))}
    heatmap = {group: scores[:, :limit].tolist() for group, scores in _snapshot_scores(method, records[:limit])}
    return {"top": top, "heatmap": heatmap} if top else {}


def _snapshot_scores(method: EditMethod, records: Sequence[EditRecord]):
    """(group, routing scores (prompts, edits)) of the records' edit prompts, first rephrases and
    first locality prompts; groups with no prompt or no edit to score are left out."""
    groups = {
        "edit": [r.prompt for r in records],
        "rephrase": [p for r in records for p in r.rephrases[:1]],
        "locality": [p for r in records for p, _ in r.locality[:1]],
    }
    for group, prompts in groups.items():
        scores = method.routing_scores(prompts) if prompts else None
        if scores is not None and scores.shape[1]:
            yield group, scores
