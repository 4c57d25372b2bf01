"""`scen worker` as a real process: warm shutdown, and a SIGKILLed worker's message reclaimed."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.service.conftest import make_settings, running, wait_for, wait_status
from tests.utils.tiny_models import tiny_model


@pytest.fixture
def model_dir(tmp_path) -> Path:
    lm = tiny_model("llama")
    path = tmp_path / "tiny-llama"
    lm.model.save_pretrained(path)
    lm.tokenizer.save_pretrained(path)
    return path


def spawn_worker(settings, model_dir: Path, log: Path) -> subprocess.Popen:
    env = {
        **os.environ,
        "SCEN_DATABASE_URL": settings.db_url, "SCEN_REDIS_URL": settings.queue_url,
        "SCEN_REDIS_PREFIX": settings.redis_prefix, "SCEN_DATA_DIR": str(settings.data_dir),
        "SCEN_MODEL": str(model_dir), "SCEN_DEVICE": "cpu", "SCEN_CLAIM_IDLE_MS": str(settings.claim_idle_ms),
        "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
    }
    scen = shutil.which("scen") or str(Path(sys.executable).with_name("scen"))
    return subprocess.Popen([scen, "worker"], env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)


def consumers_with_pending(queue) -> dict[str, int]:
    info = queue.client.xpending(queue.stream, "workers")
    return {c["name"]: int(c["pending"]) for c in info.get("consumers") or []}


def test_killed_worker_process(redis_url, redis_prefix, sqlite_url, model_dir, tmp_path):
    settings = make_settings(tmp_path, sqlite_url, redis_url, redis_prefix, embedded_worker=False,
                             claim_idle_ms=500)
    with running(settings) as client:
        queue = client.app.state.service.queue
        first = spawn_worker(settings, model_dir, tmp_path / "first.log")
        try:
            warm = client.post("/edits", json={"prompt": "Who wrote Hamlet?", "target": "Marlowe"}).json()["id"]
            wait_status(client, warm, {"active"}, timeout=60)
            # Frozen while blocked on the stream: Redis hands it the next message, then it dies.
            first.send_signal(signal.SIGSTOP)
            doomed = client.post("/edits", json={"prompt": "Who is the CEO of Acme?", "target": "Jane"}).json()["id"]
            handed_over = wait_for(lambda: sum(consumers_with_pending(queue).values()) == 1, 3)
            first.kill()
        finally:
            first.kill()
            first.wait(10)

        second = spawn_worker(settings, model_dir, tmp_path / "second.log")
        try:
            edit = wait_status(client, doomed, {"active"}, timeout=60)
            assert edit["attempts"] == (2 if handed_over else 1)
            assert wait_for(lambda: queue.pending() == 0, 5)
            live = client.app.state.service.served.editor
            assert wait_for(lambda: live.edit_ids == [warm, doomed], 5)
            # Warm shutdown on SIGTERM.
            second.send_signal(signal.SIGTERM)
            assert second.wait(30) == 0
        finally:
            if second.poll() is None:
                second.kill()
                second.wait(10)
        out = client.post("/generate", json={"prompt": "Who is the CEO of Acme?", "max_new_tokens": 6}).json()
        assert out["routing"]["edit_id"] == doomed
