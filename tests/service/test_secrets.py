"""Passwords in the database and Redis URLs appear in no log line, error body or traceback,
and 503 bodies do not say where the dependencies live."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from pydantic import ValidationError
from sqlalchemy import make_url

from app.settings import Settings, redact_url
from tests.utils.tiny_models import tiny_model

PASSWORD = "pa55-Wh1sper-9e1"
# Nothing listens there: every queue call fails, as when Redis is down.
REDIS_URL = f"redis://:{PASSWORD}@127.0.0.1:1/0"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_answer(get, timeout: float) -> httpx.Response | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            r = get()
            if r is not None:
                return r
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    return None


@pytest.mark.parametrize("log_json", [False, True])
def test_no_password_in_logs_or_responses(log_json, postgres_url, tmp_path):
    # Trust authentication ignores the password, so the database works with one configured.
    database_url = make_url(postgres_url).set(password=PASSWORD).render_as_string(hide_password=False)
    lm = tiny_model("llama")
    lm.model.save_pretrained(tmp_path / "model")
    lm.tokenizer.save_pretrained(tmp_path / "model")
    port = free_port()
    env = {
        **os.environ, "SCEN_DATABASE_URL": database_url, "SCEN_REDIS_URL": REDIS_URL,
        "SCEN_DATA_DIR": str(tmp_path / "data"), "SCEN_CACHE_DIR": str(tmp_path / "cache"),
        "SCEN_MODEL": str(tmp_path / "model"), "SCEN_DEVICE": "cpu", "SCEN_EMBEDDED_WORKER": "false",
        "SCEN_LOG_JSON": str(log_json).lower(), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
    }
    scen = shutil.which("scen") or str(Path(sys.executable).with_name("scen"))
    log_path = tmp_path / "serve.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen([scen, "serve", "--port", str(port)], env=env, stdout=log, stderr=subprocess.STDOUT)
    responses: list[httpx.Response] = []
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:

            def loaded():
                r = client.get("/ready")
                return r if "loading" not in r.text else None

            ready = wait_for_answer(loaded, 90)
            assert ready is not None, log_path.read_text()
            responses += [
                ready,
                client.post("/edits", json={"prompt": "Who is the CEO of Acme?", "target": "Jane Doe"}),
                client.get("/edits"),
                client.post("/generate", json={"prompt": "Hi", "max_new_tokens": 2}),
            ]
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    logged = log_path.read_text()

    assert [r.status_code for r in responses] == [503, 503, 200, 200], [r.text for r in responses]
    assert responses[0].json()["error"] == "the queue is unreachable"
    assert responses[1].json() == {"error": "the queue is unreachable", "error_type": "queue_unavailable"}
    for r in responses:
        shown = r.text + str(r.headers)
        assert PASSWORD not in shown
        if r.status_code == 503:
            assert "127.0.0.1" not in shown and ":1" not in r.json()["error"]
    assert "serving on" in logged and "Redis redis://:***@127.0.0.1:1/0" in logged, logged
    assert "queue is unreachable" in logged  # the detail is in the log, for the operator
    assert PASSWORD not in logged, logged


def test_settings_never_show_the_passwords():
    database_url = f"postgresql+psycopg://scen:{PASSWORD}@db/scen"
    settings = Settings(_env_file=None, database_url=database_url, redis_url=REDIS_URL)
    assert settings.db_url == database_url and settings.queue_url == REDIS_URL
    assert PASSWORD not in repr(settings) and PASSWORD not in str(settings.model_dump())
    # A setting refused is reported without the values given.
    with pytest.raises(ValidationError) as refused:
        Settings(_env_file=None, environment="production", database_url=database_url)
    assert "SCEN_REDIS_URL must be set" in str(refused.value) and PASSWORD not in str(refused.value)


@pytest.mark.parametrize("url,shown", [
    (f"redis://:{PASSWORD}@host:6379/0", "redis://:***@host:6379/0"),
    (f"postgresql+psycopg://scen:{PASSWORD}@db:5432/scen?sslmode=require",
     "postgresql+psycopg://scen:***@db:5432/scen?sslmode=require"),
    ("redis://host:6379/0", "redis://host:6379/0"),
])
def test_redact_url(url, shown):
    assert redact_url(url) == shown
