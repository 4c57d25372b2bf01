"""Redis killed and restarted empty, PostgreSQL stopped and started, each while an edit is in a
worker's hands and others wait: posts meanwhile are refused with 503 and write nothing, and every
accepted edit ends active once."""

from __future__ import annotations

import time

from tests.faults.conftest import Submitter, assert_clean, edit_text


def refused_while_down(api, i: int) -> dict:
    with api.client() as http:
        prompt, target = edit_text(i)
        r = http.post("/edits", json={"prompt": prompt, "target": target})
    assert r.status_code == 503 and r.headers.get("retry-after"), (r.status_code, r.text)
    return r.json()


def test_redis_killed_and_restarted_empty(cluster, redis_server):
    api = cluster.api()
    worker = cluster.worker(arm=("train",))
    api.wait_ready()
    client = Submitter(api.base_url)
    first = client.post(*edit_text(0))
    assert worker.wait_reached("train") == first
    waiting = [client.post(*edit_text(i)) for i in range(1, 4)]

    redis_server.kill()
    body = refused_while_down(api, 90)
    assert "127.0.0.1" not in body["error"] and str(redis_server.port) not in body["error"]
    # Trained with Redis gone: committed, but its acknowledgement has nowhere to go.
    worker.release("train")
    time.sleep(1)
    redis_server.start()  # empty: the three waiting edits' messages are gone

    later = [client.post(*edit_text(i)) for i in range(4, 6)]
    ledger = cluster.ledger(client.accepted)
    assert_clean(ledger)
    assert ledger.active == 6 and not ledger.failed
    assert all(ledger.deliveries[e] == 1 for e in [first, *waiting, *later]), ledger.deliveries


def test_postgres_stopped_and_started(cluster, postgres_server):
    api = cluster.api()
    worker = cluster.worker(arm=("after_save",))
    api.wait_ready()
    client = Submitter(api.base_url)
    first = client.post(*edit_text(0))
    second = client.post(*edit_text(1))
    assert worker.wait_reached("after_save") == first

    postgres_server.stop()
    try:
        body = refused_while_down(api, 90)
        assert "5432" not in body["error"] and str(postgres_server.port) not in body["error"]
        # The worker commits into the outage: it keeps its message and retries until the database is back.
        worker.release("after_save")
        time.sleep(3)
    finally:
        postgres_server.start()

    third = client.post(*edit_text(2))
    ledger = cluster.ledger(client.accepted)
    assert_clean(ledger)
    assert ledger.active == 3 and not ledger.failed
    assert [ledger.deliveries[e] for e in (first, second, third)] == [1, 1, 1]
    with api.client() as http:
        assert http.get("/ready").json()["live_edits"] == 3
