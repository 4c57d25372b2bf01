"""A process starts with its live edits' routing parts only: an edit's expert is read, and
checked by sha256, when a prompt is first routed to it. A damaged expert is refused then and
reported like any expert that cannot be loaded; entries stored before the routing part was kept
apart still load."""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from app.db.migrate import downgrade, upgrade
from tests.service.conftest import make_settings, running, wait_for, wait_status
from tests.utils.edit_files import damage_expert

FACT = {"prompt": "Who is the CEO of Acme?", "target": "Jane Doe", "subject": "Acme"}


@pytest.fixture(params=[("sqlite", "files"), ("postgres", "database"), ("sqlite", "database")],
                ids=["sqlite-files", "postgres-database", "sqlite-database"])
def settings(request, tmp_path):
    db, store = request.param
    url = f"sqlite:///{tmp_path / 'scen.db'}" if db == "sqlite" else request.getfixturevalue("postgres_url")
    return make_settings(tmp_path, url, expert_store=store)


def ask(client) -> dict:
    return client.post("/generate", json={"prompt": FACT["prompt"], "max_new_tokens": 8}).json()


def served_once(settings) -> tuple[str, dict, dict]:
    """An edit trained and served; returns its id, the base model's answer and the edit's."""
    with running(settings) as client:
        base = ask(client)
        edit_id = client.post("/edits", json=FACT).json()["id"]
        edit = wait_status(client, edit_id, {"active"}, timeout=120)
        answer = ask(client)
    assert answer["routing"]["edit_id"] == edit_id
    return edit_id, base, edit


def rewrite_entry(settings, edit: dict, change) -> None:
    """Replace the bytes of the edit's stored entry (file or row) by ``change(bytes)``."""
    ref = edit["expert_path"]
    if not ref.startswith("db:"):
        path = settings.data_dir / ref
        path.write_bytes(change(path.read_bytes()))
        return
    engine = sa.create_engine(settings.db_url)
    try:
        with engine.begin() as conn:
            row = {"i": ref.removeprefix("db:")}
            data = bytes(conn.execute(sa.text("SELECT data FROM stored_experts WHERE id = :i"), row).scalar_one())
            conn.execute(sa.text("UPDATE stored_experts SET data = :d WHERE id = :i"), {**row, "d": change(data)})
    finally:
        engine.dispose()


def test_served_after_a_restart_with_its_expert_read_at_first_use(settings):
    edit_id, _, _ = served_once(settings)
    with running(settings) as client:
        editor = client.app.state.service.served.editor
        stats = editor.expert_cache.stats()
        assert edit_id in editor.edit_ids and stats.resident == 0 and stats.loads == 0
        assert client.get(f"/edits/{edit_id}").json()["live"]
        answer = ask(client)
        assert answer["routing"]["edit_id"] == edit_id and answer["text"].startswith(FACT["target"])
        stats = editor.expert_cache.stats()
        assert stats.loads == 1 and stats.resident == 1 and stats.load_failures == 0


def test_a_damaged_expert_is_refused_at_first_use(settings):
    edit_id, base, edit = served_once(settings)
    rewrite_entry(settings, edit, damage_expert)
    with running(settings) as client:
        # Its routing part reads: it is live until a prompt needs its expert.
        assert client.get(f"/edits/{edit_id}").json()["live"]
        answer = ask(client)
        assert answer["routing"]["edit_id"] is None and answer["text"] == base["text"]
        ready = client.get("/ready").json()
        assert ready["status"] == "degraded" and set(ready["unserved_edits"]) == {edit_id}
        error = client.get(f"/edits/{edit_id}").json()["error"]
        assert "cannot be loaded" in error and "sha256" in error
        # The next reconcile reads it whole: out of the live set, as at start-up, and it stays out.
        assert wait_for(lambda: not client.get(f"/edits/{edit_id}").json()["live"], 5)
        assert not wait_for(lambda: client.get(f"/edits/{edit_id}").json()["live"], 1.5)
        assert client.post("/generate", json={"prompt": "Hello?", "max_new_tokens": 4}).status_code == 200
        # Repaired, it serves again.
        rewrite_entry(settings, edit, damage_expert)
        assert wait_for(lambda: client.get(f"/edits/{edit_id}").json()["live"], 5)
        assert ask(client)["routing"]["edit_id"] == edit_id


def test_entries_stored_without_a_routing_part_still_load(settings):
    edit_id, _, edit = served_once(settings)
    if edit["expert_path"].startswith("db:"):
        # As a row stored before migration 0005 has it.
        engine = sa.create_engine(settings.db_url)
        with engine.begin() as conn:
            conn.execute(sa.text("DELETE FROM stored_routing"))
        engine.dispose()
    with running(settings) as client:
        assert client.get(f"/edits/{edit_id}").json()["live"]
        answer = ask(client)
        assert answer["routing"]["edit_id"] == edit_id and answer["text"].startswith(FACT["target"])


@pytest.mark.parametrize("db", ["sqlite", "postgres"])
def test_migrations_keep_stored_experts_and_their_routing_parts(db, request):
    url = request.getfixturevalue(f"{db}_url")
    upgrade("0004", url=url)
    engine = sa.create_engine(url)
    row = {"e": "e1", "s": "0" * 64, "n": 3, "d": b"abc", "t": "2026-01-01T00:00:00+00:00"}
    insert = ("INSERT INTO stored_experts (id, edit_id, sha256, size, data, created_at) "
              "VALUES (:i, :e, :s, :n, :d, :t)")

    def columns(table: str) -> set[str]:
        return {c["name"] for c in sa.inspect(engine).get_columns(table)}

    try:
        with engine.begin() as conn:
            conn.execute(sa.text(insert), {**row, "i": "old"})  # stored before routing parts
        upgrade("0005", url=url)
        with engine.begin() as conn:
            conn.execute(sa.text(insert), {**row, "i": "new"})
            conn.execute(sa.text("UPDATE stored_experts SET routing = :r WHERE id = 'new'"), {"r": b"rt"})
        upgrade("head", url=url)
        with engine.begin() as conn:
            assert conn.execute(sa.text("SELECT expert_id, routing FROM stored_routing")).all() == [("new", b"rt")]
            assert sorted(conn.execute(sa.text("SELECT id, data FROM stored_experts")).all()) == [
                ("new", b"abc"), ("old", b"abc")]
        # PostgreSQL drops the old column; SQLite keeps it, unused, rather than rewrite the table.
        assert ("routing" in columns("stored_experts")) == (db == "sqlite")
        downgrade("0005", url)
        with engine.begin() as conn:
            assert sorted(conn.execute(sa.text("SELECT id, data, routing FROM stored_experts")).all()) == [
                ("new", b"abc", b"rt"), ("old", b"abc", None)]
        assert "stored_routing" not in sa.inspect(engine).get_table_names()
        downgrade("0004", url)
        with engine.begin() as conn:
            assert conn.execute(sa.text("SELECT count(*) FROM stored_experts")).scalar_one() == 2
        assert "routing" not in columns("stored_experts")
    finally:
        engine.dispose()
