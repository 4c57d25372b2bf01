"""Every rejected request answers {"error", "error_type"} with a 4xx and writes nothing."""

from __future__ import annotations

import uuid

import pytest

from tests.service.conftest import make_settings, running, wait_for
from tests.utils.tiny_models import tiny_model


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("validation")
    with running(make_settings(tmp_path, f"sqlite:///{tmp_path / 'scen.db'}")) as c:
        yield c


BAD_EDITS = [
    ({"prompt": "", "target": "x"}, "validation_error"),
    ({"prompt": "   ", "target": "x"}, "validation_error"),
    ({"prompt": "q?", "target": ""}, "validation_error"),
    ({"prompt": "q?"}, "validation_error"),
    ({"prompt": "q" * 4001, "target": "x"}, "validation_error"),
    ({"prompt": "q?", "target": "x", "rephrases": [""]}, "validation_error"),
    ({"prompt": "q?", "target": "x", "rephrases": ["r"] * 17}, "validation_error"),
    ({"prompt": "q?", "target": "x", "metadata": {"blob": "y" * 20000}}, "validation_error"),
    ({"prompt": "q?", "target": "x", "colour": "red"}, "validation_error"),
    ({"prompt": 5, "target": "x"}, "validation_error"),
    ({"prompt": "q?", "target": "x", "subject": ""}, "validation_error"),
    ({"prompt": "q?", "target": "x", "subject": "  "}, "validation_error"),
    ({"prompt": "q?", "target": "x", "subject": 3}, "validation_error"),
    # Within the character limit, over the engine's token limit.
    ({"prompt": "q?", "target": "word " * 200}, "invalid_edit"),
    ({"prompt": "q " * 700, "target": "x"}, "invalid_edit"),
    # The subject must occur in the prompt.
    ({"prompt": "Who is the CEO of Acme?", "target": "x", "subject": "Globex"}, "invalid_edit"),
]


@pytest.mark.parametrize("body,kind", BAD_EDITS)
def test_bad_edit_is_rejected_and_nothing_written(client, body, kind):
    key = uuid.uuid4().hex
    before = client.get("/edits").json()["total"]
    r = client.post("/edits", json=body, headers={"Idempotency-Key": key})
    assert r.status_code == 422, r.text
    assert r.json()["error_type"] == kind and r.json()["error"]
    assert set(r.json()) == {"error", "error_type"}
    assert client.get("/edits").json()["total"] == before
    # The key was not consumed by the rejected request. (A prompt of its own: repeating one
    # waiting edit would be a duplicate.)
    ok = client.post("/edits", json={"prompt": f"q {key}?", "target": "x"}, headers={"Idempotency-Key": key})
    assert ok.status_code == 202


def test_malformed_json(client):
    r = client.post("/edits", content=b"{not json", headers={"Content-Type": "application/json"})
    assert r.status_code == 422 and r.json()["error_type"] == "validation_error"


@pytest.mark.parametrize("path,method", [("/edits/nope", "get"), ("/edits/nope/rollback", "post"),
                                         ("/no/such/route", "get")])
def test_unknown_ids(client, path, method):
    r = client.get(path) if method == "get" else client.post(path, json={"reason": "test"})
    assert r.status_code == 404 and r.json()["error_type"] == "not_found"


@pytest.mark.parametrize("params", [{"status": "done"}, {"limit": 0}, {"limit": 1000}, {"offset": -1},
                                    {"limit": "many"}])
def test_bad_list_params(client, params):
    r = client.get("/edits", params=params)
    assert r.status_code == 422 and r.json()["error_type"] == "validation_error"


@pytest.mark.parametrize("body", [{"prompt": ""}, {"prompt": " \n"}, {"prompt": "q", "max_new_tokens": 0},
                                  {"prompt": "q", "max_new_tokens": 100000}, {"prompt": "q", "temperature": -1},
                                  {"prompt": "q" * 5000}, {"max_new_tokens": 3}])
def test_bad_generate(client, body):
    r = client.post("/generate", json=body)
    assert r.status_code == 422 and r.json()["error_type"] == "validation_error"


def test_wrong_method(client):
    r = client.delete("/edits")
    assert r.status_code == 405 and r.json()["error_type"] == "method_not_allowed"


def test_sampling_with_seed_is_repeatable(client):
    body = {"prompt": "Tell me a story.", "max_new_tokens": 8, "temperature": 1.0, "seed": 3}
    assert client.post("/generate", json=body).json()["text"] == client.post("/generate", json=body).json()["text"]


def test_not_ready_answers_503_and_writes_nothing(sqlite_url, tmp_path):
    # An engine setting the model cannot take: the model never goes live.
    settings = make_settings(tmp_path, sqlite_url, engine=["layer=99"])
    with running(settings, model=tiny_model("llama"), wait_ready=False) as client:
        assert client.get("/health").json() == {"status": "ok"}
        r = client.get("/ready")
        assert r.status_code == 503 and r.json()["error_type"] == "not_ready"
        assert "layer 99" in r.json()["error"] and r.headers["Retry-After"]
        r = client.post("/edits", json={"prompt": "q?", "target": "x"})
        assert r.status_code == 503 and r.json()["error_type"] == "not_ready"
        assert client.post("/generate", json={"prompt": "q?"}).status_code == 503
        assert client.get("/edits").json()["total"] == 0


def test_queue_down_rejects_post_and_writes_nothing(sqlite_url, tmp_path):
    settings = make_settings(tmp_path, sqlite_url, redis_url="redis://127.0.0.1:1/0", embedded_worker=False)
    with running(settings, wait_ready=False) as client:
        assert wait_for(lambda: client.app.state.service.served is not None, 10)
        r = client.get("/ready")
        assert r.status_code == 503 and "queue" in r.json()["error"]
        r = client.post("/edits", json={"prompt": "q?", "target": "x"})
        assert r.status_code == 503 and r.json()["error_type"] == "queue_unavailable"
        assert client.get("/edits").json()["total"] == 0


def test_openapi_docs(client):
    assert client.get("/docs").status_code == 200
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/edits", "/edits/{edit_id}", "/edits/{edit_id}/rollback", "/generate", "/health", "/ready"} <= set(paths)


@pytest.mark.parametrize("query", ["stauts=active", "=false", "limit=5&sort=desc"])
def test_unknown_query_parameters_are_refused_not_ignored(client, query):
    r = client.get(f"/edits?{query}")
    assert r.status_code == 422 and r.json()["error_type"] == "validation_error"
    assert "unknown query parameter" in r.json()["error"]
    assert client.get("/edits?status=active&limit=5").status_code == 200
