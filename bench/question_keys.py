"""Which key tells a paraphrase of a question from another question about the same subject?

    .venv/bin/python bench/question_keys.py [--records 200]
    .venv/bin/python bench/question_keys.py --discount-only --rephrasings FILE [--per-group 3] [--weights 0.2]

For the first N records of each development file that have a rephrase and a
same-subject probe (``app.eval.neighbours``), every candidate key of the edit prompt
is compared (cosine after the router's whitening, fitted on the ordinary prompts'
keys of the same kind) with the key of its rephrase (should be near) and of another
question about the same subject (should be far). Candidates: the down projection's
input or the residual stream, at several layers, read at the last prompt token,
averaged over the user's text, or averaged over the user's text less the subject.

Reported per candidate: AUC (a rephrase nearer than a probe, over all pairs) and the
share of probes above the cosine that keeps 90 % / 95 % of rephrases. The last layers read at
the last token stand for what the model is about to answer (a rephrase should be answered
alike, another question differently); each is also combined with the best single key, as the
sum of the two cosines (each standardised on the rephrases) and as either one passing. The
question key is also read at several layers at once (the mean of their cosines). The
engine's question key is also read with rewording discounted (``rephrase_invariance``, learnt
from ``app/scen/rephrasings.txt``) at weights 0.2, 0.5 and 0.9. Results go to
bench/results/question_keys.json.

``--discount-only`` reads only the engine's question key, plain and discounted, to compare
wording data (``--rephrasings``, a file in the form of ``app/scen/rephrasings.txt``) or the
number of entities each wording group is asked about (``--per-group``); its results go to
``--out``.
"""

from __future__ import annotations

import argparse
import functools
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from app.eval.datasets import load_dataset
from app.eval.neighbours import build_probes
from app.eval.selection import edit_id
from app.models import load_model
from app.scen import negatives
from app.scen.adapters import adapter_for
from app.scen.prompts import encode, prompt_tokens, subject_positions
from app.scen.routed import KeyNorm, question_keys

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
FILES = ["zsre_mend_train_1k.json", "counterfact_dev_2k.json"]
LAYERS = [4, 6, 8, 10, 14, 18, 22, 25, 27, 29]
READS = ("last", "text", "text_less_subject")
QUESTION_KEY = ("down_input", 6, "text_less_subject")  # the engine's relation key


@torch.no_grad()
def candidate_keys(lm, prompts: list[str], subjects: list[str | None],
                   only: tuple[str, int, str] | None = None) -> dict[tuple[str, int, str], torch.Tensor]:
    """(site, layer, read) -> raw keys (n, h) of ``prompts``; with ``only``, that key alone."""
    adapter = adapter_for(lm.model)
    layers = adapter.layer_list(lm.model)
    read_at = [only[1]] if only else LAYERS
    out: dict[tuple[str, int, str], list[torch.Tensor]] = {}
    for start in range(0, len(prompts), 16):
        chunk, names = prompts[start : start + 16], subjects[start : start + 16]
        batch = encode(lm.tokenizer, chunk)
        seen: dict[int, torch.Tensor] = {}
        hooks = [adapter.get_down(layers[i]).register_forward_hook(_keep(seen, i)) for i in read_at]
        try:
            hidden = lm.model(**batch.model_inputs(), output_hidden_states=not only, use_cache=False).hidden_states
        finally:
            for h in hooks:
                h.remove()
        T = batch.input_ids.shape[1]
        less = batch.content.clone()
        for row, (prompt, subject) in enumerate(zip(chunk, names)):
            tokens = prompt_tokens(lm.tokenizer, prompt)
            for i in subject_positions(tokens, subject) if subject else []:
                less[row, T - len(tokens.ids) + i] = False
        sites = {"down_input": seen, "residual": {i: hidden[i + 1] for i in read_at} if hidden else {}}
        for site, keys in sites.items():
            for layer in read_at:
                if only and (site, layer) != only[:2]:
                    continue
                x = keys[layer]
                masks = {"text": batch.content, "text_less_subject": less}
                for read in READS:
                    if not only or read == only[2]:
                        value = x[:, -1] if read == "last" else question_keys(x, masks[read])
                        out.setdefault((site, layer, read), []).append(value)
    return {k: torch.cat(v) for k, v in out.items()}


