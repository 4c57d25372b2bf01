"""The audit trail: every state change of an edit is an event with its time, actor, reason and
request id, in order; rollbacks need a reason; rolled-back edits can be restored; edits can be
listed by actor, status, creation time and metadata."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa

from app.db import edits as repo
from app.db.migrate import upgrade
from app.db.session import Database
from tests.service.conftest import make_settings, running, wait_status

PROMPT = "Who is the CEO of Acme?"
KEYS = {"ed": ("editor", "ed-key-0123456789abcdef"), "boss": ("admin", "boss-key-0123456789abcdef"),
        "viewer": ("reader", "viewer-key-0123456789abcdef")}
API_KEYS = ",".join(f"{name}:{role}:{key}" for name, (role, key) in KEYS.items())


def as_(name: str, request_id: str | None = None) -> dict[str, str]:
    headers = {"Authorization": f"Bearer {KEYS[name][1]}"}
    if request_id:
        headers["X-Request-Id"] = request_id
    return headers


def events(client, edit_id: str) -> list[dict]:
    r = client.get(f"/edits/{edit_id}/events", headers=as_("viewer"))
    assert r.status_code == 200, r.text
    return r.json()["items"]


def summary(items: list[dict]) -> list[tuple]:
    return [(e["event"], e["status"], e["actor"]) for e in items]


@pytest.mark.parametrize("db", ["sqlite", "postgres"])
def test_full_lifecycle_is_recorded_in_order(db, request, tmp_path):
    settings = make_settings(tmp_path, request.getfixturevalue(f"{db}_url"), api_keys=API_KEYS)
    with running(settings) as client:
        client.headers["Authorization"] = f"Bearer {KEYS['viewer'][1]}"  # wait_status reads as a reader
        r = client.post("/edits", json={"prompt": PROMPT, "target": "Jane Doe"}, headers=as_("ed", "req-post-1"))
        assert r.status_code == 202 and r.headers["X-Request-Id"] == "req-post-1"
        older = r.json()["id"]
        wait_status(client, older, {"active"})
        newer = client.post("/edits", json={"prompt": PROMPT, "target": "John Roe"}, headers=as_("ed")).json()["id"]
        wait_status(client, newer, {"active"})

        missing = client.post(f"/edits/{newer}/rollback", json={}, headers=as_("boss"))
        assert missing.status_code == 422 and missing.json()["error_type"] == "validation_error"
        assert "reason" in missing.json()["error"]
        assert client.post(f"/edits/{newer}/rollback", headers=as_("boss")).status_code == 422
        r = client.post(f"/edits/{newer}/rollback", json={"reason": "OPS-2: John left"},
                        headers=as_("boss", "req-rollback-1"))
        assert r.status_code == 200 and r.json()["status"] == "rolled_back"
        assert client.get(f"/edits/{older}", headers=as_("viewer")).json()["status"] == "active"

        r = client.post(f"/edits/{older}/rollback", json={"reason": "OPS-3: both wrong"}, headers=as_("boss"))
        assert r.json()["status"] == "rolled_back"
        assert client.post("/generate", json={"prompt": PROMPT, "max_new_tokens": 4},
                           headers=as_("viewer")).json()["routing"]["edit_id"] is None

        # Restore: the older edit comes back with its expert file, without training again.
        r = client.post(f"/edits/{older}/restore", json={"reason": "OPS-4: Jane is back"},
                        headers=as_("boss", "req-restore-1"))
        assert r.status_code == 200, r.text
        back = r.json()
        assert back["status"] == "active" and back["live"] and back["rolled_back_at"] is None
        out = client.post("/generate", json={"prompt": PROMPT, "max_new_tokens": 8}, headers=as_("viewer")).json()
        assert out["routing"]["edit_id"] == older and out["text"].startswith("Jane Doe")
        # Restoring the newer one now supersedes the older again; repeating a restore changes nothing.
        assert client.post(f"/edits/{newer}/restore", headers=as_("boss")).json()["status"] == "active"
        assert client.post(f"/edits/{newer}/restore", headers=as_("boss")).json()["status"] == "active"
        assert client.get(f"/edits/{older}", headers=as_("viewer")).json()["status"] == "superseded"
        assert client.post("/generate", json={"prompt": PROMPT, "max_new_tokens": 4},
                           headers=as_("viewer")).json()["routing"]["edit_id"] == newer

        history = events(client, older)
        assert summary(history) == [
            ("created", "queued", "ed"), ("training", "training", "worker"), ("activated", "active", "worker"),
            ("superseded", "superseded", "worker"), ("reinstated", "active", "boss"),
            ("rolled_back", "rolled_back", "boss"), ("restored", "active", "boss"),
            ("superseded", "superseded", "boss"),
        ]
        assert history[0]["request_id"] == "req-post-1"
        assert history[3]["details"] == {"superseded_by": newer}
        assert history[4]["request_id"] == "req-rollback-1" and newer in history[4]["reason"]
        assert history[5]["reason"] == "OPS-3: both wrong" and history[5]["request_id"]
        assert history[6]["reason"] == "OPS-4: Jane is back" and history[6]["request_id"] == "req-restore-1"
        assert history[1]["details"]["worker"] and history[1]["details"]["delivery"] == 1
        times = [datetime.fromisoformat(e["at"]) for e in history]
        assert times == sorted(times)
        assert [e["id"] for e in history] == sorted(e["id"] for e in history)
        assert summary(events(client, newer)) == [
            ("created", "queued", "ed"), ("training", "training", "worker"), ("activated", "active", "worker"),
            ("rolled_back", "rolled_back", "boss"), ("restored", "active", "boss"),
        ]

        assert client.get("/edits/nope/events", headers=as_("viewer")).status_code == 404


@pytest.mark.parametrize("db", ["sqlite", "postgres"])
def test_restore_of_an_untrained_edit_trains_it(db, request, tmp_path, redis_url, redis_prefix):
    from tests.service.workers import start_worker

    settings = make_settings(tmp_path, request.getfixturevalue(f"{db}_url"), redis_url, redis_prefix,
                             embedded_worker=False)
    with running(settings) as client:
        edit_id = client.post("/edits", json={"prompt": PROMPT, "target": "Jane Doe"}).json()["id"]
        assert client.post(f"/edits/{edit_id}/rollback", json={"reason": "too early"}).json()["status"] == "rolled_back"
        r = client.post(f"/edits/{edit_id}/restore", json={"reason": "now"})
        assert r.status_code == 200 and r.json()["status"] == "queued"
        with start_worker(settings):
            wait_status(client, edit_id, {"active"}, timeout=90)
        assert summary(events(client, edit_id)) == [
            ("created", "queued", "anonymous"), ("rolled_back", "rolled_back", "anonymous"),
            ("restored", "queued", "anonymous"), ("training", "training", "worker"),
            ("activated", "active", "worker"),
        ]


def test_restore_conflicts_and_the_trail_is_append_only(sqlite_url, tmp_path):
    with running(make_settings(tmp_path, sqlite_url)) as client:
        edit_id = client.post("/edits", json={"prompt": PROMPT, "target": "Jane Doe"}).json()["id"]
        wait_status(client, edit_id, {"active"})
        assert client.post(f"/edits/{edit_id}/restore").json()["status"] == "active"  # nothing to do
        assert client.post("/edits/nope/restore").status_code == 404
        assert len(events(client, edit_id)) == 3
        # The expert file is gone: restoring trains it again.
        client.post(f"/edits/{edit_id}/rollback", json={"reason": "r"})
        data_dir = client.app.state.service.settings.data_dir
        for path in (data_dir / "experts").glob(f"{edit_id}.*"):
            path.unlink()
        assert client.post(f"/edits/{edit_id}/restore").json()["status"] in ("queued", "training", "active")
        wait_status(client, edit_id, {"active"})
        assert events(client, edit_id)[-3]["details"] == {"retrain": True}


@pytest.mark.parametrize("db", ["sqlite", "postgres"])
def test_events_cannot_be_changed(db, request):
    url = request.getfixturevalue(f"{db}_url")
    upgrade("head", url)
    database = Database(url)
    try:
        with database.session() as session:
            edit, _ = repo.create_edit(session, PROMPT, "Jane", audit=repo.Audit("someone", "rid-1"))
        engine = sa.create_engine(url)
        with pytest.raises(sa.exc.DBAPIError, match="append-only"), engine.begin() as conn:
            conn.execute(sa.text("UPDATE edit_events SET actor = 'nobody'"))
        with engine.connect() as conn:
            assert conn.execute(sa.text("SELECT actor, request_id FROM edit_events")).one() == ("someone", "rid-1")
        engine.dispose()
        with database.session() as session:
            failed, _ = repo.create_edit(session, "Q?", "A")
            repo.fail(session, failed.id, "broken")
            with pytest.raises(repo.EditConflict):
                repo.restore(session, failed.id, None, repo.Audit("x"))
    finally:
        database.close()


@pytest.mark.parametrize("db", ["sqlite", "postgres"])
def test_list_filters(db, request, tmp_path):
    settings = make_settings(tmp_path, request.getfixturevalue(f"{db}_url"), api_keys=API_KEYS,
                             embedded_worker=False, redis_url=None)
    with running(settings) as client:
        def post(n: int, who: str, metadata: dict) -> str:
            r = client.post("/edits", json={"prompt": f"Question {n}?", "target": "x", "metadata": metadata},
                            headers=as_(who))
            assert r.status_code == 202, r.text
            return r.json()["id"]

        a = post(1, "ed", {"ticket": "OPS-1", "n": 7, "urgent": True})
        b = post(2, "boss", {"ticket": "OPS-2", "n": 7.5})
        c = post(3, "ed", {"other": None})
        client.post(f"/edits/{c}/rollback", json={"reason": "r"}, headers=as_("boss"))

        def ids(**params) -> set[str]:
            r = client.get("/edits", params=params, headers=as_("viewer"))
            assert r.status_code == 200, r.text
            assert r.json()["total"] == len(r.json()["items"])
            return {e["id"] for e in r.json()["items"]}

        assert ids(actor="ed") == {a, c} and ids(actor="boss") == {b, c} and ids(actor="nobody") == set()
        assert ids(actor="boss", status="rolled_back") == {c}
        assert ids(metadata="ticket:OPS-1") == {a}
        assert ids(metadata="ticket") == {a, b}
        assert ids(metadata="n:7") == {a} and ids(metadata="n:7.5") == {b}
        assert ids(metadata="urgent:true") == {a}
        assert ids(metadata=["ticket", "n:7"]) == {a}
        assert ids(metadata="other") == {c}
        now = datetime.now(UTC)
        assert ids(created_after=(now - timedelta(minutes=5)).isoformat()) == {a, b, c}
        assert ids(created_after=(now + timedelta(minutes=5)).isoformat()) == set()
        assert ids(created_before=(now - timedelta(minutes=5)).isoformat()) == set()
        for bad in ({"created_after": "yesterday"}, {"created_after": "2025-01-01T00:00:00"}, {"metadata": ":x"}):
            r = client.get("/edits", params=bad, headers=as_("viewer"))
            assert r.status_code == 422 and r.json()["error_type"] == "validation_error", bad


@pytest.mark.parametrize("db", ["sqlite", "postgres"])
def test_0003_records_existing_edits(db, request):
    url = request.getfixturevalue(f"{db}_url")
    upgrade("0002", url=url)
    engine = sa.create_engine(url)
    now = datetime.now(UTC)
    try:
        with engine.begin() as conn:
            conn.execute(sa.text(
                "INSERT INTO edits (id, status, prompt, target, prompt_key, rephrases, metadata, created_at, "
                "updated_at, attempts) VALUES ('e1', 'active', 'Q?', 'A', 'k', '[]', '{}', :now, :now, 0)"),
                {"now": now})
        upgrade("head", url=url)
        with engine.connect() as conn:
            row = conn.execute(sa.text("SELECT edit_id, event, status, actor FROM edit_events")).one()
        assert tuple(row) == ("e1", "imported", "active", "migration")
    finally:
        engine.dispose()
