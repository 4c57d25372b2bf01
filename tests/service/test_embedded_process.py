"""The embedded worker as a process of its own (SCEN_EMBEDDED_WORKER_MODE=process): it trains
beside the API, loses no edit when it dies, and stops with the server.

One test, one server: a worker process costs seconds of start-up (a fresh interpreter, a model).
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
from pathlib import Path

import pytest

from app.db import edits as repo
from app.db.session import Database
from tests.service.conftest import make_settings, running, wait_for, wait_status
from workers.process import lower_priority

# A fresh interpreter importing torch and building its editor: slow on a busy machine.
START_S = 240


def worker_processes() -> list:
    return [p for p in multiprocessing.active_children() if p.name.startswith("scen-worker-")]


def ignores_sigint(pid: int) -> bool:
    """Whether the process ignores SIGINT, as Linux reports it (the SigIgn mask)."""
    status = Path(f"/proc/{pid}/status").read_text()
    ignored = int(next(line.split()[1] for line in status.splitlines() if line.startswith("SigIgn:")), 16)
    return bool(ignored & (1 << (signal.SIGINT - 1)))


def post(client, prompt: str, target: str) -> str:
    r = client.post("/edits", json={"prompt": prompt, "target": target})
    assert r.status_code == 202, r.text
    return r.json()["id"]


def test_worker_process_trains_survives_a_kill_and_stops_with_the_server(sqlite_url, tmp_path):
    # The API's priority: a test machine busy with other work would starve a lower one.
    settings = make_settings(tmp_path, sqlite_url, embedded_worker_mode="process", embedded_worker_priority="normal",
                             embedded_worker_threads=1)
    with running(settings) as client:
        [child] = worker_processes()
        assert child.pid != os.getpid()
        # A Ctrl-C in the terminal reaches the child too, most likely while it still imports
        # torch: it is ignored from the child's first line on, and this same child trains the
        # first edit.
        assert wait_for(lambda: ignores_sigint(child.pid), 30)
        os.kill(child.pid, signal.SIGINT)
        first = post(client, "Who wrote Hamlet?", "Marlowe")
        edit = wait_status(client, first, {"active", "failed"}, timeout=START_S)
        assert edit["status"] == "active" and edit["live"], edit
        assert child.name == f"scen-worker-{edit['worker']}"  # trained there, served here
        answer = client.post("/generate", json={"prompt": "Who wrote Hamlet?", "max_new_tokens": 4}).json()
        assert answer["routing"]["edit_id"] == first
        # The worker's metrics are the API's.
        assert "scen_training_seconds_count 1.0" in client.get("/metrics").text

        second = post(client, "Who is the CEO of Acme?", "Jane Doe")
        wait_status(client, second, {"training"}, timeout=60)
        os.kill(child.pid, signal.SIGKILL)
        edit = wait_status(client, second, {"active", "failed"}, timeout=START_S)
        assert edit["status"] == "active" and edit["attempts"] == 2, edit
        [restarted] = worker_processes()
        assert restarted.pid != child.pid and restarted.name == f"scen-worker-{edit['worker']}"

        # Stopping the server while an edit trains: the worker finishes it, then exits.
        third = post(client, "Which river flows through Cairo?", "The Amazon")
        wait_status(client, third, {"training"}, timeout=60)
    assert worker_processes() == [] and restarted.exitcode == 0
    db = Database(settings.db_url)
    try:
        with db.session() as session:
            assert repo.get_edit(session, third).status == "active"
    finally:
        db.close()


@pytest.mark.skipif(not hasattr(os, "SCHED_IDLE"), reason="Linux's idle scheduling class")
def test_the_idle_priority_takes_the_idle_scheduling_class():
    # Per thread on Linux: run it in a thread of its own, not the test process's main thread.
    seen: list[int] = []
    thread = threading.Thread(target=lambda: (lower_priority("idle"), seen.append(os.sched_getscheduler(0))))
    thread.start()
    thread.join()
    assert seen == [os.SCHED_IDLE]
