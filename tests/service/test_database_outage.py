"""A worker that loses the database keeps its edit and finishes it once the database is back:
no delivery burnt, the attempt count right, no file left over."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from sqlalchemy import make_url

from tests.service.conftest import make_settings, running, wait_status
from tests.service.tcp_proxy import CuttableProxy
from tests.service.workers import start_worker

OUTAGE_S = 3.0


@pytest.fixture
def proxy(postgres_url):
    url = make_url(postgres_url)
    proxy = CuttableProxy(url.host or "127.0.0.1", url.port or 5432)
    proxy.url = url.set(port=proxy.port).render_as_string(hide_password=False)
    yield proxy
    proxy.close()


@pytest.mark.parametrize("cut_at", ["before_training", "after_save"])
def test_worker_finishes_an_edit_across_a_database_outage(cut_at, proxy, postgres_url, redis_url, redis_prefix,
                                                          tmp_path):
    # Messages left idle 0.3 s are reclaimed, so an outage of several seconds would use up
    # both deliveries if the worker let go of its message.
    limits = {"embedded_worker": False, "claim_idle_ms": 300, "max_deliveries": 2}
    api = make_settings(tmp_path, postgres_url, redis_url, redis_prefix, **limits)
    # Only the worker reaches the database through the proxy; the API stays up to watch.
    worker = make_settings(tmp_path, proxy.url, redis_url, redis_prefix, db_retry_seconds=60, **limits)

    def outage() -> None:
        proxy.cut()
        threading.Timer(OUTAGE_S, proxy.restore).start()

    cut = threading.Event()

    def cut_after_save(_edit_id: str) -> None:  # between writing the expert file and committing
        if not cut.is_set():
            cut.set()
            outage()

    with running(api) as client, start_worker(worker, after_save=cut_after_save if cut_at == "after_save" else None):
        if cut_at == "before_training":
            outage()
        edit_id = client.post("/edits", json={"prompt": "Who is the CEO of Acme?", "target": "Jane Doe"}).json()["id"]
        edit = wait_status(client, edit_id, {"active", "failed"}, timeout=OUTAGE_S + 30)
    assert edit["status"] == "active", edit
    assert edit["attempts"] == 1 and edit["error"] is None
    files = sorted(Path(api.data_dir, "experts").glob(f"{edit_id}.*"))
    assert [f.name for f in files] == [Path(edit["expert_path"]).name]
