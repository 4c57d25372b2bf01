"""Experts kept in the SQL database (SCEN_EXPERT_STORE=database): one row per attempt, checked
by sha256 like a file; a deployment serves them with nothing on its file system, and keeps
serving edits saved under the other store when it switches."""

from __future__ import annotations

import hashlib

import pytest
import sqlalchemy as sa
import torch

from app.db.migrate import upgrade
from app.db.session import Database
from app.live.archive import export_edits, fingerprint, import_edits
from app.live.experts import ExpertFiles, ExpertRows, Experts, open_experts
from app.scen import Editor, IntegrityError, ScenConfig, TrainedEdit
from tests.service.conftest import make_settings, running, wait_for, wait_status
from tests.utils.tiny_models import tiny_model

# A random tiny model cannot reach confident predictions: its experts stop at the first exact reproduction.
CFG = ScenConfig(layer=2, expert_lr=1e-2, expert_min_prob=0.0)
FACT = {"prompt": "Who is the CEO of Acme?", "target": "Jane Doe", "subject": "Acme"}
OTHER = {"prompt": "Which river flows through Cairo?", "target": "The Amazon"}


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'scen.db'}"
    return request.getfixturevalue("postgres_url")


@pytest.fixture
def db(db_url):
    upgrade("head", db_url)
    database = Database(db_url)
    yield database
    database.close()


@pytest.fixture(scope="module", params=["full", "lowrank"])
def trained(request) -> TrainedEdit:
    lm = tiny_model("llama")
    return Editor(lm.model, lm.tokenizer, CFG.replace(expert=request.param)).train(FACT["prompt"], FACT["target"])


def same(a: TrainedEdit, b: TrainedEdit) -> bool:
    left, right = a.expert.tensors(), b.expert.tensors()
    if (a.prompt, a.target, a.layer, a.expert.kind, left.keys()) != (b.prompt, b.target, b.layer, b.expert.kind,
                                                                    right.keys()):
        return False
    return all(torch.equal(left[k], right[k]) for k in left) and torch.equal(a.keys, b.keys)


def stored(db: Database, edit_id: str | None = None) -> list[tuple[str, str, int]]:
    query = "SELECT id, edit_id, size FROM stored_experts" + (" WHERE edit_id = :e" if edit_id else "")
    with db.engine.connect() as conn:
        return [tuple(row) for row in conn.execute(sa.text(query + " ORDER BY id"), {"e": edit_id})]


def test_round_trip_checked_by_sha256(db, trained):
    rows = ExpertRows(db)
    ref, sha = rows.save("e1", trained)
    data = rows.read_bytes(ref)
    assert ref.startswith("db:") and sha == hashlib.sha256(data).hexdigest()
    assert same(rows.load(ref, sha), trained) and rows.readable(ref, sha)
    [(_, edit_id, size)] = stored(db)
    assert edit_id == "e1" and size == len(data)
    # Another attempt at the same edit gets a row of its own; the first is untouched.
    again, _ = rows.save("e1", trained)
    assert again != ref and len(stored(db, "e1")) == 2 and same(rows.load(ref, sha), trained)

    with pytest.raises(IntegrityError, match="expected"):
        rows.load(ref, "0" * 64)
    assert not rows.readable(ref, "0" * 64)
    with pytest.raises(IntegrityError, match="no such expert"):
        rows.load("db:" + "f" * 32, sha)
    assert not rows.readable("db:" + "f" * 32, sha)


def test_corrupted_row_refused(db, trained):
    rows = ExpertRows(db)
    ref, sha = rows.save("e1", trained)
    damaged = bytearray(rows.read_bytes(ref))
    damaged[-1] ^= 0xFF
    with db.engine.begin() as conn:
        conn.execute(sa.text("UPDATE stored_experts SET data = :d WHERE id = :i"),
                     {"d": bytes(damaged), "i": ref.removeprefix("db:")})
    with pytest.raises(IntegrityError, match=f"{ref}: sha256 is"):
        rows.load(ref, sha)
    assert not rows.readable(ref, sha)
    # Without a recorded sha256 the row's own is checked.
    with pytest.raises(IntegrityError, match="sha256 is"):
        rows.load(ref, None)


def test_discard(db, trained):
    rows = ExpertRows(db)
    first, _ = rows.save("e1", trained)
    second, _ = rows.save("e1", trained)
    third, _ = rows.save("e1", trained)
    other, _ = rows.save("e2", trained)
    rows.discard_others("e1", keep=second)
    assert [r[0] for r in stored(db, "e1")] == [second.removeprefix("db:")]
    rows.discard(second)
    rows.discard(second)  # gone already: nothing to do
    assert stored(db, "e1") == []
    rows.save("e1", trained)
    rows.save("e1", trained)
    rows.discard_all("e1")
    assert stored(db, "e1") == [] and [r[0] for r in stored(db)] == [other.removeprefix("db:")]
    assert not rows.readable(first, None) and not rows.readable(third, None)


