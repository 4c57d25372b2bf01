"""Other readings of the question key, against the engine's before sentences were read (layer 6,
text less subject, rewording discounted at 0.2), on the pairs ``question_keys.py`` compares: an
edit prompt with its rephrase (should be near) and with another question about the same subject
(should be far).

    .venv/bin/python bench/question_key_variants.py [--records 300] [--wordings FILE]

* **token alignment** - the question's tokens matched one by one instead of averaged
  (BERTScore-like): each token of one question takes its best cosine among the other's
  (whitened per token on the ordinary prompts' tokens), as the mean over the edit's tokens
  ("recall") or of both directions ("f"), plain or weighted by each token's rarity among the
  ordinary prompts and generic questions (idf); and the idf-weighted mean of whitened tokens;
* **entity discount** - besides rewording, the directions in which the *entity* moves a
  question's key (a generic question about six entities, each less their mean) are weighed
  down too: subject information the question's tokens pick up by attention;
* **template positives** - where the edit's question matches a wording group of ``--wordings``
  (cosine at least tau to one of its wordings, asked about a fixed entity), that group's wordings
  asked about the edit's own subject join the prompt as positives: the rephrase (or probe) is
  scored by its best cosine to any of them ("max") or to their normalised mean ("mean");
* **contrast with generic relations** - the rephrase (or probe) scored by its cosine to the
  prompt less ``lam`` times its best cosine to a generic relation (``relations.txt``, each
  template's mean key over six entities) that lies below ``tau`` of the prompt: a question nearer
  another relation than the edit's would lose. Also the share whose nearest generic relation is
  the prompt's own;
* **the subject's sentence** - ``routed.question_span``: sentences before the one naming the
  subject are left out, over all pairs and over those whose rephrase opens with another
  sentence, read in context; and that sentence read alone, in a forward pass of its own, so
  that the sentences before it cannot reach its keys through attention (what the engine reads
  now, within the row: ``routed.ApartKeys``). Besides AUC, the share of
  rephrases and of probes whose cosine reaches 0.25, about where the relation factor starts
  to fire.

Reported per reading: AUC and the share of probes above the cosine that keeps 90 % / 95 % of
rephrases (``question_keys.separation``). Results go to --out.
"""

from __future__ import annotations

import argparse
import json
import math
import re
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from question_keys import DATA, FILES, QUESTION_KEY, Discount, candidate_keys, pairs_of, separation

from app.models import load_model
from app.scen import negatives
from app.scen.adapters import adapter_for
from app.scen.prompts import Batch, encode, prompt_tokens, subject_positions
from app.scen.routed import KeyNorm, question_keys, question_span

LAYER = QUESTION_KEY[1]
REWORDING = 0.2  # the engine's rephrase_invariance
ENGINE_WORDINGS = Path(__file__).resolve().parents[1] / "app" / "scen" / "rephrasings.txt"


def layer_batches(lm, prompts: list[str], subjects: Sequence[str | None]) -> Iterator[tuple[Batch, torch.Tensor, list]]:
    """Per batch of 16 prompts: the batch, its raw layer-6 down-projection inputs (B, T, h), and
    per row (its tokens, its subject, its left padding)."""
    adapter = adapter_for(lm.model)
    down = adapter.get_down(adapter.layer_list(lm.model)[LAYER])
    seen: list[torch.Tensor] = []
    hook = down.register_forward_hook(lambda module, args, output: seen.append(args[0]))
    try:
        for start in range(0, len(prompts), 16):
            chunk, names = prompts[start : start + 16], subjects[start : start + 16]
            batch = encode(lm.tokenizer, chunk)
            seen.clear()
            lm.model(**batch.model_inputs(), use_cache=False)
            T = batch.input_ids.shape[1]
            tokens = [prompt_tokens(lm.tokenizer, p) for p in chunk]
            rows = [(t, subject, T - len(t.ids)) for t, subject in zip(tokens, names)]
            yield batch, seen[0], rows
    finally:
        hook.remove()


