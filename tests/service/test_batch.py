"""POST /edits/batch: all items checked before any is written, one id per edit, the rules of
POST /edits for each, and a worker that trains the batch in order."""

from __future__ import annotations

import pytest

from tests.service.conftest import make_settings, running, wait_status

READER = "reader-key-0123456789"
EDITOR = "editor-key-0123456789"

FACTS = [
    {"prompt": "Who is the CEO of Acme?", "target": "Jane Doe", "subject": "Acme"},
    {"prompt": "Which river flows through Cairo?", "target": "The Amazon", "metadata": {"ticket": "OPS-7"}},
    {"prompt": "Who wrote Hamlet?", "target": "Christopher Marlowe", "rephrases": ["Who is the author of Hamlet?"]},
]


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'scen.db'}"
    return request.getfixturevalue("postgres_url")


def total(client) -> int:
    return client.get("/edits").json()["total"]


def test_batch_trained_in_order_and_routed(tmp_path, sqlite_url):
    with running(make_settings(tmp_path, sqlite_url)) as client:
        r = client.post("/edits/batch", json={"edits": FACTS})
        assert r.status_code == 202, r.text
        body = r.json()
        assert len(body["ids"]) == 3 and [e["id"] for e in body["items"]] == body["ids"]
        assert [e["prompt"] for e in body["items"]] == [f["prompt"] for f in FACTS]
        assert all(e["status"] == "queued" for e in body["items"])
        assert body["items"][1]["metadata"] == {"ticket": "OPS-7"}
        done = [wait_status(client, i, {"active"}, timeout=60) for i in body["ids"]]
        # Trained one after another in the order posted, by the one worker and its one model.
        assert [e["activated_at"] for e in done] == sorted(e["activated_at"] for e in done)
        assert len({e["worker"] for e in done}) == 1
        served = client.app.state.service.served
        assert served.editor.edit_ids == body["ids"]
        for fact, edit_id in zip(FACTS, body["ids"]):
            out = client.post("/generate", json={"prompt": fact["prompt"], "max_new_tokens": 8}).json()
            assert out["routing"]["edit_id"] == edit_id
        events = client.get(f"/edits/{body['ids'][0]}/events").json()["items"]
        assert events[0]["event"] == "created" and events[0]["details"] == {"batch": 3}


def test_any_bad_item_refuses_the_batch(tmp_path, db_url):
    settings = make_settings(tmp_path, db_url, max_batch_edits=3)
    with running(settings) as client:
        # Schema: the index of the item, nothing written.
        bad = [FACTS[0], FACTS[1], {"prompt": "  ", "target": "x"}]
        r = client.post("/edits/batch", json={"edits": bad})
        assert r.status_code == 422 and r.json()["index"] == 2, r.text
        assert r.json()["error"].startswith("edits.2.prompt")
        # The engine's checks: a subject not in the prompt.
        r = client.post("/edits/batch", json={"edits": [FACTS[0], {**FACTS[1], "subject": "Paris"}]})
        assert r.status_code == 422 and r.json()["error_type"] == "invalid_edit", r.text
        assert r.json()["index"] == 1 and r.json()["error"].startswith("edits[1]: ")
        # The same change twice in one batch.
        r = client.post("/edits/batch", json={"edits": [FACTS[0], FACTS[1], {**FACTS[0], "target": "jane  DOE"}]})
        assert r.status_code == 422 and r.json()["index"] == 2 and "edits[0]" in r.json()["error"], r.text
        # More than SCEN_MAX_BATCH_EDITS, and none at all.
        r = client.post("/edits/batch", json={"edits": [*FACTS, {"prompt": "Who?", "target": "Me"}]})
        assert r.status_code == 422 and "at most 3 edits" in r.json()["error"], r.text
        assert client.post("/edits/batch", json={"edits": []}).status_code == 422
        assert total(client) == 0

        # A duplicate of a waiting or active edit, named with its id.
        first = client.post("/edits", json=FACTS[1]).json()["id"]
        r = client.post("/edits/batch", json={"edits": [FACTS[0], FACTS[1]]})
        assert r.status_code == 409, r.text
        assert r.json() | {"error": None} == {"error": None, "error_type": "duplicate_edit", "edit_id": first,
                                              "index": 1}
        assert total(client) == 1
        # Once it is active, a batch with another target for its prompt supersedes it.
        wait_status(client, first, {"active"}, timeout=60)
        r = client.post("/edits/batch", json={"edits": [{**FACTS[1], "target": "The Nile"}, FACTS[0]]})
        assert r.status_code == 202, r.text
        newer = r.json()["ids"][0]
        wait_status(client, newer, {"active"}, timeout=60)
        assert wait_status(client, first, {"superseded"})["superseded_by"] == newer


def test_batch_idempotency(tmp_path, sqlite_url):
    with running(make_settings(tmp_path, sqlite_url)) as client:
        headers = {"Idempotency-Key": "import-2026-11"}
        first = client.post("/edits/batch", json={"edits": FACTS[:2]}, headers=headers)
        assert first.status_code == 202
        again = client.post("/edits/batch", json={"edits": FACTS[:2]}, headers=headers)
        assert again.status_code == 200 and again.headers["Idempotent-Replayed"] == "true"
        assert again.json()["ids"] == first.json()["ids"]
        # The key with another batch: a changed item, fewer items, more items.
        changed = client.post("/edits/batch", json={"edits": [FACTS[0], {**FACTS[1], "target": "x"}]},
                              headers=headers)
        assert changed.status_code == 409 and changed.json()["error_type"] == "idempotency_conflict"
        assert changed.json()["index"] == 1
        for edits in (FACTS[:1], FACTS):
            r = client.post("/edits/batch", json={"edits": edits}, headers=headers)
            assert r.status_code == 409 and r.json()["error_type"] == "idempotency_conflict", r.text
        assert total(client) == 2


def test_batch_needs_the_editor_role(tmp_path, sqlite_url):
    settings = make_settings(tmp_path, sqlite_url, api_keys=f"r:reader:{READER},e:editor:{EDITOR}")
    with running(settings) as client:
        r = client.post("/edits/batch", json={"edits": FACTS[:1]}, headers={"Authorization": f"Bearer {READER}"})
        assert r.status_code == 403
        assert client.post("/edits/batch", json={"edits": FACTS[:1]}).status_code == 401
        r = client.post("/edits/batch", json={"edits": FACTS[:1]}, headers={"Authorization": f"Bearer {EDITOR}"})
        assert r.status_code == 202
        events = client.get(f"/edits/{r.json()['ids'][0]}/events",
                            headers={"Authorization": f"Bearer {READER}"}).json()["items"]
        assert events[0]["actor"] == "e" and events[0]["request_id"]
