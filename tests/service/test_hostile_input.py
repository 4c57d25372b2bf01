"""Input found by fuzzing: refused alike on PostgreSQL and SQLite with a 422, never a 500,
and nothing written; rows stored before the checks existed still list."""

from __future__ import annotations

import uuid

import pytest

from app.db import edits as repo
from app.live import open_database
from tests.service.conftest import make_settings, running


def nested(depth: int) -> dict:
    """A JSON object ``depth`` levels deep (``{}`` is one level)."""
    value: dict = {}
    for _ in range(depth - 1):
        value = {"a": value}
    return value


@pytest.fixture(params=["sqlite", "postgres"])
def client(request, tmp_path):
    settings = make_settings(tmp_path, request.getfixturevalue(f"{request.param}_url"), embedded_worker=False)
    with running(settings) as c:
        c.settings = settings
        yield c


def assert_refused(r, field: str = "") -> None:
    assert r.status_code == 422, r.text
    body = r.json()
    assert set(body) == {"error", "error_type"} and body["error_type"] == "validation_error"
    assert field in body["error"]


NUL = "\x00"
NUL_EDITS = [
    {"prompt": f"Who is the CEO of Acme{NUL}?", "target": "Jane"},
    {"prompt": "Who is the CEO of Acme?", "target": f"Ja{NUL}ne"},
    {"prompt": "Who is the CEO of Acme?", "target": "Jane", "rephrases": [f"Acme's CEO{NUL}?"]},
    {"prompt": "Who is the CEO of Acme?", "target": "Jane", "subject": f"Acme{NUL}"},
    {"prompt": "Who is the CEO of Acme?", "target": "Jane", "metadata": {"ticket": f"OPS{NUL}1"}},
    {"prompt": "Who is the CEO of Acme?", "target": "Jane", "metadata": {f"tic{NUL}ket": 1}},
    {"prompt": "Who is the CEO of Acme?", "target": "Jane", "metadata": {"tags": [["a", f"b{NUL}"]]}},
]


@pytest.mark.parametrize("body", NUL_EDITS)
def test_nul_in_an_edit_is_refused_on_both_databases(client, body):
    assert_refused(client.post("/edits", json=body))
    assert client.get("/edits").json()["total"] == 0


def test_lone_surrogate_is_refused(client):
    raw = b'{"prompt": "Who is \\ud800?", "target": "x"}'
    assert_refused(client.post("/edits", content=raw, headers={"Content-Type": "application/json"}), "prompt")


def test_nul_in_query_or_id_is_refused(client):
    assert_refused(client.get("/edits", params={"q": f"acme{NUL}"}), "q")
    assert_refused(client.get("/edits/abc%00def"))
    assert_refused(client.post("/edits/abc%00def/rollback", json={"reason": "test"}))
    assert_refused(client.post("/generate", json={"prompt": f"Hi{NUL}"}), "prompt")


@pytest.mark.parametrize("depth", [33, 300, 5000])
def test_deep_metadata_is_refused_at_request_time(client, depth):
    # Written out by hand: 5000 levels is past the recursion limit of both JSON encoder and parser.
    metadata = '{"a": ' * (depth - 1) + "{}" + "}" * (depth - 1)
    r = client.post("/edits", content=f'{{"prompt": "q?", "target": "x", "metadata": {metadata}}}',
                    headers={"Content-Type": "application/json"})
    assert_refused(r)
    assert client.get("/edits").json()["total"] == 0


def test_metadata_at_the_depth_limit_is_accepted(client):
    r = client.post("/edits", json={"prompt": "q?", "target": "x", "metadata": nested(32)})
    assert r.status_code == 202, r.text
    assert client.get(f"/edits/{r.json()['id']}").json()["metadata"] == nested(32)


def test_non_finite_metadata_is_refused(client):
    raw = b'{"prompt": "q?", "target": "x", "metadata": {"score": NaN}}'
    assert_refused(client.post("/edits", content=raw, headers={"Content-Type": "application/json"}), "finite")
    assert client.get("/edits").json()["total"] == 0


