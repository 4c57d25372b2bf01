"""Fixtures for the service tests: real Redis, real PostgreSQL, SQLite, tiny models.

Servers that cannot be reached skip their tests with the reason, except under CI
(CI=true), where they fail.
"""

from __future__ import annotations

import contextlib
import os
import time
import uuid
from pathlib import Path

import pytest
import redis
import sqlalchemy as sa
import torch
from fastapi.testclient import TestClient

from app.api.app import create_app
from app.settings import Settings
from tests.utils.tiny_models import tiny_model

REDIS_URL = os.environ.get("SCEN_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
POSTGRES_URLS = [
    os.environ.get("SCEN_TEST_POSTGRES_URL", "postgresql+psycopg://root@127.0.0.1:5432/test"),
    "postgresql+psycopg://postgres@127.0.0.1:5432/test",
]
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy machine OpenMP
    spinning makes every forward pass many times slower. Restored for other test folders."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def unavailable(reason: str):
    if IN_CI:
        pytest.fail(f"{reason} (CI=true: required servers must be running)")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def redis_url() -> str:
    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2).ping()
    except redis.exceptions.RedisError as exc:
        unavailable(f"Redis at {REDIS_URL} unreachable: {exc}")
    return REDIS_URL


@pytest.fixture(scope="session")
def postgres_base_url() -> str:
    errors = []
    for url in POSTGRES_URLS:
        engine = sa.create_engine(url)
        try:
            with engine.connect() as conn:
                conn.execute(sa.text("SELECT 1"))
            return url
        except sa.exc.OperationalError as exc:
            errors.append(f"{url}: {exc.orig}")
        finally:
            engine.dispose()
    unavailable("PostgreSQL unreachable: " + "; ".join(errors))


@pytest.fixture
def postgres_url(postgres_base_url: str):
    """A fresh schema per test, selected through the connection's search_path."""
    schema = f"t_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(postgres_base_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
    sep = "&" if "?" in postgres_base_url else "?"
    yield f"{postgres_base_url}{sep}options=-csearch_path%3D{schema}"
    with admin.connect() as conn:
        conn.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))
    admin.dispose()


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'scen.db'}"


@pytest.fixture
def redis_prefix(redis_url: str):
    prefix = f"scen-test-{uuid.uuid4().hex[:10]}:"
    yield prefix
    client = redis.Redis.from_url(redis_url)
    keys = list(client.scan_iter(f"{prefix}*"))
    if keys:
        client.delete(*keys)
    client.close()


def make_settings(tmp_path: Path, database_url: str, redis_url: str | None = None, prefix: str = "scen:",
                  **overrides) -> Settings:
    values = {
        "data_dir": tmp_path / "data", "database_url": database_url, "redis_url": redis_url, "redis_prefix": prefix,
        "reconcile_seconds": 0.5, "batch_window_ms": 5, "claim_idle_ms": 60_000,
        # A worker process costs seconds of start-up (a fresh interpreter importing torch) in every
        # test; test_embedded_process.py covers it, the others share the model in a thread.
        "embedded_worker_mode": "thread",
    }
    values.update(overrides)
    return Settings(_env_file=None, **values)


@contextlib.contextmanager
def running(settings: Settings, model=None, wait_ready: bool = True):
    """The app with its lifespan, entered through an httpx-based TestClient."""
    app = create_app(settings, loaded_model=model if model is not None else tiny_model("llama"))
    with TestClient(app) as client:
        if wait_ready:
            assert wait_for(lambda: client.get("/ready").status_code == 200, 10), client.get("/ready").json()
        yield client


def wait_for(predicate, timeout: float, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


def wait_status(client: TestClient, edit_id: str, statuses: set[str], timeout: float = 15) -> dict:
    """Poll until the edit reaches one of ``statuses``; an ``active`` edit must also be live here.

    The database says ``active`` a moment before this process's model serves the edit.
    """
    body = {}

    def done() -> bool:
        nonlocal body
        body = client.get(f"/edits/{edit_id}").json()
        return body.get("status") in statuses and (body["status"] != "active" or body.get("live", True))

    assert wait_for(done, timeout), f"edit {edit_id} still {body.get('status')}: {body}"
    return body