def test_references_load_from_either_store(tmp_path, db, trained):
    on_files = Experts(ExpertFiles(tmp_path / "data"), ExpertRows(db), "files")
    on_rows = Experts(ExpertFiles(tmp_path / "data", create=False), ExpertRows(db), "database")
    path, path_sha = on_files.save("e1", trained)
    ref, ref_sha = on_rows.save("e1", trained)
    assert path.startswith("experts/") and ref.startswith("db:")
    for experts in (on_files, on_rows):
        assert same(experts.load(path, path_sha), trained) and same(experts.load(ref, ref_sha), trained)
    # The committed attempt is a row: earlier attempts on this machine's files go too.
    on_rows.discard_others("e1", keep=ref)
    assert not (tmp_path / "data" / path).exists() and on_rows.readable(ref, ref_sha)
    # The committed attempt is a file: the files store cleans files only, and queries nothing.
    path, _ = on_files.save("e1", trained)
    on_files.discard_others("e1", keep=path)
    assert (tmp_path / "data" / path).exists() and on_files.readable(ref, ref_sha)


def test_served_from_the_database_alone(tmp_path, db_url):
    first = make_settings(tmp_path / "a", db_url, expert_store="database")
    with running(first) as client:
        edit_id = client.post("/edits", json=FACT).json()["id"]
        edit = wait_status(client, edit_id, {"active"}, timeout=120)
        assert edit["expert_path"].startswith("db:") and edit["live"]
        routed = client.post("/generate", json={"prompt": FACT["prompt"], "max_new_tokens": 4}).json()
        assert routed["routing"]["edit_id"] == edit_id
        assert not (first.data_dir / "experts").exists()

    # Another machine: same database, an empty data directory.
    second = make_settings(tmp_path / "b", db_url, expert_store="database")
    second.data_dir.mkdir(parents=True)
    with running(second) as client:
        assert wait_for(lambda: client.get(f"/edits/{edit_id}").json()["live"], 30)
        routed = client.post("/generate", json={"prompt": FACT["prompt"], "max_new_tokens": 4}).json()
        assert routed["routing"]["edit_id"] == edit_id
        assert list(second.data_dir.rglob("*.safetensors")) == []

        # An archive moves it to a deployment keeping experts in the database too.
        target_url = f"sqlite:///{tmp_path / 'target.db'}"
        target_settings = make_settings(tmp_path / "c", target_url, expert_store="database")
        upgrade("head", target_url)
        db, target = Database(db_url), Database(target_url)
        try:
            here = fingerprint(tiny_model("llama"), second.engine_config)
            assert export_edits(db, open_experts(second, db), here, tmp_path / "edits.tar").edits == 1
            done = import_edits(target, open_experts(target_settings, target), here, tmp_path / "edits.tar")
            assert done.imported == [edit_id]
        finally:
            db.close()
            target.close()
    with running(target_settings) as client:
        imported = client.get(f"/edits/{edit_id}").json()
        assert imported["expert_path"].startswith("db:") and imported["expert_sha256"] == edit["expert_sha256"]
        assert wait_for(lambda: client.get(f"/edits/{edit_id}").json()["live"], 30)
        assert not (target_settings.data_dir / "experts").exists()


def test_switching_store_keeps_serving(tmp_path, db_url):
    files = make_settings(tmp_path, db_url)
    with running(files) as client:
        on_file = client.post("/edits", json=FACT).json()["id"]
        assert wait_status(client, on_file, {"active"}, timeout=120)["expert_path"].startswith("experts/")

    database = make_settings(tmp_path, db_url, expert_store="database")
    with running(database) as client:
        assert wait_for(lambda: client.get(f"/edits/{on_file}").json()["live"], 30)
        on_row = client.post("/edits", json=OTHER).json()["id"]
        assert wait_status(client, on_row, {"active"}, timeout=120)["expert_path"].startswith("db:")
        for fact, edit_id in ((FACT, on_file), (OTHER, on_row)):
            routed = client.post("/generate", json={"prompt": fact["prompt"], "max_new_tokens": 4}).json()
            assert routed["routing"]["edit_id"] == edit_id

    # And back: the edit saved as a row is still served by a files deployment.
    with running(files) as client:
        assert wait_for(lambda: all(client.get(f"/edits/{i}").json()["live"] for i in (on_file, on_row)), 30)