def _keep(seen: dict[int, torch.Tensor], layer: int):
    def hook(module, args, output) -> None:
        seen[layer] = args[0]

    return hook


def pairs_of(path: Path, n: int) -> list[tuple[str, str, str, str | None]]:
    """(prompt, rephrase, same-subject probe, subject) of the first ``n`` records with a rephrase and a probe."""
    records = [r for r in load_dataset(path).records if r.editable and r.rephrases and r.subject]
    edited, others = records[:n], records[n:]
    same = dict(build_probes(edited, others, seed=0).same_subject)
    return [(r.prompt, r.rephrases[0], same[edit_id(r)], r.subject) for r in edited if edit_id(r) in same]


def compare(lm, path: Path, n: int, discount: Discount) -> list[dict]:
    rows = pairs_of(path, n)
    subjects = [s for *_, s in rows]
    pool_prompts = negatives.pool_prompts()
    only = QUESTION_KEY if discount.only else None
    pool = candidate_keys(lm, pool_prompts, [None] * len(pool_prompts), only)
    prompt, rephrase, probe = (candidate_keys(lm, [r[i] for r in rows], subjects, only) for i in range(3))
    pairs: dict[tuple[str, int, str], tuple[torch.Tensor, torch.Tensor]] = {}
    for key in prompt:
        norm = KeyNorm(pool[key].shape[1])
        norm.fit(pool[key], shrinkage=0.1)
        a = norm(prompt[key])
        pairs[key] = (a * norm(rephrase[key])).sum(-1), (a * norm(probe[key])).sum(-1)
    results = sorted(({"site": k[0], "layer": k[1], "read": k[2], "pairs": len(rows), **separation(*v)}
                      for k, v in pairs.items()), key=lambda r: -r["auc"])
    results += discounted(lm, pool, prompt, rephrase, probe, len(rows), discount)
    if discount.only:
        return results
    results += across_layers(pairs, len(rows))
    best = results[0]
    near, far = pairs[best["site"], best["layer"], best["read"]]
    for key in pairs:
        if key[2] != "last" or key[1] < 22:
            continue
        other_near, other_far = pairs[key]
        (zn, zf), (on, of) = standardised(near, far), standardised(other_near, other_far)
        for how, combined in (("sum", (zn + on, zf + of)), ("either", (torch.maximum(zn, on), torch.maximum(zf, of)))):
            results.append({"site": f"{best['site']} L{best['layer']} {best['read']} {how}", "layer": key[1],
                            "read": f"{key[0]} last", "pairs": len(rows), **separation(*combined)})
    return results


def across_layers(pairs: dict[tuple[str, int, str], tuple[torch.Tensor, torch.Tensor]], n: int) -> list[dict]:
    """The question key read at several layers at once: the mean of their cosines, which is the
    cosine of the layers' normalised keys side by side."""
    out = []
    for layers in ((4, 6), (6, 8), (4, 6, 8), (4, 6, 8, 10)):
        near, far = (torch.stack([pairs["down_input", layer, "text_less_subject"][i] for layer in layers]).mean(0)
                     for i in (0, 1))
        out.append({"site": "down_input layers " + "+".join(map(str, layers)), "layer": layers[-1],
                    "read": "text_less_subject", "pairs": n, **separation(near, far)})
    return out


