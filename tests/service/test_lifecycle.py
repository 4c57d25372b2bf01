"""The full edit lifecycle through HTTP, with the worker running."""

from __future__ import annotations

import pytest

from tests.service.conftest import make_settings, running, wait_for, wait_status

PROMPT = "Who is the CEO of Acme?"
TARGET = "Jane Doe"


def _settings(kind: str, request, tmp_path):
    db, queue = kind.split("-")
    db_url = request.getfixturevalue("sqlite_url" if db == "sqlite" else "postgres_url")
    if queue == "memory":
        return make_settings(tmp_path, db_url)
    redis_url = request.getfixturevalue("redis_url")
    return make_settings(tmp_path, db_url, redis_url, request.getfixturevalue("redis_prefix"),
                         embedded_worker=True)


@pytest.mark.parametrize("kind", ["sqlite-memory", "sqlite-redis", "postgres-redis"])
def test_edit_lifecycle(kind, request, tmp_path):
    settings = _settings(kind, request, tmp_path)
    with running(settings) as client:
        before = client.post("/generate", json={"prompt": PROMPT, "max_new_tokens": 8}).json()
        assert before["routing"] == {"edit_id": None, "activation": 0.0}
        v0 = before["model_version"]

        r = client.post("/edits", json={"prompt": PROMPT, "target": TARGET, "rephrases": ["Acme's CEO is?"],
                                        "metadata": {"ticket": 7}})
        assert r.status_code == 202, r.text
        posted = r.json()
        assert posted["status"] == "queued" and r.headers["Location"] == f"/edits/{posted['id']}"
        edit_id = posted["id"]

        edit = wait_status(client, edit_id, {"active"})
        assert edit["metadata"] == {"ticket": 7}
        assert edit["expert_path"].startswith("experts/") and len(edit["expert_sha256"]) == 64
        assert (settings.data_dir / edit["expert_path"]).is_file()
        m = edit["metrics"]
        assert m["steps"] >= 1 and m["seconds"] > 0 and m["loss"] >= 0 and m["activation"] > 0.5
        assert len(m["rephrase_activations"]) == 1
        assert edit["activated_at"] >= edit["started_at"] >= edit["created_at"]
        assert wait_for(lambda: client.get(f"/edits/{edit_id}").json()["live"], 5)

        after = client.post("/generate", json={"prompt": PROMPT, "max_new_tokens": 8}).json()
        assert after["text"].startswith(TARGET)
        assert after["routing"]["edit_id"] == edit_id and after["routing"]["activation"] > 0.65
        assert after["model_version"] > v0

        listed = client.get("/edits").json()
        assert listed["total"] == 1 and listed["items"][0]["id"] == edit_id
        assert client.get("/edits", params={"status": "active", "q": "acme"}).json()["total"] == 1
        assert client.get("/edits", params={"status": "failed"}).json()["total"] == 0

        r = client.post(f"/edits/{edit_id}/rollback", json={"reason": "test"})
        assert r.status_code == 200 and r.json()["status"] == "rolled_back" and not r.json()["live"]
        again = client.post("/generate", json={"prompt": PROMPT, "max_new_tokens": 8}).json()
        assert again["routing"]["edit_id"] is None
        assert again["text"] == before["text"]
        assert again["model_version"] > after["model_version"]

        second = client.post(f"/edits/{edit_id}/rollback", json={"reason": "test"})
        assert second.status_code == 200 and second.json()["rolled_back_at"] == r.json()["rolled_back_at"]
        assert client.get("/ready").json()["live_edits"] == 0


def test_list_newest_first_and_paging(sqlite_url, tmp_path):
    with running(make_settings(tmp_path, sqlite_url)) as client:
        ids = [client.post("/edits", json={"prompt": f"Question {i}?", "target": f"A{i}"}).json()["id"]
               for i in range(5)]
        page = client.get("/edits", params={"limit": 2, "offset": 1}).json()
        assert page["total"] == 5
        assert [e["id"] for e in page["items"]] == [ids[3], ids[2]]
        assert client.get("/edits", params={"q": "question 4"}).json()["items"][0]["id"] == ids[4]
        assert client.get("/edits", params={"q": "%"}).json()["total"] == 0
        for i in ids:
            wait_status(client, i, {"active"})


def test_idempotent_post(sqlite_url, tmp_path):
    with running(make_settings(tmp_path, sqlite_url)) as client:
        body = {"prompt": PROMPT, "target": TARGET}
        first = client.post("/edits", json=body, headers={"Idempotency-Key": "k-1"})
        retry = client.post("/edits", json=body, headers={"Idempotency-Key": "k-1"})
        assert first.status_code == 202 and retry.status_code == 200
        assert retry.headers["Idempotent-Replayed"] == "true"
        assert retry.json()["id"] == first.json()["id"]
        other = client.post("/edits", json={**body, "target": "John Roe"}, headers={"Idempotency-Key": "k-1"})
        assert other.status_code == 409 and other.json()["error_type"] == "idempotency_conflict"
        assert client.get("/edits").json()["total"] == 1
        wait_status(client, first.json()["id"], {"active"})
        replay = client.post("/edits", json=body, headers={"Idempotency-Key": "k-1"}).json()
        assert replay["status"] == "active"
        assert client.get("/ready").json()["live_edits"] == 1


def test_rollback_of_queued_edit_cancels_it(redis_url, redis_prefix, sqlite_url, tmp_path):
    from tests.service.workers import start_worker

    settings = make_settings(tmp_path, sqlite_url, redis_url, redis_prefix, embedded_worker=False)
    with running(settings) as client:
        edit_id = client.post("/edits", json={"prompt": PROMPT, "target": TARGET}).json()["id"]
        r = client.post(f"/edits/{edit_id}/rollback", json={"reason": "test"})
        assert r.json()["status"] == "rolled_back"
        with start_worker(settings) as worker:
            assert wait_for(lambda: worker.queue.pending() == 0 and worker.queue.client.xlen(
                worker.queue.stream) == 0, 10)
        edit = client.get(f"/edits/{edit_id}").json()
        assert edit["status"] == "rolled_back" and edit["expert_path"] is None and not edit["live"]


def test_generate_batches_concurrent_requests(sqlite_url, tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    settings = make_settings(tmp_path, sqlite_url, batch_window_ms=50)
    with running(settings) as client:
        prompts = [f"Question number {i}?" for i in range(8)]
        solo = [client.post("/generate", json={"prompt": p, "max_new_tokens": 6}).json()["text"] for p in prompts]
        service = client.app.state.service
        service.metrics.batch_sizes.clear()
        with ThreadPoolExecutor(8) as pool:
            batched = list(pool.map(
                lambda p: client.post("/generate", json={"prompt": p, "max_new_tokens": 6}).json()["text"],
                prompts))
        assert batched == solo  # left padding: batching does not change greedy answers
        assert max(service.metrics.batch_sizes) > 1
        assert sum(service.metrics.batch_sizes) == 8
        assert "scen_generate_batch_size" in client.get("/metrics").text