def token_keys(lm, prompts: list[str], subjects: Sequence[str | None]) -> list[tuple[list[int], torch.Tensor]]:
    """Per prompt: the ids and raw layer-6 down-projection inputs (n, h) of its text less its subject."""
    out = []
    for _, keys, rows in layer_batches(lm, prompts, subjects):
        for row, (tokens, subject, offset) in enumerate(rows):
            drop = set(subject_positions(tokens, subject)) if subject else set()
            kept = [i for i, c in enumerate(tokens.content) if c and i not in drop]
            out.append(([tokens.ids[i] for i in kept], keys[row, [offset + i for i in kept]].float()))
    return out


def fitted(pool: torch.Tensor, variation: torch.Tensor | None = None, weight: float = 0.0) -> KeyNorm:
    norm = KeyNorm(pool.shape[1])
    norm.fit(pool, shrinkage=0.1)
    if variation is not None:
        norm.discount(variation, weight)
    return norm


def rounded(result: dict) -> dict:
    return {k: round(v, 4) for k, v in result.items()}


def rarity(lm, pool_tokens: list[tuple[list[int], torch.Tensor]]) -> Callable[[list[int]], torch.Tensor]:
    """Token ids -> their idf over the ordinary prompts and the generic questions, one document each."""
    generic = [q for group in negatives.rephrasing_groups() for q in group]
    documents = [set(ids) for ids, _ in pool_tokens + token_keys(lm, [q for q, _ in generic], [e for _, e in generic])]
    frequency = Counter(t for d in documents for t in d)
    return lambda ids: torch.tensor([math.log((len(documents) + 1) / (frequency[t] + 1)) for t in ids])


def token_alignment(lm, rows, pool_tokens, idf) -> dict[str, dict]:
    norm = fitted(torch.cat([k for _, k in pool_tokens]))
    subjects = [s for *_, s in rows]
    prompt, rephrase, probe = (token_keys(lm, [r[i] for r in rows], subjects) for i in range(3))
    scores: dict[str, tuple[list[float], list[float]]] = {}
    for (a_ids, a), *others in zip(prompt, rephrase, probe):
        if not len(a) or any(not len(k) for _, k in others):
            continue
        a, wa = norm(a), idf(a_ids)
        for side, (b_ids, b) in enumerate(others):
            b, wb = norm(b), idf(b_ids)
            cos = a @ b.T
            recall, precision = cos.max(1).values, cos.max(0).values
            w_recall, w_precision = (recall * wa).sum() / wa.sum(), (precision * wb).sum() / wb.sum()
            values = {
                "recall": recall.mean(), "f": (recall.mean() + precision.mean()) / 2,
                "recall idf": w_recall, "f idf": (w_recall + w_precision) / 2,
                "idf-weighted mean": F.cosine_similarity((a * wa[:, None]).sum(0), (b * wb[:, None]).sum(0), dim=0),
            }
            for name, value in values.items():
                scores.setdefault(name, ([], []))[side].append(float(value))
    return {f"token alignment: {k}": rounded(separation(torch.tensor(n), torch.tensor(f)))
            for k, (n, f) in scores.items()}


ENTITIES_PER_RELATION = 6


def generic_keys(lm) -> torch.Tensor:
    """Raw question keys of every generic relation about ``ENTITIES_PER_RELATION`` entities,
    (relations * entities, h), one relation's rows together."""
    questions = negatives.generic_questions(ENTITIES_PER_RELATION)
    return candidate_keys(lm, [q for q, _ in questions], [e for _, e in questions], QUESTION_KEY)[QUESTION_KEY]


def entity_variation(generic: torch.Tensor) -> torch.Tensor:
    return torch.cat([k - k.mean(0) for k in generic.split(ENTITIES_PER_RELATION)])