def test_a_stored_row_that_cannot_be_shown_does_not_break_listing(client):
    """A row written before the depth limit existed is listed with a note instead of its metadata."""
    db = open_database(client.settings)
    with db.session() as session:
        bad, _ = repo.create_edit(session, "Who is the CEO of Acme?", "Jane", [], nested(400))
        good, _ = repo.create_edit(session, "Who is the CEO of Globex?", "Hank", [], {"ticket": 7})
    db.close()
    listed = client.get("/edits")
    assert listed.status_code == 200, listed.text
    shown = {item["id"]: item["metadata"] for item in listed.json()["items"]}
    assert shown[good.id] == {"ticket": 7}
    assert "nested more than" in shown[bad.id]["_not_shown"]
    one = client.get(f"/edits/{bad.id}")
    assert one.status_code == 200 and "_not_shown" in one.json()["metadata"]


@pytest.mark.parametrize("params", [{"offset": 2**63}, {"offset": 2**31}, {"limit": 2**64}])
def test_out_of_range_paging_is_refused(client, params):
    assert_refused(client.get("/edits", params=params))


def test_largest_offset_is_served(client):
    r = client.get("/edits", params={"offset": 2**31 - 1})
    assert r.status_code == 200 and r.json()["items"] == []


BAD_GENERATE = [
    ({"prompt": "Hi", "temperature": 1.0, "seed": 2**64}, "seed"),
    ({"prompt": "Hi", "temperature": 1.0, "seed": 2**53}, "seed"),
    ({"prompt": "Hi", "temperature": 1e-45}, "temperature"),
    ({"prompt": "Hi", "temperature": 1e-4}, "temperature"),
    ({"prompt": "Hi", "seed": False}, "seed"),
    ({"prompt": "Hi", "max_new_tokens": "8"}, "max_new_tokens"),
    ({"prompt": "Hi", "temperature": "1"}, "temperature"),
    ({"prompt": "Hi", "max_new_tokens": 8.0}, "max_new_tokens"),
]


@pytest.mark.parametrize("body,field", BAD_GENERATE)
def test_bad_generate_values_are_refused(client, body, field):
    assert_refused(client.post("/generate", json=body), field)


def test_non_finite_temperature_is_refused(client):
    raw = b'{"prompt": "Hi", "temperature": Infinity}'
    assert_refused(client.post("/generate", content=raw, headers={"Content-Type": "application/json"}),
                   "temperature")


def test_edges_of_the_sampling_ranges_are_served(client):
    r = client.post("/generate", json={"prompt": "Hi", "max_new_tokens": 2, "temperature": 1e-3, "seed": 2**53 - 1})
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("body", [{"prompt": True, "target": "x"}, {"prompt": "q?", "target": "x", "rephrases": [1]},
                                  {"prompt": "q?", "target": "x", "rephrases": "r"}])
def test_edit_fields_are_strictly_typed(client, body):
    assert_refused(client.post("/edits", json=body))


@pytest.mark.parametrize("raw", [b"\xff\xfe{", b'{"prompt": "\xff"}'])
def test_undecodable_body_is_a_422(client, raw):
    assert_refused(client.post("/edits", content=raw, headers={"Content-Type": "application/json"}))


def test_schema_declares_what_the_server_refuses(client):
    schemas = client.get("/openapi.json").json()["components"]["schemas"]
    rephrase = schemas["EditCreate"]["properties"]["rephrases"]["items"]
    assert rephrase["minLength"] == 1 and "pattern" in rephrase
    seed = schemas["GenerateRequest"]["properties"]["seed"]["anyOf"][0]
    assert seed["maximum"] == 2**53 - 1


@pytest.mark.parametrize("path,allowed", [("/edits", "GET, POST"), (f"/edits/{uuid.UUID(int=1).hex}", "GET"),
                                          ("/generate", "POST"), ("/health", "GET")])
@pytest.mark.parametrize("method", ["OPTIONS", "DELETE", "PUT"])
def test_unsupported_method_names_the_allowed_ones(client, path, allowed, method):
    r = client.request(method, path)
    assert r.status_code == 405 and r.json()["error_type"] == "method_not_allowed"
    assert r.headers["Allow"] == allowed
