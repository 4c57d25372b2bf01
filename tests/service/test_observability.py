"""/metrics after a short session has every family operators expect; a `scen worker` process
logs JSON lines carrying the id of the request that posted the edit, serves its own metrics and
answers `scen worker --check`."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from tests.service.conftest import make_settings, running, wait_for, wait_status
from tests.service.test_worker_process import model_dir  # noqa: F401  (fixture)


def families(text: str) -> dict[str, dict[tuple, float]]:
    """{family: {(sample name, sorted labels): value}}."""
    out: dict[str, dict[tuple, float]] = {}
    for family in text_string_to_metric_families(text):
        samples = out.setdefault(family.name, {})
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(found: dict, family: str, sample: str, **labels) -> float:
    return found[family][(sample, tuple(sorted(labels.items())))]


def test_metrics_after_a_short_session(tmp_path, sqlite_url):
    with running(make_settings(tmp_path, sqlite_url)) as client:
        edit_id = client.post("/edits", json={"prompt": "Who is the CEO of Acme?", "target": "Jane Doe"}).json()["id"]
        wait_status(client, edit_id, {"active"}, timeout=60)
        client.get(f"/edits/{edit_id}")
        client.get("/edits/nope")
        client.post("/generate", json={"prompt": "Who is the CEO of Acme?", "max_new_tokens": 4})
        model = client.get("/v1/models").json()["data"][0]["id"]
        with client.stream("POST", "/v1/chat/completions", json={
                "model": model, "stream": True, "max_tokens": 3,
                "messages": [{"role": "user", "content": "Who wrote Hamlet?"}]}) as stream:
            assert "[DONE]" in "".join(stream.iter_text())
        client.post("/edits", content=b"{", headers={"Content-Type": "application/json"})
        text = client.get("/metrics").text

    found = families(text)
    expected = {
        # requests per route, by the instrumentator
        "http_requests", "http_request_duration_seconds", "http_request_duration_highr_seconds",
        # generation
        "scen_generation_seconds", "scen_generation_tokens", "scen_generate_requests", "scen_generate_batch_size",
        # edits: posted, trained, activated, failed, by status; the queue
        "scen_edits_created", "scen_edit_post_to_active_seconds", "scen_training_seconds", "scen_training_steps",
        "scen_edit_failures", "scen_edits", "scen_queue_depth", "scen_queue_taken",
        "scen_queue_oldest_waiting_seconds", "scen_state_up", "scen_worker_heartbeat_timestamp_seconds",
        # the live model
        "scen_live_edits", "scen_model_version", "scen_unserved_edits",
        # the process
        "process_cpu_seconds", "process_resident_memory_bytes", "process_open_fds", "python_info",
    }
    assert expected <= set(found), sorted(expected - set(found))

    requests = found["http_requests"]
    assert value(found, "http_requests", "http_requests_total", handler="/edits/{edit_id}", method="GET",
                 status="200") >= 1
    assert value(found, "http_requests", "http_requests_total", handler="/edits/{edit_id}", method="GET",
                 status="404") == 1
    assert value(found, "http_requests", "http_requests_total", handler="/edits", method="POST", status="422") == 1
    assert any(labels == (("handler", "/generate"), ("method", "POST"))
               for name, labels in found["http_request_duration_seconds"] if name.endswith("_count"))
    assert requests
    for mode in ("whole", "stream"):
        assert value(found, "scen_generation_seconds", "scen_generation_seconds_count", mode=mode) == 1
    assert value(found, "scen_generation_tokens", "scen_generation_tokens_total", kind="prompt") > 0
    assert value(found, "scen_generation_tokens", "scen_generation_tokens_total", kind="completion") > 0
    assert value(found, "scen_edit_post_to_active_seconds", "scen_edit_post_to_active_seconds_count") == 1
    assert value(found, "scen_training_seconds", "scen_training_seconds_count") == 1
    assert value(found, "scen_training_steps", "scen_training_steps_sum") >= 1
    assert value(found, "scen_edits", "scen_edits", status="active") == 1
    assert value(found, "scen_edits", "scen_edits", status="failed") == 0
    for reason in ("invalid_edit", "training_error", "abandoned"):
        assert value(found, "scen_edit_failures", "scen_edit_failures_total", reason=reason) == 0
    assert value(found, "scen_queue_depth", "scen_queue_depth") == 0
    assert value(found, "scen_queue_oldest_waiting_seconds", "scen_queue_oldest_waiting_seconds") == 0
    assert value(found, "scen_state_up", "scen_state_up", source="database") == 1
    assert value(found, "process_resident_memory_bytes", "process_resident_memory_bytes") > 0


def test_oldest_waiting_edit_and_queue_depth(tmp_path, sqlite_url, redis_url, redis_prefix):
    # No worker: posted edits wait.
    settings = make_settings(tmp_path, sqlite_url, redis_url, redis_prefix, embedded_worker=False)
    with running(settings) as client:
        for prompt in ("Who is the CEO of Acme?", "Who wrote Hamlet?"):
            assert client.post("/edits", json={"prompt": prompt, "target": "x"}).status_code == 202
        assert wait_for(lambda: value(families(client.get("/metrics").text), "scen_queue_oldest_waiting_seconds",
                                      "scen_queue_oldest_waiting_seconds") > 0.05, 5)
        found = families(client.get("/metrics").text)
    assert value(found, "scen_queue_depth", "scen_queue_depth") == 2
    assert value(found, "scen_edits", "scen_edits", status="queued") == 2
    assert value(found, "scen_state_up", "scen_state_up", source="queue") == 1
    # A separate worker's families are on its own port, not here.
    assert "scen_training_seconds" not in found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_worker_process_logs_metrics_and_health(tmp_path, sqlite_url, redis_url, redis_prefix,
                                                model_dir):  # noqa: F811
    settings = make_settings(tmp_path, sqlite_url, redis_url, redis_prefix, embedded_worker=False)
    port = free_port()
    env = {**os.environ, "SCEN_DATABASE_URL": settings.db_url, "SCEN_REDIS_URL": settings.queue_url,
           "SCEN_REDIS_PREFIX": settings.redis_prefix, "SCEN_DATA_DIR": str(settings.data_dir),
           "SCEN_MODEL": str(model_dir), "SCEN_DEVICE": "cpu", "SCEN_LOG_JSON": "true",
           "SCEN_WORKER_METRICS_PORT": str(port), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    scen = shutil.which("scen") or str(Path(sys.executable).with_name("scen"))

    def check() -> subprocess.CompletedProcess:
        return subprocess.run([scen, "worker", "--check"], env=env, cwd=tmp_path, capture_output=True, text=True,
                              timeout=60)

    not_yet = check()
    assert not_yet.returncode == 1 and "no heartbeat" in not_yet.stderr
    log_path = tmp_path / "worker.log"
    with running(settings) as client:
        worker = subprocess.Popen([scen, "worker"], env=env, cwd=tmp_path, stdout=log_path.open("w"),
                                  stderr=subprocess.STDOUT)
        try:
            r = client.post("/edits", json={"prompt": "Who wrote Hamlet?", "target": "Marlowe"},
                            headers={"X-Request-Id": "req-observe-1"})
            edit_id = r.json()["id"]
            wait_status(client, edit_id, {"active"}, timeout=90)
            alive = check()
            assert alive.returncode == 0 and "alive" in alive.stdout, alive.stderr
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
                found = families(answer.read().decode())
            assert value(found, "scen_training_seconds", "scen_training_seconds_count") == 1
            assert value(found, "scen_edit_post_to_active_seconds", "scen_edit_post_to_active_seconds_count") == 1
            assert "process_cpu_seconds" in found and "scen_worker_heartbeat_timestamp_seconds" in found
            worker.send_signal(signal.SIGTERM)
            assert worker.wait(30) == 0
        finally:
            if worker.poll() is None:
                worker.kill()
                worker.wait(10)
    assert check().returncode == 1

    lines = [line for line in log_path.read_text().splitlines() if line.strip()]
    entries = [json.loads(line) for line in lines]  # every line is one JSON object: no progress bars
    mine = [e for e in entries if e.get("edit_id") == edit_id]
    assert mine and all(e["request_id"] == "req-observe-1" for e in mine)
    messages = " | ".join(e["message"] for e in mine)
    assert f"training edit {edit_id}" in messages and f"edit {edit_id} active" in messages
