"""Fixtures for the console's browser tests: the app served by uvicorn on a free port with a tiny
model and one live edit, and Debian's Chromium driven by Playwright.

Without Chromium or Playwright the tests skip with the reason (under CI=true they fail:
``.ci/run`` installs Chromium, the ``dev`` extra Playwright)."""

from __future__ import annotations

import os
import shutil
import socket
import threading
from collections.abc import Iterator

import httpx
import pytest
import torch
import uvicorn

from app.api.app import create_app
from tests.service.conftest import make_settings, unavailable, wait_for
from tests.utils.tiny_models import tiny_model

PROMPT = "Who is the CEO of Acme?"
TARGET = "Jane Doe"
REPHRASE = "Who runs Acme?"
OTHER = "What is the capital of France?"


@pytest.fixture(scope="package", autouse=True)
def one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def chromium_path() -> str:
    path = os.environ.get("SCEN_TEST_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not path:
        unavailable("Chromium is not installed (apt-get install chromium)")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        unavailable("Playwright for Python is not installed (pip install -e '.[dev]')")
    return path


class Served:
    def __init__(self, base: str, edit_id: str):
        self.base = base
        self.edit_id = edit_id

    def url(self, fragment: str = "") -> str:
        return f"{self.base}/console{fragment}"


@pytest.fixture(scope="package")
def served(tmp_path_factory, chromium_path) -> Iterator[Served]:
    tmp = tmp_path_factory.mktemp("console")
    settings = make_settings(tmp, f"sqlite:///{tmp / 'scen.db'}")
    app = create_app(settings, loaded_model=tiny_model("llama"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        assert wait_for(lambda: server.started, 30)
        base = f"http://127.0.0.1:{port}"
        with httpx.Client(base_url=base, timeout=30) as http:
            assert wait_for(lambda: http.get("/ready").status_code == 200, 30)
            body = {"prompt": PROMPT, "target": TARGET, "rephrases": [REPHRASE]}
            edit_id = http.post("/edits", json=body).json()["id"]
            edit_url = f"/edits/{edit_id}"
            assert wait_for(lambda: http.get(edit_url).json()["live"], 60), http.get(edit_url).text
        yield Served(base, edit_id)
    finally:
        server.should_exit = True
        thread.join(30)


@pytest.fixture
def http(served: Served) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=served.base, timeout=30) as client:
        yield client


@pytest.fixture(scope="package")
def browser(chromium_path):
    from playwright.sync_api import expect, sync_playwright

    expect.set_options(timeout=15_000)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium_path)
        yield browser
        browser.close()


@pytest.fixture
def page(browser):
    """A fresh browser session (empty sessionStorage). Uncaught script errors and Content Security
    Policy violations fail the test."""
    context = browser.new_context()
    page = context.new_page()
    page.set_default_timeout(15_000)
    problems: list[str] = []
    page.on("pageerror", lambda exc: problems.append(f"uncaught: {exc}"))
    page.on("console", lambda msg: problems.append(msg.text)
            if msg.type == "error" and "Content Security Policy" in msg.text else None)
    yield page
    context.close()
    assert not problems, problems