def template_positives(lm, rows, norm: KeyNorm, wordings: list[list[str]], P, R, Q) -> dict[str, dict]:
    entity = "Globex Corporation"  # any fixed name: only the question is compared
    flat = [(g, t) for g, group in enumerate(wordings) for t in group]
    W = norm(candidate_keys(lm, [t.format(entity) for _, t in flat], [entity] * len(flat), QUESTION_KEY)[QUESTION_KEY])
    best, arg = (P @ W.T).max(1)
    subjects = [s for *_, s in rows]
    out = {}
    for tau in (0.5, 0.6, 0.7, 0.8):
        matched = (best >= tau).nonzero().flatten().tolist()
        asked = [(i, t.format(subjects[i])) for i in matched for t in wordings[flat[int(arg[i])][0]]]
        K = norm(candidate_keys(lm, [q for _, q in asked], [subjects[i] for i, _ in asked], QUESTION_KEY)[QUESTION_KEY])
        owner = torch.tensor([i for i, _ in asked])
        near = {"max": (P * R).sum(-1), "mean": (P * R).sum(-1)}
        far = {"max": (P * Q).sum(-1), "mean": (P * Q).sum(-1)}
        for i in matched:
            positives = torch.cat([P[i : i + 1], K[owner == i]])
            centre = F.normalize(positives.mean(0), dim=0)
            near["max"][i], far["max"][i] = (positives @ R[i]).max(), (positives @ Q[i]).max()
            near["mean"][i], far["mean"][i] = centre @ R[i], centre @ Q[i]
        for how in ("max", "mean"):
            out[f"template positives tau {tau} {how}"] = {
                "matched": round(len(matched) / len(rows), 4), **rounded(separation(near[how], far[how]))}
    return out


def relation_contrast(generic: torch.Tensor, norm: KeyNorm, P, R, Q) -> dict[str, dict]:
    G = F.normalize(norm(generic).view(-1, ENTITIES_PER_RELATION, generic.shape[-1]).mean(1), dim=-1)
    PG = P @ G.T
    out = {}
    for tau in (0.4, 0.5, 0.6):
        near_rival, far_rival = ((X @ G.T).masked_fill(PG >= tau, -1.0).max(-1).values for X in (R, Q))
        for lam in (0.5, 1.0, 1.5):
            out[f"contrast with generic relations tau {tau} lam {lam}"] = rounded(
                separation((P * R).sum(-1) - lam * near_rival, (P * Q).sum(-1) - lam * far_rival))
    nearest = PG.argmax(-1)
    out["nearest generic relation is the prompt's"] = {
        "rephrases": round(((R @ G.T).argmax(-1) == nearest).float().mean().item(), 4),
        "probes": round(((Q @ G.T).argmax(-1) == nearest).float().mean().item(), 4)}
    return out


def sentence_keys(lm, prompts: list[str], subjects: list[str | None]) -> torch.Tensor:
    """Raw question keys (n, h) from the sentence naming the subject (where it first occurs) on,
    less the subject, read in the context of the sentences before it."""
    out = []
    for batch, keys, rows in layer_batches(lm, prompts, subjects):
        ats, lengths, named = [], [], torch.zeros_like(batch.content)
        for row, (tokens, subject, offset) in enumerate(rows):
            span = subject_positions(tokens, subject) if subject else []
            run = 1
            while span and run < len(span) and span[run] == span[0] + run:
                run += 1
            ats.append(offset + (span[0] + run - 1 if span else len(tokens.ids) - 1))
            lengths.append(run if span else 0)
            named[row, [offset + i for i in span]] = True
        keep = question_span(batch.content, torch.tensor(ats), torch.tensor(lengths), batch.sentence) & ~named
        out.append(question_keys(keys, keep))
    return torch.cat(out)


def from_subjects_sentence(lm, prompt: str, subject: str | None) -> str:
    """``prompt`` from the sentence its subject first occurs in (by the engine's openings); the
    whole prompt where that sentence holds nothing but the subject, as the engine reads it."""
    tokens = prompt_tokens(lm.tokenizer, prompt)
    span = subject_positions(tokens, subject) if subject else []
    opening = max((i for i in range(span[0] + 1) if tokens.opens[i]), default=None) if span else None
    if opening is None:
        return prompt
    cut = prompt[tokens.spans[opening][0]:].lstrip()
    return cut if re.search(r"\w", cut.replace(subject or "", "", 1)) else prompt


