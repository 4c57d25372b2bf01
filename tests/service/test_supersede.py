"""Subjects, a newer edit of a prompt superseding the older one, and duplicate posts."""

from __future__ import annotations

import threading

import pytest

from app.db import edits as repo
from app.db.migrate import upgrade
from app.db.session import Database
from tests.service.conftest import make_settings, running, wait_status

PROMPT = "Who is the CEO of Acme?"
OTHER = "Which river flows through Cairo?"


def _generate(client, prompt: str) -> dict:
    return client.post("/generate", json={"prompt": prompt, "max_new_tokens": 8}).json()


def _active(client, body: dict) -> dict:
    r = client.post("/edits", json=body)
    assert r.status_code == 202, r.text
    return wait_status(client, r.json()["id"], {"active"})


@pytest.mark.parametrize("db", ["sqlite", "postgres"])
def test_subject_stored_and_returned(db, request, tmp_path):
    with running(make_settings(tmp_path, request.getfixturevalue(f"{db}_url"))) as client:
        r = client.post("/edits", json={"prompt": PROMPT, "target": "Jane Doe", "subject": "Acme"})
        assert r.status_code == 202 and r.json()["subject"] == "Acme"
        given = wait_status(client, r.json()["id"], {"active"})
        assert given["subject"] == "Acme" and given["metrics"]["subject"] == "Acme"

        inferred = _active(client, {"prompt": OTHER, "target": "The Amazon"})
        assert inferred["subject"] is None
        used = inferred["metrics"]["subject"]
        assert isinstance(used, str) and used.strip().casefold() in OTHER.casefold()


@pytest.mark.parametrize("db", ["sqlite", "postgres"])
def test_newer_edit_supersedes_and_rollback_restores(db, request, tmp_path):
    with running(make_settings(tmp_path, request.getfixturevalue(f"{db}_url"))) as client:
        editor = client.app.state.service.served.editor
        older = _active(client, {"prompt": PROMPT, "target": "Jane Doe"})
        assert _generate(client, PROMPT)["routing"]["edit_id"] == older["id"]
        other = _active(client, {"prompt": OTHER, "target": "The Amazon"})
        newer = _active(client, {"prompt": PROMPT, "target": "John Roe"})

        old = client.get(f"/edits/{older['id']}").json()
        assert old["status"] == "superseded" and old["superseded_by"] == newer["id"] and not old["live"]
        assert client.get(f"/edits/{newer['id']}").json()["live"]
        assert editor.edit_ids == [other["id"], newer["id"]]
        assert _generate(client, PROMPT)["routing"]["edit_id"] == newer["id"]
        listed = client.get("/edits", params={"status": "superseded"}).json()
        assert [e["id"] for e in listed["items"]] == [older["id"]]

        r = client.post(f"/edits/{newer['id']}/rollback", json={"reason": "test"})
        assert r.status_code == 200 and r.json()["status"] == "rolled_back"
        back = client.get(f"/edits/{older['id']}").json()
        assert back["status"] == "active" and back["superseded_by"] is None and back["live"]
        # In activation order again: the restored edit before the one activated after it.
        assert editor.edit_ids == [older["id"], other["id"]]
        out = _generate(client, PROMPT)
        assert out["routing"]["edit_id"] == older["id"] and out["text"].startswith("Jane Doe")
        assert _generate(client, OTHER)["routing"]["edit_id"] == other["id"]
        assert client.get("/ready").json()["live_edits"] == 2


@pytest.mark.parametrize("db", ["sqlite", "postgres"])
def test_duplicate_post_is_409_naming_the_edit(db, request, tmp_path):
    with running(make_settings(tmp_path, request.getfixturevalue(f"{db}_url"))) as client:
        body = {"prompt": PROMPT, "target": "Jane Doe", "subject": "Acme"}
        first = client.post("/edits", json=body, headers={"Idempotency-Key": "k-1"})
        assert first.status_code == 202
        edit_id = first.json()["id"]
        wait_status(client, edit_id, {"active"})

        same = {"prompt": "  who is the CEO of   ACME? ", "target": "jane  doe ", "subject": "acme"}
        for headers in ({}, {"Idempotency-Key": "k-2"}):
            r = client.post("/edits", json=same, headers=headers)
            assert r.status_code == 409, r.text
            assert r.json()["error_type"] == "duplicate_edit" and r.json()["edit_id"] == edit_id
            assert edit_id in r.json()["error"]
        # Without a subject the prompt and target alone decide.
        r = client.post("/edits", json={"prompt": PROMPT, "target": "Jane Doe"})
        assert r.status_code == 409 and r.json()["edit_id"] == edit_id
        assert client.get("/edits").json()["total"] == 1

        replay = client.post("/edits", json=body, headers={"Idempotency-Key": "k-1"})
        assert replay.status_code == 200 and replay.json()["id"] == edit_id

        # After a rollback the same change may be posted again; the refused key was not consumed.
        client.post(f"/edits/{edit_id}/rollback", json={"reason": "test"})
        again = client.post("/edits", json=same, headers={"Idempotency-Key": "k-2"})
        assert again.status_code == 202 and again.json()["id"] != edit_id
        assert client.get("/edits").json()["total"] == 2


