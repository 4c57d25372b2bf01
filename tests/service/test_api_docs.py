"""The OpenAPI document tells the truth about errors; non-JSON bodies are 415; the docs page
works offline; the command line has --version and one-line errors; requests carry an id."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from app.cli import cli
from tests.service.conftest import make_settings, running


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("docs")
    with running(make_settings(tmp_path, f"sqlite:///{tmp_path / 'scen.db'}", embedded_worker=False)) as c:
        yield c


def test_openapi_errors_security_and_operation_ids(client):
    schema = client.get("/openapi.json").json()
    assert "HTTPValidationError" not in str(schema) and "ValidationError" not in schema["components"]["schemas"]
    error_ref = {"$ref": "#/components/schemas/ErrorBody"}
    assert set(schema["components"]["schemas"]["ErrorBody"]["required"]) == {"error", "error_type"}
    ops = {}
    for path, operations in schema["paths"].items():
        for method, op in operations.items():
            ops[op["operationId"]] = (method, path, op)
            for code, response in op["responses"].items():
                if code[0] in "45":
                    assert response["content"]["application/json"]["schema"] == error_ref, (path, code)
    assert {"create_edit", "create_edits", "list_edits", "get_edit", "list_edit_events", "rollback_edit",
            "restore_edit",
            "generate", "health", "ready", "list_models", "create_completion", "create_chat_completion"} == set(ops)
    assert schema["components"]["securitySchemes"]["ApiKey"] == {
        "type": "http", "scheme": "bearer", "description": schema["components"]["securitySchemes"]["ApiKey"][
            "description"]}
    for name, (_method, _path, op) in ops.items():
        if name in ("health", "ready"):
            assert "security" not in op and "401" not in op["responses"]
        else:
            assert op["security"] == [{"ApiKey": []}] and {"401", "403"} <= set(op["responses"])
    for name in ("create_edit", "rollback_edit", "restore_edit", "generate", "create_chat_completion"):
        assert {"413", "415", "422"} <= set(ops[name][2]["responses"]), name
    assert {"404", "409"} <= set(ops["rollback_edit"][2]["responses"])
    assert "reason" in schema["components"]["schemas"]["RollbackRequest"]["required"]


@pytest.mark.parametrize("path", ["/edits", "/generate", "/v1/chat/completions", "/edits/x/rollback"])
def test_text_body_is_415(client, path):
    r = client.post(path, content=b"prompt=hi", headers={"Content-Type": "text/plain"})
    assert r.status_code == 415, r.text
    assert r.json()["error_type"] == "unsupported_media_type" and set(r.json()) == {"error", "error_type"}
    r = client.post(path, content=b"a=1", headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert r.status_code == 415
    assert client.get("/edits").json()["total"] == 0


def test_json_with_charset_is_json(client):
    r = client.post("/generate", content=b'{"prompt": "Hi", "max_new_tokens": 1}',
                    headers={"Content-Type": "application/json; charset=utf-8"})
    assert r.status_code == 200, r.text


def test_docs_page_is_offline(client):
    page = client.get("/docs")
    assert page.status_code == 200
    assert not re.search(r"https?://", page.text), page.text
    for src in re.findall(r'(?:src|href)="([^"]+)"', page.text):
        assert client.get(src).status_code == 200, src
    assert "/docs/assets/swagger-ui-bundle.js" in page.text
    assert client.get("/redoc").status_code == 404


def test_request_id(client):
    r = client.get("/health", headers={"X-Request-Id": "abc-123"})
    assert r.headers["X-Request-Id"] == "abc-123"
    made = client.get("/health", headers={"X-Request-Id": "bad id with spaces"}).headers["X-Request-Id"]
    assert re.fullmatch(r"[0-9a-f]{32}", made)
    assert re.fullmatch(r"[0-9a-f]{32}", client.get("/nothing").headers["X-Request-Id"])


def test_version():
    result = CliRunner().invoke(cli, ["--version"])
    assert result.exit_code == 0 and re.fullmatch(r"scen \d+\.\d+\.\d+\n", result.output)


def test_cli_error_is_one_line(tmp_path):
    env = {**os.environ, "SCEN_DATABASE_URL": "postgresql+psycopg://scen:Pw-Not-Shown@127.0.0.1:1/scen",
           "SCEN_DATA_DIR": str(tmp_path), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", "from app.cli import main; main()", "keys", "list"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("scen: OperationalError:") and "Traceback" not in proc.stderr
    assert "Pw-Not-Shown" not in proc.stderr
    missing = CliRunner().invoke(cli, ["keys", "create", "x y", "--role", "reader"])
    assert missing.exit_code == 1 and missing.output.count("\n") == 1
    bad_role = CliRunner().invoke(cli, ["keys", "create", "bot", "--role", "owner"])
    assert bad_role.exit_code == 1 and "reader, editor, admin" in bad_role.output
