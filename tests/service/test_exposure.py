"""Limits on what one client can make the API do: body size, and (when set) request rate."""

from __future__ import annotations

import json

from tests.service.conftest import make_settings, running


def test_oversized_body_is_refused_before_it_is_parsed(sqlite_url, tmp_path):
    with running(make_settings(tmp_path, sqlite_url, embedded_worker=False, max_body_bytes=4096)) as client:
        body = json.dumps({"prompt": "Who is the CEO of Acme?", "target": "x", "metadata": {"blob": "y" * 5000}})
        r = client.post("/edits", content=body, headers={"Content-Type": "application/json"})
        assert r.status_code == 413 and r.json()["error_type"] == "body_too_large", r.text

        def chunks():  # no Content-Length: counted while read
            for _ in range(10):
                yield b" " * 1000

        r = client.post("/edits", content=chunks(), headers={"Content-Type": "application/json"})
        assert r.status_code == 413 and r.json()["error_type"] == "body_too_large", r.text
        assert client.get("/edits").json()["total"] == 0
        assert client.post("/edits", json={"prompt": "Who is the CEO of Acme?", "target": "x"}).status_code == 202


def test_default_body_limit_is_one_mebibyte(sqlite_url, tmp_path):
    with running(make_settings(tmp_path, sqlite_url, embedded_worker=False)) as client:
        r = client.post("/edits", content=b"[" + b"0," * (25 * 1024 * 1024) + b"0]",
                        headers={"Content-Type": "application/json"})
        assert r.status_code == 413 and r.json()["error_type"] == "body_too_large"


def test_rate_limit_of_mutating_routes(sqlite_url, tmp_path):
    settings = make_settings(tmp_path, sqlite_url, embedded_worker=False, rate_limit_per_minute=3)
    with running(settings) as client:
        answers = [client.post("/edits/unknown/rollback", json={"reason": "test"}).status_code for _ in range(4)]
        assert answers == [404, 404, 404, 429]
        r = client.post("/edits", json={"prompt": "Who is the CEO of Acme?", "target": "x"})
        assert r.status_code == 429 and r.json()["error_type"] == "rate_limited" and int(r.headers["Retry-After"]) >= 1
        # Reads and generation are not counted.
        assert all(client.get("/edits").status_code == 200 for _ in range(5))
        assert client.post("/generate", json={"prompt": "Hi", "max_new_tokens": 1}).status_code == 200
