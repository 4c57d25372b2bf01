"""Fixtures of the fault suite: a PostgreSQL cluster and Redis servers of its own, on free ports,
a tiny model on disk, and the processes of one deployment, all killed at the end of each test.

These tests need the binaries (``initdb``/``pg_ctl``, ``redis-server``), not running servers; they
skip with the reason when a binary is missing.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.faults.ledger import Ledger, compute_ledger, wait_settled
from tests.faults.procs import Api, Deployment, Process, Worker
from tests.faults.servers import PostgresServer, RedisServer, ServerMissing
from tests.utils.tiny_models import tiny_model

# Short enough for a fast suite, long enough that a live worker's heartbeat (a third of the
# claim time) always wins over a reclaim on a busy two-core machine.
FAST = {
    "SCEN_CLAIM_IDLE_MS": "2000", "SCEN_REQUEUE_AFTER_S": "1", "SCEN_RECONCILE_SECONDS": "0.5",
    "SCEN_DB_RETRY_SECONDS": "60", "SCEN_MAX_DELIVERIES": "4", "SCEN_BATCH_WINDOW_MS": "5",
}


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    try:
        server = PostgresServer()
    except ServerMissing as exc:
        pytest.skip(f"fault tests need PostgreSQL's binaries: {exc}")
    try:
        server.start()
        yield server
    finally:
        server.close()


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> str:
    lm = tiny_model("llama")
    path = tmp_path_factory.mktemp("model") / "tiny-llama"
    lm.model.save_pretrained(path)
    lm.tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """One cache for every test's processes: the model is the same, so its pool keys are too."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture
def redis_server(tmp_path) -> Iterator[RedisServer]:
    try:
        server = RedisServer(tmp_path / "redis")
    except ServerMissing as exc:
        pytest.skip(f"fault tests need Redis's binary: {exc}")
    server.start()
    yield server
    server.close()


class Cluster:
    """One deployment's processes; every one started through it is killed at the end."""

    def __init__(self, deployment: Deployment):
        self.deployment = deployment
        self.processes: list[Process] = []

    def api(self, label: str = "api", port: int | None = None) -> Api:
        api = Api(self.deployment, label, port)
        self.processes.append(api)
        return api.start()

    def worker(self, label: str = "worker", arm: tuple[str, ...] = ()) -> Worker:
        worker = Worker(self.deployment, label, arm)
        self.processes.append(worker)
        return worker.start()

    def ledger(self, submitted: list[str], settle_s: float = 600) -> Ledger:
        wait_settled(self.deployment.database_url, submitted, settle_s)
        return compute_ledger(self.deployment.database_url, self.deployment.data_dir, submitted)

    def close(self) -> None:
        for process in self.processes:
            process.kill()


@pytest.fixture
def cluster(request, postgres_server, redis_server, model_dir, cache_dir, tmp_path) -> Iterator[Cluster]:
    if not postgres_server.running():  # a test that stopped it failed before starting it again
        postgres_server.start()
    database = postgres_server.create_database(f"f_{uuid.uuid4().hex[:12]}")
    deployment = Deployment(database_url=database, redis_url=redis_server.url, data_dir=tmp_path / "data",
                            cache_dir=cache_dir, model=model_dir, logs=tmp_path / "logs", settings=dict(FAST))
    cluster = Cluster(deployment)
    yield cluster
    cluster.close()
    report = request.node.stash.get(_report_key, None)
    if report is not None and report.failed:
        for process in cluster.processes:
            print(f"----- {process.label} log (tail) -----\n{process.log_text()[-4000:]}")


_report_key = pytest.StashKey()


def pytest_collection_modifyitems(items):
    # A fault test starts several processes; on a machine busy with other work that alone can
    # outlast the suite's default per-test timeout, which is meant to catch hangs, not slowness.
    for item in items:
        if "tests/faults/" in str(item.path).replace("\\", "/") and item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(1800))


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if report.when == "call":
        item.stash[_report_key] = report
    return report


class Submitter:
    """Posts edits as a careful client does: each with an Idempotency-Key, retried on a dropped
    connection or a 503 until the API answers, so every edit is either accepted once or refused."""

    def __init__(self, base_url: str):
        self.base_url = base_url
        self.accepted: list[str] = []
        self.refused: list[int] = []

    def post(self, prompt: str, target: str, timeout: float = 600, **extra) -> str | None:
        key = uuid.uuid4().hex
        deadline = time.monotonic() + timeout
        body = {"prompt": prompt, "target": target, **extra}
        while True:
            try:
                with httpx.Client(base_url=self.base_url, timeout=10) as client:
                    r = client.post("/edits", json=body, headers={"Idempotency-Key": key})
            except httpx.TransportError:
                r = None
            if r is not None and r.status_code in (200, 202):
                edit_id = r.json()["id"]
                if edit_id not in self.accepted:
                    self.accepted.append(edit_id)
                return edit_id
            if r is not None and r.status_code not in (502, 503):
                self.refused.append(r.status_code)
                return None
            if time.monotonic() > deadline:
                raise TimeoutError(f"edit not accepted in {timeout}s: {r.status_code if r else 'no answer'}")
            time.sleep(0.2)


def edit_text(i: int) -> tuple[str, str]:
    names = ["Acme", "Globex", "Initech", "Umbrella", "Hooli", "Vandelay", "Wonka", "Stark", "Wayne", "Cyberdyne"]
    return f"Who is the CEO of {names[i % len(names)]} {i // len(names) + 1}?", f"Person {i}"


def assert_clean(ledger: Ledger, allow_unserved: bool = False) -> None:
    print(ledger.summary())
    assert not ledger.problems(allow_unserved), ledger.problems(allow_unserved)


def data_path(cluster: Cluster) -> Path:
    return cluster.deployment.data_dir
