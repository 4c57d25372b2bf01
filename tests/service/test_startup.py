"""Posting an edit does not wait for the model; an API that can never serve its model exits."""

from __future__ import annotations

import socket
import threading
import time

from app.api.server import serve
from tests.service.conftest import make_settings, running
from tests.utils.tiny_models import tiny_model


def test_post_does_not_wait_for_generation_or_training(sqlite_url, tmp_path):
    settings = make_settings(tmp_path, sqlite_url, embedded_worker=False)
    with running(settings) as client:
        editor = client.app.state.service.served.editor
        held, release = threading.Event(), threading.Event()

        def busy_model():  # what a long generation or training does: hold the editor's lock
            with editor._lock:
                held.set()
                release.wait(10)

        threading.Thread(target=busy_model, daemon=True).start()
        assert held.wait(5)
        try:
            started = time.monotonic()
            ok = client.post("/edits", json={"prompt": "Who is the CEO of Acme?", "target": "Jane Doe"})
            too_long = client.post("/edits", json={"prompt": "q?", "target": "word " * 200})
            elapsed = time.monotonic() - started
        finally:
            release.set()
    assert ok.status_code == 202, ok.text
    assert too_long.status_code == 422 and too_long.json()["error_type"] == "invalid_edit"
    assert elapsed < 2, f"posting waited {elapsed:.1f}s for the model"


def test_serve_exits_with_the_reason_when_the_model_cannot_be_served(sqlite_url, tmp_path):
    model_dir = tmp_path / "tiny-llama"
    lm = tiny_model("llama")
    lm.model.save_pretrained(model_dir)
    lm.tokenizer.save_pretrained(model_dir)
    # Valid as a setting, but the tiny model has no layer 99: only known once the model has loaded.
    settings = make_settings(tmp_path, sqlite_url, model=str(model_dir), device="cpu", engine=["layer=99"],
                             cache_dir=tmp_path / "cache")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    outcome: dict[str, BaseException] = {}

    def run():
        try:
            serve(settings, port=port)
        except BaseException as exc:
            outcome["exit"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(60)
    assert not thread.is_alive(), "scen serve is still up although its model can never be served"
    assert isinstance(outcome.get("exit"), SystemExit) and "layer 99" in str(outcome["exit"]), outcome