# ---- transitions, without a model ----------------------------------------------------------------


@pytest.fixture(params=["sqlite", "postgres"])
def database(request):
    url = request.getfixturevalue(f"{request.param}_url")
    upgrade("head", url)
    db = Database(url)
    yield db
    db.close()


def _activated(db: Database, prompt: str, target: str, subject: str | None = None) -> str:
    with db.session() as session:
        edit, _ = repo.create_edit(session, prompt, target, subject=subject)
        repo.start_training(session, edit.id, 1, "w")
        assert repo.activate(session, edit.id, {}, f"experts/{edit.id}", "0" * 64) is not None
        return edit.id


def _status(db: Database, edit_id: str) -> tuple[str, str | None]:
    with db.session() as session:
        edit = repo.get_edit(session, edit_id)
        return edit.status, edit.superseded_by


def test_prompts_compare_normalised(database):
    j = _activated(database, "Who is the CEO of Acme?", "Jane")
    other = _activated(database, "Who founded Acme?", "Ann")
    t = _activated(database, " who IS the  CEO of acme?\n", "John")
    assert _status(database, j) == ("superseded", t)
    assert _status(database, other) == ("active", None)
    with database.session() as session:
        assert [r.id for r in repo.live_records(session)] == [other, t]


def test_rollback_of_a_superseded_edit_hands_its_predecessors_on(database):
    j = _activated(database, PROMPT, "Jane")
    t = _activated(database, PROMPT, "John")
    u = _activated(database, PROMPT, "Joan")
    assert _status(database, t) == ("superseded", u)
    with database.session() as session:
        result = repo.rollback(session, t)
    assert result.changed and result.restored == [] and result.edit.status == "rolled_back"
    assert _status(database, j) == ("superseded", u)
    with database.session() as session:
        result = repo.rollback(session, u)
    assert result.restored == [j]
    assert _status(database, j) == ("active", None)
    assert _status(database, t) == ("rolled_back", u)
    with database.session() as session:
        assert [r.id for r in repo.live_records(session)] == [j]


def test_duplicates_of_waiting_edits_and_subjects(database):
    with database.session() as session:
        queued, _ = repo.create_edit(session, PROMPT, "Jane", subject="Acme")
        with pytest.raises(repo.DuplicateEdit) as caught:
            repo.create_edit(session, PROMPT.upper(), " jane")
        assert caught.value.edit_id == queued.id
        with pytest.raises(repo.DuplicateEdit):
            repo.create_edit(session, PROMPT, "Jane", subject="ACME")
        # Another subject is another edit (it will supersede this one once active).
        other, created = repo.create_edit(session, PROMPT, "Jane", subject="CEO")
        assert created and other.id != queued.id
        repo.rollback(session, queued.id)
        repo.rollback(session, other.id)
        again, created = repo.create_edit(session, PROMPT, "Jane")
        assert created


def test_concurrent_activations_of_one_prompt_leave_one_active(database):
    """The second activation waits for the first to commit, then supersedes it."""
    ids = []
    for target in ("Jane", "John"):
        with database.session() as session:
            edit, _ = repo.create_edit(session, PROMPT, target)
            repo.start_training(session, edit.id, 1, "w")
            ids.append(edit.id)
    first_ready, release = threading.Event(), threading.Event()
    results: dict[str, object] = {}

    def activate(edit_id: str, hold: bool) -> None:
        with database.session() as session:
            if hold:
                commit = session.commit

                def held_commit() -> None:
                    first_ready.set()
                    release.wait(10)
                    commit()

                session.commit = held_commit  # type: ignore[method-assign]
            results[edit_id] = repo.activate(session, edit_id, {}, "experts/x", "0" * 64)

    first = threading.Thread(target=activate, args=(ids[0], True))
    first.start()
    assert first_ready.wait(10)
    second = threading.Thread(target=activate, args=(ids[1], False))
    second.start()
    second.join(0.5)
    assert second.is_alive(), "the second activation did not wait for the first"
    release.set()
    first.join(10)
    second.join(30)
    assert results[ids[0]] == repo.Activated([]) and results[ids[1]] == repo.Activated([ids[0]])
    assert _status(database, ids[0]) == ("superseded", ids[1])
    assert _status(database, ids[1]) == ("active", None)
