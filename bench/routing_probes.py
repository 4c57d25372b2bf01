"""Routing-only experiment: neurons trained sequentially (experts skipped), routed rates measured."""
import json, random, re, sys, time
import torch
from app.models import load_model
from app.scen import Editor, ScenConfig
from app.eval.datasets import load_dataset

def words(text, subject):
    return set(re.findall(r"\w+", re.sub(re.escape(subject), " ", text, flags=re.I).lower()))

def probes(records, held, rng):
    other_subj, same_subj = [], []
    for i, r in enumerate(records):
        o = rng.choice(held)
        pat = re.compile(re.escape(r.subject), re.I)
        if pat.search(r.prompt) and o.subject.lower() != r.subject.lower():
            other_subj.append((i, pat.sub(lambda _: o.subject, r.prompt)))
        for _ in range(20):
            o = rng.choice(held + records)
            a, b = words(r.prompt, r.subject), words(o.prompt, o.subject)
            if len(a & b) / max(1, len(a | b)) < 0.3:
                break
        pat2 = re.compile(re.escape(o.subject), re.I)
        if pat2.search(o.prompt) and o.subject.lower() != r.subject.lower():
            same_subj.append((i, pat2.sub(lambda _: r.subject, o.prompt)))
    return other_subj, same_subj

def main(n, overrides, use_subject=True):
    lm = load_model()
    cfg = ScenConfig.from_overrides(overrides + ["expert_max_steps=0"])
    out = {}
    for path in ["/work/shared/data/zsre_mend_train_1k.json", "/work/shared/data/counterfact_dev_2k.json"]:
        ds = load_dataset(path)
        recs = [r for r in ds.records if r.editable and r.subject]
        random.Random(0).shuffle(recs)
        held = recs[n:n + 300]
        recs = recs[:n]
        ed = Editor(lm.model, lm.tokenizer, cfg, cache_dir="/root/.cache/scen/pool-keys")
        t = time.time()
        for i, r in enumerate(recs):
            ed.add(f"e{i}", ed.train(r.prompt, r.target, subject=r.subject if use_subject else None))
        secs = (time.time() - t) / n
        th = cfg.theta
        def routed(prompts):
            a = ed.activations(prompts)
            above = a > th
            newest = torch.where(above, torch.arange(a.shape[1]), -1).amax(-1)
            return newest
        rel = routed([r.prompt for r in recs])
        reph = [(i, p) for i, r in enumerate(recs) for p in r.rephrases]
        rr = routed([p for _, p in reph])
        loc = [(i, p) for i, r in enumerate(recs) for p, _ in r.locality]
        lr = routed([p for _, p in loc])
        os_, ss_ = probes(recs, held, random.Random(1))
        osr = routed([p for _, p in os_]); ssr = routed([p for _, p in ss_])
        res = {
            "rel_own": (rel == torch.arange(n)).float().mean().item(),
            "reph_own": sum(int(x) == i for (i, _), x in zip(reph, rr.tolist())) / len(reph),
            "loc_routed": (lr >= 0).float().mean().item(),
            "probe_other_subject_routed": (osr >= 0).float().mean().item(),
            "probe_same_subject_routed": (ssr >= 0).float().mean().item(),
            "train_s_per_edit_no_expert": secs,
        }
        out[path.split("/")[-1]] = res
        ed.detach()
        print(path.split("/")[-1], {k: round(v, 3) for k, v in res.items()}, flush=True)
    return out

if __name__ == "__main__":
    n = int(sys.argv[1]); tag = sys.argv[2]; ov = sys.argv[3:]
    use_subject = "nosubject" not in tag
    res = main(n, ov, use_subject)
    json.dump({"n": n, "overrides": ov, "results": res}, open(f"/work/runs/exp/{tag}.json", "w"), indent=1)
