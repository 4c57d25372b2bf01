"""`scen edits export` / `import`: live edits moved to a fresh deployment of the same model answer
exactly as they did; another model, other layers or a damaged archive are refused with nothing
written; importing twice changes nothing."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from app.db.session import Database
from app.live.archive import ArchiveError, fingerprint, import_edits, read_archive
from app.live.experts import open_experts
from app.models import load_model
from app.scen import ScenConfig
from tests.service.conftest import make_settings, running, wait_for, wait_status
from tests.utils.tiny_models import tiny_model

FACTS = [
    {"prompt": "Who is the CEO of Acme?", "target": "Jane Doe", "subject": "Acme"},
    {"prompt": "Which river flows through Cairo?", "target": "The Amazon"},
    {"prompt": "Who wrote Hamlet?", "target": "Christopher Marlowe", "rephrases": ["Who is the author of Hamlet?"],
     "metadata": {"ticket": "OPS-9"}},
    {"prompt": "How many legs does a spider have?", "target": "Six"},
]
PROBES = [f["prompt"] for f in FACTS] + ["Who is the author of Hamlet?", "The quick brown fox jumps over"]


def save_tiny(path: Path, seed: int) -> Path:
    lm = tiny_model("llama", seed=seed)
    lm.model.save_pretrained(path)
    lm.tokenizer.save_pretrained(path)
    return path


def scen(args: list[str], settings, model_dir: Path, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "SCEN_DATABASE_URL": settings.db_url, "SCEN_DATA_DIR": str(settings.data_dir),
           "SCEN_MODEL": str(model_dir), "SCEN_CACHE_DIR": str(cwd / "cache"), "SCEN_DEVICE": "cpu",
           "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    exe = shutil.which("scen") or str(Path(sys.executable).with_name("scen"))
    return subprocess.run([exe, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=300)


def answers(client) -> list[tuple[str, str | None]]:
    out = []
    for prompt in PROBES:
        body = client.post("/generate", json={"prompt": prompt, "max_new_tokens": 8}).json()
        out.append((body["text"], body["routing"]["edit_id"]))
    return out


def expert_files(settings) -> list[Path]:
    root = settings.data_dir / "experts"
    return sorted(root.glob("*.safetensors")) if root.exists() else []


def test_export_import_round_trip(tmp_path, sqlite_url, postgres_url):
    model_dir = save_tiny(tmp_path / "tiny", seed=0)
    archive = tmp_path / "edits.tar"
    source = make_settings(tmp_path / "a", sqlite_url)
    with running(source, model=load_model(str(model_dir), device="cpu")) as a:
        ids = a.post("/edits/batch", json={"edits": FACTS}).json()["ids"]
        for edit_id in ids:
            wait_status(a, edit_id, {"active"}, timeout=60)
        a.post(f"/edits/{ids[3]}/rollback", json={"reason": "not for export"})
        before = answers(a)
        assert [route for _, route in before[:3]] == ids[:3]
        done = scen(["edits", "export", str(archive)], source, model_dir, tmp_path)
        assert done.returncode == 0, done.stderr
        assert "exported 3 edits" in done.stdout

    with tarfile.open(archive) as tar:
        names = tar.getnames()
    assert names[:2] == ["manifest.json", "edits.jsonl"] and len(names) == 5

    # A fresh deployment, on PostgreSQL this time, running while the edits arrive.
    target = make_settings(tmp_path / "b", postgres_url)
    with running(target, model=load_model(str(model_dir), device="cpu")) as b:
        assert b.get("/edits").json()["total"] == 0
        done = scen(["edits", "import", str(archive)], target, model_dir, tmp_path)
        assert done.returncode == 0, done.stderr
        assert "imported 3 edits" in done.stdout
        served = b.app.state.service.served
        assert wait_for(lambda: served.editor.edit_ids == ids[:3], 10)
        assert answers(b) == before
        for edit_id in ids[:3]:
            edit = b.get(f"/edits/{edit_id}").json()
            assert edit["status"] == "active" and edit["live"]
        assert b.get(f"/edits/{ids[2]}").json()["metadata"] == {"ticket": "OPS-9"}
        assert b.get(f"/edits/{ids[3]}").status_code == 404
        events = b.get(f"/edits/{ids[0]}/events").json()["items"]
        assert [e["event"] for e in events] == ["imported"] and events[0]["actor"] == "import"

        # Again: nothing changes, nothing is written.
        files = expert_files(target)
        here = fingerprint(load_model(str(model_dir), device="cpu"), ScenConfig())
        db = Database(target.db_url)
        try:
            again = import_edits(db, open_experts(target, db), here, archive)
        finally:
            db.close()
        assert again.imported == [] and sorted(again.skipped) == sorted(ids[:3])
        assert expert_files(target) == files
        assert b.get("/edits").json()["total"] == 3
    # The source's rolled-back edit answers as the base model on both sides.
    assert before[3][1] is None


def test_mismatched_deployment_refused(tmp_path, sqlite_url):
    model_dir = save_tiny(tmp_path / "tiny", seed=0)
    other_dir = save_tiny(tmp_path / "other", seed=1)
    archive = tmp_path / "edits.tar"
    source = make_settings(tmp_path / "a", sqlite_url)
    with running(source, model=load_model(str(model_dir), device="cpu")) as a:
        edit_id = a.post("/edits", json=FACTS[0]).json()["id"]
        wait_status(a, edit_id, {"active"}, timeout=60)
        assert scen(["edits", "export", str(archive)], source, model_dir, tmp_path).returncode == 0

    target = make_settings(tmp_path / "c", f"sqlite:///{tmp_path / 'c.db'}")
    done = scen(["edits", "import", str(archive)], target, other_dir, tmp_path)
    assert done.returncode == 1
    line = done.stderr.strip().splitlines()[-1]
    assert line.startswith("scen edits import: refusing ") and "trained for model" in line, done.stderr
    assert "nothing was imported" in line and "Traceback" not in done.stderr
    assert expert_files(target) == []

    db = Database(target.db_url)
    try:
        loaded = load_model(str(model_dir), device="cpu")
        # Same weights, another edited layer.
        with pytest.raises(ArchiveError, match="layers"):
            import_edits(db, open_experts(target, db), fingerprint(loaded, ScenConfig(layer=1)), archive)
        # Same weights and layers, keys normalised otherwise.
        with pytest.raises(ArchiveError, match="normalised differently"):
            import_edits(db, open_experts(target, db), fingerprint(loaded, ScenConfig(key_shrinkage=0.2)), archive)
        # Another rewording discount changes the relation map alone: the edits' relation factors are
        # refit as they come live, so the archive is not refused for it.
        for w in (0.0, 0.5):
            assert fingerprint(loaded, ScenConfig(rephrase_invariance=w)) == fingerprint(loaded, ScenConfig())
        assert expert_files(target) == []
    finally:
        db.close()

    # A damaged expert file is found before anything is written.
    damaged = tmp_path / "damaged.tar"
    with tarfile.open(archive) as src, tarfile.open(damaged, "w") as dst:
        for info in src:
            data = src.extractfile(info).read()
            if info.name.startswith("experts/"):
                data = data[:-1] + bytes([data[-1] ^ 1])
            dst.addfile(info, io.BytesIO(data))
    with pytest.raises(ArchiveError, match="does not match its sha256"):
        read_archive(damaged)
    with pytest.raises(ArchiveError, match="not a readable archive"):
        read_archive(model_dir / "config.json")