def subjects_sentence(lm, rows, norm: KeyNorm, P, R, Q) -> dict[str, dict]:
    subjects = [s for *_, s in rows]
    P2, R2, Q2 = (norm(sentence_keys(lm, [r[i] for r in rows], subjects)) for i in range(3))
    P3, R3, Q3 = (norm(candidate_keys(lm, [from_subjects_sentence(lm, r[i], r[3]) for r in rows], subjects,
                                      QUESTION_KEY)[QUESTION_KEY]) for i in range(3))
    prefixed = torch.tensor([bool(re.search(r"[.!?]\s", r[1][: max(0, r[1].find(r[3] or ""))])) for r in rows])
    out = {}
    for name, (p, r, q) in (("whole text", (P, R, Q)), ("the subject's sentence", (P2, R2, Q2)),
                            ("the subject's sentence read alone", (P3, R3, Q3))):
        for part, rows_in in (("all", torch.ones_like(prefixed)), ("rephrase after another sentence", prefixed)):
            if not rows_in.any():
                continue
            near, far = (p * r).sum(-1)[rows_in], (p * q).sum(-1)[rows_in]
            out[f"{name}, {part}"] = {"pairs": int(rows_in.sum()), **rounded(separation(near, far)),
                                      "rephrases_at_0.25": round((near >= 0.25).float().mean().item(), 4),
                                      "probes_at_0.25": round((far >= 0.25).float().mean().item(), 4)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=300)
    parser.add_argument("--wordings", type=Path, default=ENGINE_WORDINGS, help="wording groups for template positives")
    parser.add_argument("--only-sentence", action="store_true", help="measure the subject's sentence alone")
    parser.add_argument("--out", type=Path, default=Path("bench/results/question_key_variants.json"))
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    lm = load_model()
    wordings = [list(g) for g in negatives.split_blocks(args.wordings.read_text(encoding="utf-8"))]
    rewording = Discount().variation(lm)
    generic = None if args.only_sentence else generic_keys(lm)
    entity = None if generic is None else entity_variation(generic)

    prompts = negatives.pool_prompts()
    pool = candidate_keys(lm, prompts, [None] * len(prompts), QUESTION_KEY)[QUESTION_KEY]
    engine = fitted(pool, rewording, REWORDING)
    pool_tokens = [] if args.only_sentence else token_keys(lm, prompts, [None] * len(prompts))
    idf = None if args.only_sentence else rarity(lm, pool_tokens)
    results = {}
    for name in FILES:
        rows = pairs_of(DATA / name, args.records)
        subjects = [s for *_, s in rows]
        raw = [candidate_keys(lm, [r[i] for r in rows], subjects, QUESTION_KEY)[QUESTION_KEY] for i in range(3)]
        P, R, Q = (engine(k) for k in raw)
        found = {"engine's question key": rounded(separation((P * R).sum(-1), (P * Q).sum(-1)))}
        if generic is not None and entity is not None and idf is not None:
            for scale in (0.5, 1.0, 2.0):
                for weight in (0.2, 0.35, 0.5):
                    norm = fitted(pool, torch.cat([rewording, entity * scale]), weight)
                    p, r, q = (norm(k) for k in raw)
                    found[f"entity discount x{scale}, weight {weight}"] = rounded(
                        separation((p * r).sum(-1), (p * q).sum(-1)))
            found |= token_alignment(lm, rows, pool_tokens, idf)
            found |= template_positives(lm, rows, engine, wordings, P, R, Q)
            found |= relation_contrast(generic, engine, P, R, Q)
        found |= subjects_sentence(lm, rows, engine, P, R, Q)
        results[name] = found
        print(name)
        for reading, r in found.items():
            print(f"  {reading:45s} " + "  ".join(f"{k} {v:.3f}" for k, v in r.items() if k != "pairs"))
    settings = {"records": args.records, "wordings": str(args.wordings)}
    args.out.write_text(json.dumps({**settings, "results": results}, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
