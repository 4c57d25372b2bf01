"""The deployment files: one image for api and worker, secrets only in .env, a worker healthcheck,
a CUDA variant, and a build context without secrets or environments."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from app.settings import Settings

ROOT = Path(__file__).resolve().parents[2]


def compose(name: str = "docker-compose.yml") -> dict:
    return yaml.safe_load((ROOT / name).read_text())


def test_one_image_built_once():
    services = compose()["services"]
    built = [name for name, svc in services.items() if "build" in svc]
    assert built == ["migrate"]
    images = {services[name]["image"] for name in ("migrate", "api", "worker")}
    assert len(images) == 1
    assert services["api"]["pull_policy"] == services["worker"]["pull_policy"] == "never"
    assert services["api"]["command"][:2] == ["scen", "serve"] and services["worker"]["command"] == ["scen", "worker"]


def test_no_secret_in_compose():
    text = (ROOT / "docker-compose.yml").read_text()
    services = compose()["services"]
    assert services["postgres"]["environment"]["POSTGRES_PASSWORD"].startswith("${POSTGRES_PASSWORD:?")
    assert "${POSTGRES_PASSWORD:?" in services["api"]["environment"]["SCEN_DATABASE_URL"]
    assert not re.search(r"://\w+:(?!\$\{)[^@\s]+@", text), "a URL with a written-out password"
    assert not re.search(r"^\s*SCEN_API_KEYS:", text, re.M)
    for name in ("migrate", "api", "worker"):
        assert services[name]["env_file"] == [".env"]


def test_worker_healthcheck_and_metrics_port():
    worker = compose()["services"]["worker"]
    assert worker["healthcheck"]["test"] == ["CMD", "scen", "worker", "--check"]
    assert worker["environment"]["SCEN_WORKER_METRICS_PORT"] == "9101"


def test_env_example_names_real_settings():
    text = (ROOT / ".env.example").read_text()
    names = set(re.findall(r"^#?\s*(SCEN_[A-Z_]+)=", text, re.M))
    fields = {f"SCEN_{name.upper()}" for name in Settings.model_fields}
    assert names and names <= fields, names - fields
    assert re.search(r"^POSTGRES_PASSWORD=$", text, re.M) and re.search(r"^SCEN_API_KEYS=$", text, re.M)


def test_cuda_variant_and_build_context():
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "ARG TORCH_VARIANT=cpu" in dockerfile and "cuda)" in dockerfile
    # Built as the user that runs it, so the prepared cache is that user's.
    order = [dockerfile.index(line) for line in ("USER scen", "RUN scen prepare", 'VOLUME ["/data", "/cache"]')]
    assert order == sorted(order)
    gpu = compose("docker-compose.cuda.yml")["services"]
    for name in ("api", "worker"):
        assert gpu[name]["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".env", ".venv", ".git", "tests"} <= set(ignored)
    assert ".env" in (ROOT / ".gitignore").read_text().split()
