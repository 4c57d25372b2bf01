"""Worker processes killed with SIGKILL mid-training and between writing the expert file and
committing, and one edit delivered to two live workers: each edit ends active once, with one file."""

from __future__ import annotations

import redis

from tests.faults.conftest import Submitter, assert_clean, data_path, edit_text


def expert_files(cluster, edit_id: str) -> list[str]:
    return sorted(p.name for p in (data_path(cluster) / "experts").glob(f"{edit_id}.*"))


def test_worker_killed_during_training_and_after_writing_its_file(cluster):
    api = cluster.api()
    first = cluster.worker("first", arm=("train",))
    api.wait_ready()
    client = Submitter(api.base_url)
    edit_id = client.post(*edit_text(0))

    assert first.wait_reached("train") == edit_id
    first.kill()
    # Reclaimed once the dead worker's heartbeat stops; this one dies with the file written.
    second = cluster.worker("second", arm=("after_save",))
    assert second.wait_reached("after_save") == edit_id
    assert len(expert_files(cluster, edit_id)) == 1
    second.kill()

    cluster.worker("third")
    others = [client.post(*edit_text(i)) for i in range(1, 4)]
    ledger = cluster.ledger(client.accepted)
    assert_clean(ledger)
    assert ledger.active == 4 and not ledger.failed
    assert ledger.deliveries[edit_id] == 3 and all(ledger.deliveries[e] == 1 for e in others)
    with api.client() as http:
        assert http.get("/ready").json()["live_edits"] == 4

def test_duplicate_delivery(cluster):
    api = cluster.api()
    slow = cluster.worker("slow", arm=("after_save",))
    api.wait_ready()
    client = Submitter(api.base_url)
    edit_id = client.post(*edit_text(0))
    assert slow.wait_reached("after_save") == edit_id
    # Frozen, its heartbeat stops: the message goes to the other worker, which trains it too.
    slow.pause()
    cluster.worker("eager")
    assert cluster.ledger([edit_id]).active == 1
    # Thawed, the first worker finishes its own attempt at an edit that is already active.
    slow.resume()
    slow.release("after_save")

    # The same id sent again on the stream, for a finished edit and for a waiting one.
    queue = redis.Redis.from_url(cluster.deployment.redis_url, decode_responses=True)
    second = client.post(*edit_text(1))
    for duplicate in (edit_id, second, second):
        queue.xadd("scen:edits", {"edit_id": duplicate})
    _wait_stream_empty(queue)
    ledger = cluster.ledger(client.accepted)
    queue.close()
    assert_clean(ledger)
    assert ledger.active == 2 and ledger.deliveries[edit_id] == 2
    assert len(expert_files(cluster, edit_id)) == 1 and len(expert_files(cluster, second)) == 1


def _wait_stream_empty(queue: redis.Redis, timeout: float = 600) -> None:
    import time

    deadline = time.monotonic() + timeout
    while queue.xlen("scen:edits") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert queue.xlen("scen:edits") == 0, queue.xrange("scen:edits")
