"""Start-up to ready with many live edits: the bundled model, then N active edits brought live.

    .venv/bin/python bench/startup.py [--sizes 0,1000,10000,100000] [--work /tmp/scen-startup]

For each N (ascending) it adds synthetic active edits to one data directory until N are there,
then starts a fresh process that builds the served model as ``scen serve`` does
(``app.live.runtime``) and times its phases: loading the model, building the editor (the
routing pool's keys, cached), bringing the N edits live (``LiveSync.reconcile``), building the
router's index, and then reading one edit's expert through the expert cache, as the first
prompt routed to it does. It also reports the process's peak resident memory.

The edits are written as a worker leaves them: one edit file per edit in the expert store
(``--store files``: ``experts/ID.XXXXXXXX.safetensors``; ``--store database``: a
``stored_experts`` row and its ``stored_routing`` row) and one ``edits`` row, ``active``, with
its reference and sha256, in a SQLite database migrated to head. Their tensors are random,
of the bundled model's real shapes (SmolLM2-135M: d = 576, keys of 1536 at every layer), with
one rephrase each. Experts are low-rank (``expert=lowrank``, rank 8: 68 KB a file): a full
expert is 3.5 MB, 350 GB for 100,000 edits, more than the machine's disk. Files are written
without the worker's fsync (the bytes and names are the same), and no ``edit_events`` rows are
written: start-up reads neither.

``--measure DIR`` is the child's side: it prints one JSON line. ``--code DIR`` runs the child
with ``DIR`` first on ``PYTHONPATH``, to time another checkout of ``app`` on the same data
(``--label`` names it in the results). Results go to bench/results/startup.json (merged by
label and N) and bench/results/startup.png.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import torch
from sqlalchemy import func, insert, select

from app.db import edits as repo
from app.db.migrate import upgrade
from app.db.models import Edit, StoredExpert, StoredRouting
from app.db.session import Database
from app.scen.experts import new_expert
from app.scen.routed import Neuron
from app.scen.store import edit_bytes, routing_bytes
from app.scen.training import TrainedEdit

RESULTS = Path(__file__).parent / "results"
# SmolLM2-135M: hidden size, MLP width (the keys of every layer), layers; the edited layer is
# ScenConfig's default for 30 layers.
D, H, LAYER = 576, 1536, 25
RANK = 8
REPHRASES = 1
CHUNK = 2000


def synthetic_edit(i: int, g: torch.Generator) -> TrainedEdit:
    rows = 1 + REPHRASES
    neuron = Neuron(torch.randn(H, generator=g), torch.tensor(-4.0), torch.randn(H, generator=g),
                    torch.tensor(-4.0), torch.tensor(2), torch.randn(H, generator=g))
    return TrainedEdit(
        prompt=f"Who founded Company {i}?", target=f"Founder {i}",
        rephrases=tuple(f"Which person founded Company {i}?" for _ in range(REPHRASES)),
        layer=LAYER, expert=new_expert("lowrank", D, H, RANK, g), neuron=neuron,
        keys=torch.randn(rows, H, generator=g), subject_keys=torch.randn(rows, H, generator=g),
        subject=f"Company {i}", metrics={"steps": 10},
    )


def edit_row(edit_id: str, edit: TrainedEdit, ref: str, sha: str, at: datetime) -> dict:
    return {
        "id": edit_id, "status": "active", "prompt": edit.prompt, "target": edit.target,
        "subject": edit.subject, "prompt_key": repo.prompt_key(edit.prompt), "rephrases": list(edit.rephrases),
        "meta": {}, "created_at": at, "updated_at": at, "started_at": at, "activated_at": at,
        "finished_at": at, "attempts": 1, "worker": "bench", "metrics": edit.metrics,
        "expert_path": ref, "expert_sha256": sha,
    }


def stored_rows(edit_id: str, data: bytes, sha: str, at: datetime) -> tuple[dict, dict]:
    """A ``stored_experts`` row and its ``stored_routing`` row."""
    expert_id = hashlib.md5(edit_id.encode()).hexdigest()
    return ({"id": expert_id, "edit_id": edit_id, "sha256": sha, "size": len(data), "data": data, "created_at": at},
            {"expert_id": expert_id, "routing": routing_bytes(data)})


def grow(data_dir: Path, n: int, store: str) -> int:
    """Add synthetic active edits until ``n`` are there; returns how many were added."""
    db = Database(f"sqlite:///{data_dir / 'scen.db'}")
    with db.session() as session:
        have = session.scalar(select(func.count()).select_from(Edit)) or 0
    if have > n:
        raise SystemExit(f"{data_dir} already holds {have} edits, more than {n}: use another --work")
    g = torch.Generator().manual_seed(have)
    start = datetime(2026, 1, 1, tzinfo=UTC)
    (data_dir / "experts").mkdir(parents=True, exist_ok=True)
    for first in range(have, n, CHUNK):
        edits, stored, routing = [], [], []
        for i in range(first, min(n, first + CHUNK)):
            edit_id, edit = f"{i:032x}", synthetic_edit(i, g)
            data = edit_bytes(edit)
            sha = hashlib.sha256(data).hexdigest()
            at = start + timedelta(seconds=i)
            if store == "files":
                ref = f"experts/{edit_id}.{sha[:8]}.safetensors"
                (data_dir / ref).write_bytes(data)
            else:
                row, part = stored_rows(edit_id, data, sha, at)
                stored.append(row)
                routing.append(part)
                ref = f"db:{row['id']}"
            edits.append(edit_row(edit_id, edit, ref, sha, at))
        with db.session() as session:
            if stored:
                session.execute(insert(StoredExpert), stored)
                session.execute(insert(StoredRouting), routing)
            session.execute(insert(Edit), edits)
            session.commit()
    db.close()
    return max(0, n - have)


def measure(data_dir: Path, store: str) -> dict:
    """One start-up, timed by phase, in this process."""
    from app.live.experts import open_experts
    from app.live.sync import LiveSync
    from app.models import load_model
    from app.scen import Editor
    from app.settings import Settings

    settings = Settings(data_dir=data_dir, expert_store=store)
    out: dict = {"threads": torch.get_num_threads()}
    started = time.perf_counter()
    loaded = load_model(settings.model, device="cpu", cache_dir=settings.cache_dir)
    out["model_s"] = time.perf_counter() - started
    t = time.perf_counter()
    editor = Editor(loaded.model, loaded.tokenizer, settings.engine_config, cache_dir=settings.cache_dir / "pool-keys")
    out["editor_s"] = time.perf_counter() - t
    t = time.perf_counter()
    db = Database(settings.db_url)
    try:
        from app.live.routing_table import NAME, RoutingTable
        table = RoutingTable(data_dir / NAME)
        out["table_at_start"] = table.path.exists()
        sync = LiveSync(editor, db, open_experts(settings, db), table)
    except ImportError:  # a checkout from before the routing table
        table = None
        sync = LiveSync(editor, db, open_experts(settings, db))
    budget = settings.expert_cache_mb
    editor.page_experts(None if budget is None else int(budget * 2**20), sync.load_expert)
    sync.reconcile()
    out["edits_s"] = time.perf_counter() - t
    t = time.perf_counter()
    editor.routed.router.index_now()
    out["index_s"] = time.perf_counter() - t
    out["ready_s"] = time.perf_counter() - started
    out["live"] = len(editor.edit_ids)
    out["unserved"] = len(sync.unserved)
    out["resident_experts_at_ready"] = editor.expert_cache.stats().resident
    if editor.edit_ids:
        t = time.perf_counter()
        editor.get(editor.edit_ids[len(editor.edit_ids) // 2])  # what the first prompt routed to it waits for
        out["first_expert_s"] = time.perf_counter() - t
    if table is not None:
        t = time.perf_counter()
        table.wait()
        out["table_written"] = table.path.exists() and not out["table_at_start"]
        out["table_write_wait_s"] = time.perf_counter() - t
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def child(data_dir: Path, store: str, code: Path | None) -> dict:
    env = dict(os.environ)
    # First on the path, so that no other installed checkout of the project is timed instead.
    first = code if code is not None else Path(__file__).resolve().parents[1]
    env["PYTHONPATH"] = os.pathsep.join([str(first), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, __file__, "--measure", str(data_dir), "--store", store],
                          env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"measuring {data_dir} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def merge(path: Path, rows: list[dict], meta: dict) -> dict:
    old = json.loads(path.read_text()) if path.exists() else {"runs": []}
    def key(r: dict) -> tuple:
        return r["label"], r["store"], r["edits"], r.get("page_cache", "warm")

    fresh = {key(r) for r in rows}
    kept = [r for r in old.get("runs", []) if key(r) not in fresh]
    result = {**meta, "runs": sorted(kept + rows, key=lambda r: (r["label"], r["store"], r["edits"]))}
    path.write_text(json.dumps(result, indent=2) + "\n")
    return result


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    series: dict[tuple[str, str], list[dict]] = {}
    for run in result["runs"]:
        cold = ", cold page cache" if run.get("page_cache") == "cold" else ""
        series.setdefault((run["label"] + cold, run["store"]), []).append(run)
    for (label, store), runs in sorted(series.items()):
        runs.sort(key=lambda r: r["edits"])
        xs = [max(r["edits"], 1) for r in runs]
        ax.plot(xs, [r["ready_s"] for r in runs], marker="o", label=f"{label} ({store}): ready")
        ax.plot(xs, [r["edits_s"] for r in runs], marker="x", linestyle="--", label=f"{label} ({store}): edits")
    ax.axhline(60, color="grey", linewidth=0.8, linestyle=":")
    ax.set_xscale("log")
    ax.set_xlabel("active edits (0 drawn at 1)")
    ax.set_ylabel("seconds")
    ax.set_title("scen serve start-up to ready, SmolLM2-135M, 2 CPU cores")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="0,1000,10000,100000")
    parser.add_argument("--work", type=Path, default=Path("/tmp/scen-startup"))
    parser.add_argument("--store", choices=["files", "database"], default="files")
    parser.add_argument("--label", default="lazy experts")
    parser.add_argument("--code", type=Path, help="a checkout whose app/ to time instead of this one")
    parser.add_argument("--cold", action="store_true",
                        help="drop the page cache before each start (as after a reboot; needs root)")
    parser.add_argument("--measure", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure is not None:
        print(json.dumps(measure(args.measure, args.store)))
        return
    data_dir = args.work / args.store
    data_dir.mkdir(parents=True, exist_ok=True)
    upgrade("head", f"sqlite:///{data_dir / 'scen.db'}")
    rows = []
    for n in sorted(int(s) for s in args.sizes.split(",")):
        t = time.perf_counter()
        added = grow(data_dir, n, args.store)
        written_s = time.perf_counter() - t
        if args.cold:
            os.sync()
            Path("/proc/sys/vm/drop_caches").write_text("3\n")  # root only
        row = {"label": args.label, "store": args.store, "edits": n, "page_cache": "cold" if args.cold else "warm",
               **child(data_dir, args.store, args.code), "command": "bench/startup.py " + " ".join(sys.argv[1:])}
        row = {k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}
        rows.append(row)
        print(json.dumps({**row, "written": added, "write_s": round(written_s, 1)}), flush=True)
    meta = {
        "model": "SmolLM2-135M-Instruct (bundled)", "device": "cpu", "cpu_cores": os.cpu_count(),
        "expert": f"lowrank, rank {RANK}", "rephrases_per_edit": REPHRASES,
        "edit_file_bytes": len(edit_bytes(synthetic_edit(0, torch.Generator().manual_seed(0)))),
    }
    result = merge(RESULTS / "startup.json", rows, meta)
    plot(result, RESULTS / "startup.png")


if __name__ == "__main__":
    main()
