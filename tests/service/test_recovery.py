"""Restarts and dead workers: nothing lost, nothing duplicated."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.service.conftest import make_settings, running, wait_for, wait_status
from tests.service.workers import SimulatedCrash, start_worker

EDITS = [("Who is the CEO of Acme?", "Jane Doe"), ("Which river flows through Cairo?", "The Amazon"),
         ("How many legs does a spider have?", "Six legs")]


@pytest.mark.parametrize("db", ["sqlite", "postgres"])
def test_restart_restores_active_edits(db, request, tmp_path):
    settings = make_settings(tmp_path, request.getfixturevalue(f"{db}_url"))
    with running(settings) as client:
        ids = [client.post("/edits", json={"prompt": p, "target": t}).json()["id"] for p, t in EDITS]
        for edit_id in ids:
            wait_status(client, edit_id, {"active"})
        client.post(f"/edits/{ids[1]}/rollback", json={"reason": "test"})
        answers = {p: client.post("/generate", json={"prompt": p, "max_new_tokens": 8}).json() for p, _ in EDITS}

    with running(settings) as client:  # a new process: fresh model, state only from DB + files
        ready = client.get("/ready").json()
        assert ready["live_edits"] == 2
        assert client.app.state.service.served.editor.edit_ids == [ids[0], ids[2]]
        for prompt, _ in EDITS:
            again = client.post("/generate", json={"prompt": prompt, "max_new_tokens": 8}).json()
            assert again["text"] == answers[prompt]["text"]
            assert again["routing"]["edit_id"] == answers[prompt]["routing"]["edit_id"]
        assert client.post("/generate", json={"prompt": EDITS[0][0], "max_new_tokens": 8}).json()[
            "text"].startswith(EDITS[0][1])


def test_restart_finishes_edits_left_queued(sqlite_url, tmp_path):
    """The in-process queue dies with the process; queued edits are re-sent from the database."""
    settings = make_settings(tmp_path, sqlite_url, embedded_worker=False)
    with running(settings) as client:
        edit_id = client.post("/edits", json={"prompt": EDITS[0][0], "target": EDITS[0][1]}).json()["id"]
    with running(make_settings(tmp_path, sqlite_url)) as client:
        assert wait_status(client, edit_id, {"active"})["attempts"] == 1


def test_api_follows_external_worker_and_reconciles(redis_url, redis_prefix, sqlite_url, tmp_path):
    settings = make_settings(tmp_path, sqlite_url, redis_url, redis_prefix, embedded_worker=False)
    with running(settings) as client, start_worker(settings):
        assert client.get("/ready").json()["worker"] == "external"
        edit_id = client.post("/edits", json={"prompt": EDITS[0][0], "target": EDITS[0][1]}).json()["id"]
        wait_status(client, edit_id, {"active"})
        # The event (or, failing it, the periodic reconcile) appends the expert without a restart.
        assert wait_for(lambda: client.app.state.service.served.editor.edit_ids == [edit_id], 5)
        out = client.post("/generate", json={"prompt": EDITS[0][0], "max_new_tokens": 8}).json()
        assert out["routing"]["edit_id"] == edit_id and out["text"].startswith(EDITS[0][1])


@pytest.mark.parametrize("db", ["sqlite", "postgres"])
def test_worker_killed_mid_training(db, request, redis_url, redis_prefix, tmp_path):
    settings = make_settings(tmp_path, request.getfixturevalue(f"{db}_url"), redis_url, redis_prefix,
                             embedded_worker=False, claim_idle_ms=300)

    def crash(edit_id):
        raise SimulatedCrash(edit_id)

    with running(settings) as client:
        edit_id = client.post("/edits", json={"prompt": EDITS[0][0], "target": EDITS[0][1]}).json()["id"]
        with start_worker(settings, name="doomed", after_save=crash) as doomed:
            assert wait_for(lambda: not doomed.thread.is_alive(), 10)
        # Died after writing its file, before committing or acknowledging.
        assert client.get(f"/edits/{edit_id}").json()["status"] == "training"
        assert doomed.queue.client.xpending(doomed.queue.stream, "workers")["pending"] == 1

        with start_worker(settings, name="survivor") as survivor:
            edit = wait_status(client, edit_id, {"active"})
            assert wait_for(lambda: survivor.queue.pending() == 0, 5)
            pending = survivor.queue.client.xpending(survivor.queue.stream, "workers")
            assert pending["pending"] == 0
        assert edit["attempts"] == 2 and edit["error"] is None
        files = sorted(Path(settings.data_dir, "experts").glob(f"{edit_id}.*"))
        assert [f.name for f in files] == [Path(edit["expert_path"]).name]
        assert wait_for(lambda: client.app.state.service.served.editor.edit_ids == [edit_id], 5)
        assert client.get("/edits", params={"status": "active"}).json()["total"] == 1


def test_edit_fails_after_max_deliveries(redis_url, redis_prefix, sqlite_url, tmp_path):
    settings = make_settings(tmp_path, sqlite_url, redis_url, redis_prefix, embedded_worker=False,
                             claim_idle_ms=100, max_deliveries=2)

    def crash(edit_id):
        raise SimulatedCrash(edit_id)

    with running(settings) as client:
        edit_id = client.post("/edits", json={"prompt": EDITS[0][0], "target": EDITS[0][1]}).json()["id"]
        for _ in range(2):
            with start_worker(settings, after_save=crash) as doomed:
                assert wait_for(lambda: not doomed.thread.is_alive(), 10)
        with start_worker(settings) as last:
            edit = wait_status(client, edit_id, {"failed", "active"})
            assert wait_for(lambda: last.queue.pending() == 0, 5)
        assert edit["status"] == "failed"
        assert "gave up after 2 deliveries" in edit["error"]
        assert edit["attempts"] == 2
        assert not list(Path(settings.data_dir, "experts").glob(f"{edit_id}.*"))
        r = client.post(f"/edits/{edit_id}/rollback", json={"reason": "test"})
        assert r.status_code == 409 and r.json()["error_type"] == "conflict"


def test_slow_worker_keeps_its_edit(redis_url, redis_prefix, sqlite_url, tmp_path):
    """A worker still alive past the claim time heartbeats, so nobody trains its edit twice."""
    import time

    settings = make_settings(tmp_path, sqlite_url, redis_url, redis_prefix, embedded_worker=False,
                             claim_idle_ms=300)
    with running(settings) as client:
        with start_worker(settings, name="slow", after_save=lambda _id: time.sleep(1.2)):
            edit_id = client.post("/edits", json={"prompt": EDITS[0][0], "target": EDITS[0][1]}).json()["id"]
            assert wait_for(lambda: client.get(f"/edits/{edit_id}").json()["status"] == "training", 5)
            with start_worker(settings, name="eager"):
                edit = wait_status(client, edit_id, {"active"})
        assert edit["attempts"] == 1 and edit["worker"] == "slow"
        assert len(list(Path(settings.data_dir, "experts").glob(f"{edit_id}.*"))) == 1


@pytest.mark.parametrize("db", ["sqlite", "postgres"])
def test_edit_committed_but_never_enqueued_is_sent_again(db, request, redis_url, redis_prefix, tmp_path):
    """An API process that dies between its commit and XADD leaves a queued edit with no message."""
    from app.db import edits as repo
    from app.live import open_database

    settings = make_settings(tmp_path, request.getfixturevalue(f"{db}_url"), redis_url, redis_prefix,
                             embedded_worker=False, requeue_after_s=0.3)
    with running(settings) as client:
        db_ = open_database(settings)
        with db_.session() as session:
            orphan, _ = repo.create_edit(session, EDITS[0][0], EDITS[0][1], [], {}, None)
        db_.close()
        with start_worker(settings) as worker:
            edit = wait_status(client, orphan.id, {"active"})
            assert worker.requeue_lost() == []  # nothing else is waiting
        assert edit["attempts"] == 1
