"""API keys and roles: 401 without a valid key, 403 below the route's role, the same error body
as every other error; keys stored hashed; open mode on loopback only; no key in logs or bodies."""

from __future__ import annotations

import logging
import subprocess
import sys

import pytest
import sqlalchemy as sa
from pydantic import ValidationError
from typer.testing import CliRunner

from app.api.auth import check_exposure, is_loopback
from app.api.server import serve
from app.cli import cli
from app.db.keys import create_key, revoke_key
from app.db.session import Database
from app.settings import Settings, get_settings
from tests.service.conftest import make_settings, running, wait_for, wait_status

KEYS = {"reader": "rk-0123456789abcdef-reader", "editor": "ek-0123456789abcdef-editor",
        "admin": "ak-0123456789abcdef-admin"}
API_KEYS = ",".join(f"{role}-key:{role}:{key}" for role, key in KEYS.items())
ROLES = ["reader", "editor", "admin"]


def auth(role: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[role]}"}


@pytest.fixture(scope="module")
def keyed(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("auth")
    settings = make_settings(tmp_path, f"sqlite:///{tmp_path / 'scen.db'}", api_keys=API_KEYS)
    with running(settings) as client:
        yield client


class Routes:
    """Every route with the least role it needs, and a request that succeeds with that role."""

    def __init__(self, client):
        self.client = client
        self.n = 0

    def edit(self) -> str:
        self.n += 1
        r = self.client.post("/edits", json={"prompt": f"Who leads team {self.n}?", "target": "Ann"},
                             headers=auth("editor"))
        assert r.status_code == 202, r.text
        return r.json()["id"]

    def requests(self):
        model = self.client.get("/v1/models", headers=auth("reader")).json()["data"][0]["id"]
        edit_id = self.edit()
        self.n += 1
        yield "reader", "get", "/edits", None
        yield "reader", "get", f"/edits/{edit_id}", None
        yield "reader", "get", f"/edits/{edit_id}/events", None
        yield "reader", "post", "/generate", {"prompt": "Hi", "max_new_tokens": 1}
        yield "reader", "get", "/v1/models", None
        yield "reader", "post", "/v1/completions", {"model": model, "prompt": "Hi", "max_tokens": 1}
        yield "reader", "post", "/v1/chat/completions", {"model": model, "max_tokens": 1,
                                                         "messages": [{"role": "user", "content": "Hi"}]}
        yield "editor", "post", "/edits", {"prompt": f"Who founded firm {self.n}?", "target": "Bo"}
        yield "admin", "post", f"/edits/{edit_id}/rollback", {"reason": "role test"}
        yield "admin", "post", f"/edits/{edit_id}/restore", {"reason": "role test"}


def _call(client, method, path, body, headers):
    return client.get(path, headers=headers) if method == "get" else client.post(path, json=body, headers=headers)


def test_role_matrix_on_every_route(keyed):
    routes = Routes(keyed)
    for least, method, path, body in routes.requests():
        for headers, why in [({}, "no key"), ({"Authorization": "Bearer nonsense-key-123456"}, "wrong key"),
                             ({"Authorization": "Basic YTpi"}, "not bearer")]:
            r = _call(keyed, method, path, body, headers)
            assert r.status_code == 401, (path, why, r.text)
            assert r.json()["error_type"] == "unauthorized" and set(r.json()) == {"error", "error_type"}
            assert r.headers["WWW-Authenticate"] == "Bearer"
        for role in ROLES:
            r = _call(keyed, method, path, body, auth(role))
            if ROLES.index(role) < ROLES.index(least):
                assert r.status_code == 403, (path, role, r.text)
                assert r.json()["error_type"] == "forbidden" and set(r.json()) == {"error", "error_type"}
            else:
                assert r.status_code in (200, 202), (path, role, r.text)
                if path == "/edits" and method == "post":  # a new prompt for the next role
                    body = {**body, "prompt": body["prompt"] + "!"}


def test_open_routes_need_no_key(keyed):
    for path in ("/health", "/ready", "/metrics", "/openapi.json", "/docs"):
        assert keyed.get(path).status_code == 200, path


def test_refused_before_the_body_is_read(keyed):
    # A reader's post is 403 whatever the body: the key is checked first.
    r = keyed.post("/edits", content=b"hello", headers={**auth("reader"), "Content-Type": "text/plain"})
    assert r.status_code == 403
    r = keyed.post("/edits", json={"prompt": ""})
    assert r.status_code == 401


def test_actor_is_the_key_name(keyed):
    routes = Routes(keyed)
    routes.n = 1000  # prompts no other test posted
    edit_id = routes.edit()
    events = keyed.get(f"/edits/{edit_id}/events", headers=auth("reader")).json()["items"]
    assert events[0]["event"] == "created" and events[0]["actor"] == "editor-key"


@pytest.mark.parametrize("db", ["sqlite", "postgres"])
def test_stored_keys_are_hashed_work_at_once_and_can_be_revoked(db, request, tmp_path, monkeypatch):
    url = request.getfixturevalue(f"{db}_url")
    monkeypatch.setenv("SCEN_DATABASE_URL", url)
    monkeypatch.setenv("SCEN_DATA_DIR", str(tmp_path / "data"))
    get_settings.cache_clear()
    try:
        made = CliRunner().invoke(cli, ["keys", "create", "ops-bot", "--role", "editor"])
        assert made.exit_code == 0, made.output
        key = made.stdout.strip().splitlines()[0]
        assert key.startswith("scen_") and len(key) > 40
        again = CliRunner().invoke(cli, ["keys", "create", "ops-bot", "--role", "admin"])
        assert again.exit_code == 1 and "already exists" in again.output
        listed = CliRunner().invoke(cli, ["keys", "list"])
        assert "ops-bot\teditor" in listed.stdout and key not in listed.stdout
    finally:
        get_settings.cache_clear()

    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            rows = [tuple(r) for r in conn.execute(sa.text("SELECT * FROM api_keys"))]
    finally:
        engine.dispose()
    assert len(rows) == 1 and key not in repr(rows)
    if db == "sqlite":
        stored = b"".join(p.read_bytes() for p in (tmp_path / "data").glob("scen.db*"))
        assert key.encode() not in stored

    with running(make_settings(tmp_path, url)) as client:
        assert client.get("/edits").status_code == 401  # a stored key: not open any more
        ok = client.post("/edits", json={"prompt": "Who runs Initech?", "target": "Bill"},
                         headers={"Authorization": f"Bearer {key}"})
        assert ok.status_code == 202, ok.text
        assert client.post(f"/edits/{ok.json()['id']}/rollback", json={"reason": "x"},
                           headers={"Authorization": f"Bearer {key}"}).status_code == 403
        # A key made while the service runs is taken within a second (an unknown key re-reads the table).
        db_ = Database(url)
        with db_.session() as session:
            admin = create_key(session, "late-admin", "admin")
        assert wait_for(lambda: client.get("/edits", headers={"Authorization": f"Bearer {admin}"}).status_code == 200,
                        5)
        with db_.session() as session:
            revoke_key(session, "ops-bot")
        db_.close()
        assert wait_for(lambda: client.get("/edits", headers={"Authorization": f"Bearer {key}"}).status_code == 401,
                        10)


def test_open_mode_only_on_loopback(sqlite_url, tmp_path, caplog):
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.1.2.3")
    refused = check_exposure("0.0.0.0", has_keys=False, allow_open=False)
    assert refused and "SCEN_ALLOW_OPEN" in refused and "\n" not in refused
    assert check_exposure("0.0.0.0", has_keys=True, allow_open=False) is None
    assert check_exposure("0.0.0.0", has_keys=False, allow_open=True) is None
    assert check_exposure("127.0.0.1", has_keys=False, allow_open=False) is None

    settings = make_settings(tmp_path, sqlite_url)
    with pytest.raises(SystemExit) as stopped:
        serve(settings, host="0.0.0.0", port=1)
    assert "refusing to serve on 0.0.0.0 without API keys" in str(stopped.value)

    # Open on loopback: said at start-up, and every caller is anonymous.
    with caplog.at_level(logging.WARNING), running(settings) as client:
        assert "the service is OPEN" in caplog.text
        r = client.post("/edits", json={"prompt": "Who is the CEO of Acme?", "target": "Jane"},
                        headers={"Authorization": "Bearer whatever"})
        assert r.status_code == 202
        events = client.get(f"/edits/{r.json()['id']}/events").json()["items"]
        assert events[0]["actor"] == "anonymous"
        wait_status(client, r.json()["id"], {"active"})


def test_no_key_in_logs_bodies_or_setting_errors(keyed, caplog):
    wrong = "Wrong-Key-For-Logs-0987654321"
    with caplog.at_level(logging.DEBUG):
        bodies = [keyed.get("/edits", headers={"Authorization": f"Bearer {wrong}"}),
                  keyed.get("/edits", headers=auth("admin")),
                  keyed.post("/edits", json={"prompt": "q?"}, headers=auth("admin")),
                  keyed.post("/edits/nope/rollback", json={"reason": "r"}, headers=auth("admin"))]
    shown = caplog.text + "".join(r.text + str(r.headers) for r in bodies)
    assert wrong not in shown and KEYS["admin"] not in shown

    secret = "Sup3r-Secret-Key-Value-42"
    for bad in (f"alice:boss:{secret}", f"alice:admin:{secret},alice:reader:{secret}x", f"alice{secret}"):
        with pytest.raises(ValidationError) as refused:
            Settings(_env_file=None, api_keys=bad)
        assert "SCEN_API_KEYS" in str(refused.value) and secret not in str(refused.value)
    with pytest.raises(ValidationError, match="at least 16 characters"):
        Settings(_env_file=None, api_keys="bob:reader:short-key")
    assert "**********" in repr(Settings(_env_file=None, api_keys=f"bob:reader:{secret}"))

    # The command line: one line, no key, no traceback.
    import os

    env = {**os.environ, "SCEN_API_KEYS": f"alice:boss:{secret}", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", "from app.cli import main; main()", "db", "upgrade"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.strip().count("\n") == 0 and "role must be one of" in proc.stderr, proc.stderr
    assert secret not in proc.stderr + proc.stdout and "Traceback" not in proc.stderr
