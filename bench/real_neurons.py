"""Indexing neurons in number, built from real keys of the bundled SmolLM2: what bench/routing.py
describes under "The neurons", shared with the benchmarks that need many live edits
(bench/throughput.py, bench/edit_cost.py).

The keys are recorded once (a few minutes on 2 CPU cores) and cached in ``SCEN_CACHE_DIR``
(default ~/.cache/scen) under bench-routing/.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from app.scen.config import ScenConfig
from app.scen.experts import Expert
from app.scen.routed import KeyNorm, Neuron, Router
from app.scen.router_index import IndexSettings
from app.scen.training import TrainedEdit, neuron_loss

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
ENTITIES = Path(__file__).resolve().parents[1] / "app" / "scen" / "entities.txt"
N_EDIT_CF = 1700
NAMES_PER_PROMPT = 24


# ---- phase 1: real keys from the bundled model (cached) ---------------------------------------


def cache_dir() -> Path:
    root = os.environ.get("SCEN_CACHE_DIR") or os.path.expanduser("~/.cache/scen")
    return Path(root) / "bench-routing"


def corpus() -> dict:
    zsre = json.loads((DATA / "zsre_mend_train_1k.json").read_text())
    cf = json.loads((DATA / "counterfact_dev_2k.json").read_text())
    edits = [(r["src"], r["subject"]) for r in zsre] + [(r["prompt"], r["subject"]) for r in cf[:N_EDIT_CF]]
    rephrases = [(r["rephrase"], r["subject"], i) for i, r in enumerate(zsre)]
    rephrases += [(r["rephrase_prompt"], r["subject"], len(zsre) + i) for i, r in enumerate(cf[:N_EDIT_CF])]
    rng = random.Random(0)
    rephrases = [p for p in rephrases if p[1].casefold() in p[0].casefold()]
    probes = [(p, "rephrase") for p, _, _ in rng.sample(rephrases, 300)]
    probes += [(r["prompt"], "unedited subject") for r in cf[N_EDIT_CF:]]
    probes += [(r["locality_prompt"], "neighbourhood") for r in rng.sample(cf[:N_EDIT_CF], 200)]
    people = [line.strip() for line in ENTITIES.read_text().splitlines() if line.strip()]
    names = {r["subject"] for r in zsre} | {a for r in zsre for a in r["answers"]} | {r["alt"] for r in zsre}
    names |= {r["subject"] for r in cf} | {r["target_new"] for r in cf} | {r["ground_truth"] for r in cf}
    names |= set(people)
    firsts = sorted({p.split()[0] for p in people if " " in p})
    lasts = sorted({p.split()[-1] for p in people if " " in p})
    names |= {f"{a} {b}" for a in firsts for b in lasts}
    names = sorted(n for n in names if n and "," not in n and len(n) < 60)
    rng.shuffle(names)
    return {"edits": edits, "probes": probes, "names": names}


@torch.no_grad()
def record_keys(path: Path) -> dict:
    """Run the bundled model up to the subject layer over the corpus; save what the bench reads."""
    from app.models import load_model
    from app.scen import Editor
    from app.scen.layers import record
    from app.scen.prompts import encode, prompt_tokens, subject_positions

    lm = load_model()
    editor = Editor(lm.model, lm.tokenizer, ScenConfig(), cache_dir=cache_dir().parent)
    tok = lm.tokenizer
    taps = [editor._subject_down, editor._relation_down]
    stop = editor.layers[editor.subject_layer]

    def run(prompts: list[str]):
        for i in range(0, len(prompts), 16):
            chunk = prompts[i : i + 16]
            batch = encode(tok, chunk)
            with editor.routed.bypassed():
                _, [(s, _), (r, _)] = record(editor.model, stop, taps, batch.model_inputs())
            for j, p in enumerate(chunk):
                n = int(batch.attention_mask[j].sum())
                yield p, s[j, -n:], r[j, -n:], batch.content[j, -n:]
            print(f"  {i + len(chunk)}/{len(prompts)}", flush=True)

    c = corpus()
    out: dict = {"subject_norm": editor.routed.router.subject_norm.state_dict(),
                 "relation_norm": editor.routed.router.relation_norm.state_dict(),
                 "pool_subject": editor._pool.subject.clone()}
    # Edits: the subject key at the subject's last token; the question key (text less the subject).
    subject, question, length = [], [], []
    for (prompt, name), (_, s, r, content) in zip(c["edits"], run([p for p, _ in c["edits"]])):
        tokens = prompt_tokens(tok, prompt)
        span = subject_positions(tokens, name) or [len(tokens.ids) - 1]
        end = span[-1]
        run_len = 1
        while end - run_len in span:
            run_len += 1
        keep = content.clone()
        keep[end - run_len + 1 : end + 1] = False
        subject.append(s[end])
        question.append(r[keep].mean(0) if keep.any() else r[content].mean(0))
        length.append(run_len)
    out |= {"edit_subject": torch.stack(subject), "edit_question": torch.stack(question),
            "edit_len": torch.tensor(length)}
    # Probes: every position, as routing reads them (half precision to keep the cache small).
    out["probes"] = [{"prompt": p, "kind": kind, "subject": s.half(), "relation": r.half(), "content": ct}
                     for (p, kind), (_, s, r, ct) in zip(c["probes"], run([p for p, _ in c["probes"]]))]
    # Names, several to a prompt: the key at each name's last token.
    lists, name_keys, text_keys = [], [], []
    names = c["names"]
    for i in range(0, len(names), NAMES_PER_PROMPT):
        lists.append(names[i : i + NAMES_PER_PROMPT])
    for group, (prompt, s, _, content) in zip(lists, run(["Names: " + ", ".join(g) + "." for g in lists])):
        tokens = prompt_tokens(tok, prompt)
        for name in group:
            span = subject_positions(tokens, name)
            if span:
                name_keys.append(s[span[-1]])
        text_keys.append(s[content][::3])
    out["name_subject"] = torch.stack(name_keys)
    out["text_subject"] = torch.cat(text_keys)
    out["names"] = len(names)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(out, path)
    return out


# ---- phase 2: neurons ------------------------------------------------------------------------


def load_keys() -> dict:
    """The recorded keys, recorded now if they are not cached yet."""
    path = cache_dir() / "keys-v1.pt"
    return torch.load(path) if path.exists() else record_keys(path)


def key_norms(keys: dict) -> tuple[KeyNorm, KeyNorm]:
    """The subject and relation normalisations the keys were recorded with (the engine's)."""
    h_s, h = keys["edit_subject"].shape[1], keys["edit_question"].shape[1]
    s_norm, r_norm = KeyNorm(h_s), KeyNorm(h)
    s_norm.load_state_dict(keys["subject_norm"])
    r_norm.load_state_dict(keys["relation_norm"])
    return s_norm, r_norm


def raw_keys(unit: torch.Tensor, norm: KeyNorm) -> torch.Tensor:
    """Raw keys (N, h) that ``norm`` maps to the unit keys ``unit`` (N, h).

    A neuron built from normalised keys (a near duplicate, say) has no recorded raw key, but
    the engine keeps raw keys for each live edit and normalises them when it trains the next:
    whitening is invertible and unit length forgets the scale, so this is such a key.
    """
    return torch.linalg.solve(norm.matrix().double().T, unit.double().T).T.float() + norm.center


def train_subject_factors(pos: torch.Tensor, neg: torch.Tensor, cfg: ScenConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """``train_neuron`` for every row of ``pos`` (E, h) at once against the shared ``neg`` (N, h)."""
    w = (pos * cfg.neuron_init_scale).clone().requires_grad_(True)
    b = torch.full((len(pos),), cfg.neuron_init_bias, requires_grad=True)
    opt = torch.optim.Adam([w, b], lr=cfg.neuron_lr)
    loss_of = torch.func.vmap(lambda ap, an: neuron_loss(ap, an, cfg))
    with torch.enable_grad():
        for _ in range(cfg.neuron_steps):
            a_pos = torch.sigmoid((pos * w).sum(-1) + b)[:, None]  # (E, 1)
            a_neg = torch.sigmoid(w @ neg.T + b[:, None])  # (E, N)
            loss = loss_of(a_pos, a_neg).sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return w.detach(), b.detach()


def trained_subject_factors(pos: torch.Tensor, neg: torch.Tensor, cfg: ScenConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """``train_subject_factors``, cached next to the keys: the same keys and settings train the
    same factors, and training them is most of the cost of building many neurons (about 40 s on
    2 CPU cores)."""
    digest = hashlib.sha256()
    for t in (pos, neg):
        digest.update(t.contiguous().numpy().tobytes())
    digest.update(repr(cfg).encode())
    path = cache_dir() / f"subject-factors-{digest.hexdigest()[:16]}.pt"
    if path.exists():
        cached = torch.load(path)
        return cached["w"], cached["b"]
    start = time.perf_counter()
    w, b = train_subject_factors(pos, neg, cfg)
    print(f"trained {len(pos)} subject factors in {time.perf_counter() - start:.1f}s", flush=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"w": w, "b": b}, path)
    return w, b


def make_neurons(keys: dict, n: int, cfg: ScenConfig, s_norm: KeyNorm, r_norm: KeyNorm) -> dict:
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        u_edit = s_norm(keys["edit_subject"])
        q_edit = r_norm(keys["edit_question"])
        u_name = s_norm(keys["name_subject"])
        u_text = s_norm(keys["text_subject"])
        others = u_name[torch.randperm(len(u_name), generator=g)[:500]]
        neg = torch.cat([s_norm(keys["pool_subject"]), others])
    w_edit, b_edit = trained_subject_factors(u_edit, neg, cfg)
    delta = w_edit - cfg.neuron_init_scale * u_edit
    E = len(u_edit)
    order = torch.randperm(E, generator=g)
    rows_u = [u_edit[order]]
    kinds = ["edit"] * E
    need = max(0, n - E)
    names = u_name[: min(need, len(u_name))]
    rows_u.append(names)
    kinds += ["name"] * len(names)
    need -= len(names)
    if need > 0:
        base = torch.randint(len(u_name), (need,), generator=g)
        noise = u_text[torch.randint(len(u_text), (need,), generator=g)]
        rows_u.append(F.normalize(u_name[base] + 0.35 * noise, dim=-1))
        kinds += ["near duplicate"] * need
    u = torch.cat(rows_u)[:n]
    donor = torch.cat([order, torch.arange(n - E) % E]) if n > E else order[:n]
    w = cfg.neuron_init_scale * u + delta[donor]
    w[:E] = w_edit[order][: min(n, E)]
    b = b_edit[donor]
    return {"w": w, "b": b, "r": cfg.neuron_init_scale * q_edit[donor],
            "rb": torch.full((n,), cfg.relation_init_bias), "len": keys["edit_len"][donor],
            "kinds": kinds[:n], "trained_bias_mean": float(b_edit.mean()),
            "trained_change_norm": float(delta.norm(dim=-1).mean()),
            "subject_unit": u, "donor": donor}


def router_with(neurons: dict, n: int, cfg: ScenConfig, s_norm: KeyNorm, r_norm: KeyNorm,
                index: IndexSettings | None) -> Router:
    h_s, h = neurons["w"].shape[1], neurons["r"].shape[1]
    router = Router(h_s, h, cfg.theta, subject_margin=cfg.subject_margin, relation_margin=cfg.relation_margin,
                    subject_span_cos=cfg.subject_span_cos, index=index)
    router.subject_norm, router.relation_norm = s_norm, r_norm
    for i in range(n):
        router.append(Neuron(neurons["w"][i], neurons["b"][i], neurons["r"][i], neurons["rb"][i],
                             neurons["len"][i], neurons["subject_unit"][i]))
    return router


def twins(neurons: dict, edits: Sequence[int]) -> set[int]:
    """Rows of ``neurons`` that are the edit neurons of the given rows of ``corpus()["edits"]``
    (to train those edits for real without a synthetic twin already live)."""
    wanted = set(edits)
    return {i for i, (kind, donor) in enumerate(zip(neurons["kinds"], neurons["donor"].tolist()))
            if kind == "edit" and donor in wanted}


def live_edits(neurons: dict, keys: dict, s_norm: KeyNorm, layer: int, rows: Sequence[int],
               expert: Callable[[int], Expert]) -> list[TrainedEdit]:
    """The neurons of ``rows`` as live edits' records: each owns its neuron, one raw subject key
    and one raw question key (an edit posted without rephrases keeps one of each), and the
    expert ``expert(row)``."""
    at = torch.tensor(list(rows), dtype=torch.long)
    subject = raw_keys(neurons["subject_unit"][at], s_norm)
    question = keys["edit_question"][neurons["donor"][at]]
    edits = []
    for j, i in enumerate(at.tolist()):
        neuron = Neuron(neurons["w"][i].clone(), neurons["b"][i].clone(), neurons["r"][i].clone(),
                        neurons["rb"][i].clone(), neurons["len"][i].clone(), torch.zeros_like(neurons["w"][i]))
        edits.append(TrainedEdit(f"synthetic edit {i}", "", (), layer, expert(i), neuron,
                                 question[j : j + 1].clone(), subject[j : j + 1].clone(), None, {}))
    return edits


def run_facts(doc: str | None, load_average: tuple[float, float, float]) -> dict:
    """What every many-edit result records besides its rows: the script's purpose, and which code
    ran where (the package path shows a checkout other than this one's)."""
    import platform

    import app

    paragraphs = (doc or "").split("\n\n")
    return {
        "what": paragraphs[0].replace("\n", " "),
        "how": " ".join(" ".join(p.split()) for p in paragraphs[3:]),
        "package": str(Path(app.__file__).parent),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "load_average_at_start": load_average,
    }


def write_result(out: str | Path, result: dict, plot: Callable[[list[dict], Path], None]) -> None:
    """The result as JSON (replacing the partial rows kept while measuring) and its plot beside it."""
    out_path = Path(out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(result, indent=1) + "\n")
    out_path.with_suffix(".partial.json").unlink(missing_ok=True)
    plot(result["rows"], out_path.with_suffix(".png"))
    print(f"wrote {out_path}")