@dataclass
class Discount:
    """Which wording data the discount learns from, and at which weights it is read."""

    wordings: tuple[tuple[str, ...], ...] | None = None  # None: app/scen/rephrasings.txt
    per_group: int = 3
    weights: tuple[float, ...] = (0.2, 0.5, 0.9)
    only: bool = False
    _variation: torch.Tensor | None = field(default=None, repr=False)

    @functools.cached_property
    def groups(self) -> list[list[tuple[str, str]]]:
        return negatives.rephrasing_groups(self.per_group, self.wordings)

    def variation(self, lm) -> torch.Tensor:
        """Each wording's question key less its group's mean, as the engine learns the discount."""
        if self._variation is None:
            flat = [q for group in self.groups for q in group]
            reworded = candidate_keys(lm, [q for q, _ in flat], [e for _, e in flat], QUESTION_KEY)[QUESTION_KEY]
            self._variation = torch.cat([k - k.mean(0) for k in reworded.split([len(g) for g in self.groups])])
        return self._variation


def discounted(lm, pool, prompt, rephrase, probe, n: int, discount: Discount) -> list[dict]:
    """The engine's question key with rewording discounted (``KeyNorm.discount``, the setting
    ``rephrase_invariance``) at a few weights."""
    variation = discount.variation(lm)
    out = []
    for weight in discount.weights:
        norm = KeyNorm(pool[QUESTION_KEY].shape[1])
        norm.fit(pool[QUESTION_KEY], shrinkage=0.1)
        norm.discount(variation, weight)
        a = norm(prompt[QUESTION_KEY])
        near, far = (a * norm(rephrase[QUESTION_KEY])).sum(-1), (a * norm(probe[QUESTION_KEY])).sum(-1)
        out.append({"site": f"down_input rewording discounted w={weight}", "layer": 6, "read": "text_less_subject",
                    "pairs": n, **separation(near, far)})
    return out


def separation(near: torch.Tensor, far: torch.Tensor) -> dict:
    """How well cosines to rephrases (``near``) stand above those to probes (``far``)."""
    return {
        "auc": (near[:, None] > far[None, :]).float().mean().item(),
        "probes_above_tpr90": (far >= near.quantile(0.10)).float().mean().item(),
        "probes_above_tpr95": (far >= near.quantile(0.05)).float().mean().item(),
        "rephrase_cos": near.mean().item(), "probe_cos": far.mean().item(),
    }


def standardised(near: torch.Tensor, far: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return (near - near.mean()) / near.std(), (far - near.mean()) / near.std()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=200)
    parser.add_argument("--discount-only", action="store_true", help="read only the engine's question key")
    parser.add_argument("--rephrasings", type=Path, help="wording groups to learn the discount from")
    parser.add_argument("--per-group", type=int, default=3, help="entities each wording group is asked about")
    parser.add_argument("--weights", default="0.2,0.5,0.9", help="discount weights, comma-separated")
    parser.add_argument("--out", type=Path, default=Path("bench/results/question_keys.json"))
    args = parser.parse_args()
    discount = Discount(
        negatives.split_blocks(args.rephrasings.read_text(encoding="utf-8")) if args.rephrasings else None,
        args.per_group, tuple(float(w) for w in args.weights.split(",")), args.discount_only,
    )
    lm = load_model()
    results = {name: compare(lm, DATA / name, args.records, discount) for name in FILES}
    for name, rows in results.items():
        print(name)
        shown = rows if args.discount_only else [*rows[:8], *(
            r for r in rows if r["site"].endswith(("sum", "either")) or "discounted" in r["site"]
            or "layers" in r["site"])]
        for r in shown:
            print(f"  {r['site']:10s} L{r['layer']:<2d} {r['read']:17s} auc {r['auc']:.3f} "
                  f"probes above tpr90 {r['probes_above_tpr90']:.2f} tpr95 {r['probes_above_tpr95']:.2f}")
    settings = {"records": args.records, "rephrasings": str(args.rephrasings or "app/scen/rephrasings.txt"),
                "wording_groups": len(discount.groups), "per_group": args.per_group}
    args.out.write_text(json.dumps({**settings, "results": results}, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
